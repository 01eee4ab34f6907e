"""Routing agreement of a bf16 model with its fp32 forward, on the CPU: how much of the disagreement (#10's 99%
target) the router's own precision causes. The same weights run three ways against the fp32 forward:
  bf16, router rounded   the whole model cast to bf16, router weight and correction bias rounded too (before
                         `MoE._apply` kept them float32)
  bf16                   the cast as it is now: router weight, bias and load counters stay float32
  autocast               fp32 weights, bf16 matmuls (`torch.autocast`)
on two models: a trained checkpoint (default: the elastic-family benchmark's fixed run, if present) and the GPU
benchmark's 64-expert top-6 shape at random init, cut to 4 layers so that it runs on a CPU in about two minutes.

    python benchmarks/route_agreement.py [--checkpoint RUN_OR_CKPT]

Writes docs/benchmarks/route_agreement.{md,json}; the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, command_line, machine, md_table, write_report  # noqa: E402
from gpu_throughput import BIG, rel_err, route_agreement  # noqa: E402

from elastic_moe.checkpoint import load_checkpoint  # noqa: E402
from elastic_moe.config import ModelConfig  # noqa: E402
from elastic_moe.model import ElasticMoE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def compare(model32: ElasticMoE, x: torch.Tensor) -> dict:
    k = model32.cfg.moe_k
    ref = model32(x, return_routes=True)
    out = {}
    mb = copy.deepcopy(model32).to(torch.bfloat16)
    rounded = copy.deepcopy(mb)
    for i in rounded.moe_layers:  # what a plain cast did before: router and bias rounded to bf16
        moe = rounded.moe(i)
        moe.router.data = moe.router.data.to(torch.bfloat16)
        moe.bias = moe.bias.to(torch.bfloat16)
    for name, run in (("bf16, router rounded", lambda: rounded(x, return_routes=True)),
                      ("bf16", lambda: mb(x, return_routes=True))):
        o = run()
        out[name] = {"logits_rel_err": rel_err(o.logits, ref.logits), **route_agreement(o.routes, ref.routes, k)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = model32(x, return_routes=True)
    out["autocast"] = {"logits_rel_err": rel_err(o.logits, ref.logits), **route_agreement(o.routes, ref.routes, k)}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    paths = list(next(iter(results.values())))
    w = 0.8 / len(paths)
    for j, p in enumerate(paths):
        ys = [100 * r[p]["set_agreement"] for r in results.values()]
        bars = ax.bar([i + (j - (len(paths) - 1) / 2) * w for i in range(len(results))], ys, w, label=p)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(99, color="gray", ls="--", lw=1, label="#10's target (99%)")
    ax.set_xticks(range(len(results)), list(results))
    ax.set_ylim(85, 100.5)
    ax.set_ylabel("same expert set as fp32 (%)")
    ax.set_title("Routing agreement with the fp32 forward (CPU)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "elastic_family" / "fixed"))
    ap.add_argument("--out", default=str(DOCS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    results, shapes = {}, {}
    if Path(args.checkpoint).exists():
        m = load_checkpoint(args.checkpoint)[0].eval()
        x = torch.randint(3, m.cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
        name = f"trained ({Path(args.checkpoint).name})"
        results[name] = compare(m, x)
        shapes[name] = (f"{m.cfg.num_hidden_layers} layers, {m.cfg.moe_num_experts} experts top-{m.cfg.moe_k}, "
                        f"hidden {m.cfg.hidden_size}; 4 x 256 random tokens")
    big = dict(BIG, num_hidden_layers=4)
    torch.manual_seed(0)
    m = ElasticMoE(ModelConfig(**big)).eval()
    x = torch.randint(3, big["vocab_size"], (2, 256), generator=torch.Generator().manual_seed(0))
    results["GPU shape, random init"] = compare(m, x)
    shapes["GPU shape, random init"] = ("the GPU benchmark's layers (hidden 1024, 64 experts top-6, 2 shared), "
                                        "4 of 16 layers; 2 x 256 random tokens")
    rows = [[model, path, f"{v['logits_rel_err']:.2e}", f"{v['set_agreement']:.2%}", f"{v['expert_agreement']:.2%}"]
            for model, r in results.items() for path, v in r.items()]
    table = md_table(["model", "path", "logits rel. L2 error", "same expert set per (token, layer)",
                      "chosen experts in common"], rows)
    headline = {f"{model} / {path}": round(v["set_agreement"], 4) for model, r in results.items()
                for path, v in r.items()}
    md = f"""# Routing agreement of bf16 with fp32 on the CPU

`{command_line()}` on {machine()}.
Each path against the fp32 forward of the same weights, routes compared per (token, layer) as in
`benchmarks/gpu_throughput.py`. Models: {"; ".join(f"{k}: {v}" for k, v in shapes.items())}.

{table}

![same expert set per (token, layer), by path](route_agreement.png)

The trained checkpoint is the fixed run of `python benchmarks/elastic_family.py` (`runs/elastic_family/fixed`);
without it only the random-init model is measured.
"bf16, router rounded" is what `.to(torch.bfloat16)` did before the router, its correction bias and the load
counters were kept float32 under narrowing casts (`MoE._apply`, as transformers keeps ERNIE's gate and statics).
What is left between "bf16" and 100% comes from the bf16 hidden state reaching the router, not from the router's
own precision; autocast (fp32 residual stream, bf16 matmuls) is only a little closer.
"""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "route_agreement.png")
    write_report("route_agreement", md, headline, out)


if __name__ == "__main__":
    main()
