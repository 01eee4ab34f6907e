"""Routing agreement of a bf16 model with its fp32 forward, on the CPU: how much of the disagreement (#10's 99%
target) the router's own precision causes. The same weights run three ways against the fp32 forward:
  bf16, router rounded   the whole model cast to bf16, router weight and correction bias rounded too (before
                         `MoE._apply` kept them float32)
  bf16                   the cast as it is now: router weight, bias and load counters stay float32
  autocast               fp32 weights, bf16 matmuls (`torch.autocast`)
on two models: a trained checkpoint (default: the elastic-family benchmark's fixed run, if present) and the GPU
benchmark's 64-expert top-6 shape at random init, cut to 4 layers so that it runs on a CPU in about two minutes.
Then the same shape in miniature (hidden 256, byte vocabulary) trained briefly on the standard-library source, with
the aux-loss-free balancing bias at several rates (1e-3 is the pre-training default; 0 is off): agreement along
training, expert load, and the fp32 gap between the k-th and the (k+1)-th selection score, which is what a bf16
error has to cross to flip a choice. The rates train in parallel processes of one thread each.

    python benchmarks/route_agreement.py [--checkpoint RUN_OR_CKPT] [--train-steps 200] [--bias-rates 1e-3,3e-4,1e-4,0]

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

from elastic_moe.atomic import atomic_savefig  # noqa: E402
from elastic_moe.checkpoint import load_checkpoint  # noqa: E402
from elastic_moe.config import ModelConfig  # noqa: E402
from elastic_moe.model import ElasticMoE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MINI = dict(vocab_size=259, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, moe_num_experts=64, moe_k=6, moe_intermediate_size=128, moe_num_shared_experts=2,
            moe_layer_start_index=1, max_position_embeddings=1024, tie_word_embeddings=False)


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


@torch.no_grad()
def margins(model: ElasticMoE, x: torch.Tensor) -> dict:
    """fp32 selection scores (router probability + bias) per (token, layer): the gap between the k-th and the
    (k+1)-th, and how evenly the layer's chosen experts are loaded."""
    k, gaps, loads = model.cfg.moe_k, [], []

    def hook(mod, args):
        s = torch.softmax(args[0].float() @ mod.router.float().t(), -1) + mod.bias
        top = s.topk(k + 1, -1)
        gaps.append(top.values[:, -2] - top.values[:, -1])
        n = torch.bincount(top.indices[:, :k].flatten(), minlength=s.shape[1]).float()
        loads.append(n.max() / n.mean())

    hooks = [model.moe(i).register_forward_pre_hook(hook) for i in model.moe_layers]
    model(x)
    for h in hooks:
        h.remove()
    g = torch.cat(gaps)
    return {"kth_gap_median": g.median().item(), "kth_gap_below_1e-4": (g < 1e-4).float().mean().item(),
            "max_over_mean_load": torch.stack(loads).mean().item()}


def stdlib_bytes() -> torch.Tensor:
    from elastic_moe.corpus import Corpus

    data = bytearray()
    for doc in Corpus().documents(max_bytes=6_000_000):
        data += doc.text.encode()
    return torch.tensor(list(data), dtype=torch.long) + 3  # byte-level ids above the 3 special tokens


def train_and_compare(rate: float, steps: int, every: int, position: int = 0) -> list[dict]:
    """MINI trained `steps` AdamW steps (lr 1e-3, 8 x 256 bytes) with balancing bias rate `rate`; every `every` steps
    bf16 and autocast agreement with fp32 on 4 x 256 held-out bytes, and the fp32 score margins."""
    from tqdm import tqdm

    torch.set_num_threads(1)
    text = stdlib_bytes()
    torch.manual_seed(0)
    m = ElasticMoE(ModelConfig(**MINI))
    test, train = text[: 4 * 256].view(4, 256), text[100_000:]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    out = []
    for step in tqdm(range(steps + 1), desc=f"bias rate {rate:g}", position=position, leave=False):
        if step % every == 0:
            m.eval()
            r = compare(m, test)
            out.append({"step": step, "bf16": r["bf16"]["set_agreement"], "autocast": r["autocast"]["set_agreement"],
                        "bf16_experts": r["bf16"]["expert_agreement"], **margins(m, test)})
            m.train()
        if step == steps:
            break
        st = torch.randint(0, len(train) - 257, (8,), generator=g)
        x = train[st[:, None] + torch.arange(256)]
        y = train[st[:, None] + torch.arange(1, 257)]
        loss, _ = m.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.update_router_bias(rate)
    return out


def trade_off(ends: dict[str, dict]) -> str:
    """What the final rows say about balance against agreement, in one sentence read off the figures."""
    most = min(ends, key=lambda n: ends[n]["max_over_mean_load"])
    least = max(ends, key=lambda n: ends[n]["max_over_mean_load"])
    a, b = ends[most], ends[least]
    if most == least or a["bf16"] >= b["bf16"]:
        return "Here the most balanced run did not agree less with fp32 than the least balanced one."
    return (f"The most balanced run ({most}, load {a['max_over_mean_load']:.1f}x) agrees with fp32 on "
            f"{a['bf16']:.1%} of expert sets, the least balanced ({least}, {b['max_over_mean_load']:.1f}x) on "
            f"{b['bf16']:.1%}: by equalising the experts' scores the bias shrinks the margin between the k-th and the "
            f"(k+1)-th expert (median {a['kth_gap_median']:.1e} against {b['kth_gap_median']:.1e}), so a bf16 "
            "rounding of the hidden state flips the choice more often. A balanced router and bf16 routes that match "
            "fp32 on 99% of decisions pull against each other; Rollout Router Replay "
            "(`docs/benchmarks/r3_consistency.md`) removes the mismatch where it matters, in RL.")


def rate_name(rate: float) -> str:
    return "bias off" if rate == 0 else f"bias rate {rate:g}" + (" (default)" if rate == 1e-3 else "")


def plot(results: dict, trained: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if trained else 1, figsize=(13 if trained else 8, 3.8), squeeze=False)
    ax = axes[0, 0]
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
    if trained:
        ax = axes[0, 1]
        for name, rows in trained.items():
            ax.plot([r["step"] for r in rows], [100 * r["bf16"] for r in rows], marker="o", label=f"{name}, bf16")
        ax.axhline(99, color="gray", ls="--", lw=1)
        ax.set_xlabel("training step (64 experts top-6, hidden 256)")
        ax.set_ylabel("same expert set as fp32 (%)")
        ax.set_title("Along brief training, by balancing bias rate")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "elastic_family" / "fixed"))
    ap.add_argument("--out", default=str(DOCS))
    ap.add_argument("--train-steps", type=int, default=200, help="0: skip the training section")
    ap.add_argument("--bias-rates", default="1e-3,3e-4,1e-4,0", help="balancing bias rates of the training section")
    ap.add_argument("--workers", type=int, default=2, help="rates trained at once (one thread each)")
    args = ap.parse_args()
    try:
        rates = [float(r) for r in args.bias_rates.split(",")]
        if not rates or any(r < 0 for r in rates):
            raise ValueError
    except ValueError:
        raise SystemExit(f"route_agreement.py: error: --bias-rates needs non-negative numbers, got {args.bias_rates!r}") from None
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
    trained, train_md = {}, ""
    if args.train_steps > 0:
        from concurrent.futures import ProcessPoolExecutor

        every = max(1, args.train_steps // 2)
        with ProcessPoolExecutor(max(1, min(args.workers, len(rates)))) as pool:
            runs = [pool.submit(train_and_compare, rate, args.train_steps, every, i) for i, rate in enumerate(rates)]
            for rate, run in zip(rates, runs):
                trained[rate_name(rate)] = run.result()
        rows = [[name, r["step"], f"{r['bf16']:.2%}", f"{r['autocast']:.2%}", f"{r['bf16_experts']:.2%}",
                 f"{r['kth_gap_median']:.1e}", f"{r['kth_gap_below_1e-4']:.1%}", f"{r['max_over_mean_load']:.2f}"]
                for name, rs in trained.items() for r in rs]
        ends = {name: rs[-1] for name, rs in trained.items()}
        start = next(iter(trained.values()))[0]
        reading = "; ".join(f"{name}: bf16 {e['bf16']:.1%}, load {e['max_over_mean_load']:.1f}x, median gap "
                            f"{e['kth_gap_median']:.1e}" for name, e in ends.items())
        train_md = "\n".join([
            "## Along brief training: the balancing bias packs the k-th and (k+1)-th scores together", "",
            f"The GPU shape in miniature (`MINI` in the script: hidden 256, 4 layers, 64 experts top-6, 2 shared, byte "
            f"vocabulary), AdamW lr 1e-3 on 8 x 256 bytes of the standard-library source per step, {args.train_steps} "
            "steps, the aux-loss-free bias updated every step at each rate (1e-3 is the pre-training default, 0 is "
            "off). Measured on 4 x 256 held-out bytes. Gap: fp32 selection score (router probability + bias) of the "
            "k-th chosen expert minus the best unchosen one; load: the most-chosen expert's count over the mean, "
            "averaged over layers.", "",
            md_table(["run", "step", "bf16 same set", "autocast same set", "bf16 chosen experts in common",
                      "median k-th gap", "gaps < 1e-4", "max / mean load"], rows), "",
            f"At step {args.train_steps}: {reading} (step 0: bf16 {start['bf16']:.1%}, load "
            f"{start['max_over_mean_load']:.1f}x).", "", trade_off(ends), ""])
        for name, e in ends.items():
            headline[f"trained {args.train_steps} steps, {name} / bf16"] = round(e["bf16"], 4)
            headline[f"trained {args.train_steps} steps, {name} / max_over_mean_load"] = round(e["max_over_mean_load"], 2)
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

{train_md}"""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, trained, out / "route_agreement.png")
    write_report("route_agreement", md, headline, out)


if __name__ == "__main__":
    main()
