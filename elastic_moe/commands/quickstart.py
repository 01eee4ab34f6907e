"""elastic-moe quickstart [--out DIR]: the whole path on the embedded default corpus, ending with a report.

pre-train (tiny elastic config) -> measure the sub-model family -> extract one under a budget (+ Hugging Face
folder) -> post-train -> report.md. Every stage is resumable, and skipped once it has finished with the same
arguments; another budget re-runs the extraction, another --max-steps for the same --out is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = "tiny end-to-end run on the embedded corpus: pre-train, family, extract, post-train, report"


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--max-steps", type=int, help="pre-training steps (default: the tiny config's)")
    p.add_argument("--active-frac", type=float, default=0.8,
                   help="extraction budget: this fraction of the full model's active parameters (default 0.8; the "
                        "smallest sub-model the quickstart measures has about 0.7 of them on the tiny config, so a "
                        "lower fraction finds none)")
    p.add_argument("--skip-posttrain", action="store_true")


def _stage(out: Path, name: str, fn, inputs: dict, rerun_on_change: bool) -> dict:
    """Run `fn` once: its result and `inputs` (the arguments it depends on) are kept in OUT/.stages/NAME.json, and a
    finished stage is not run again with the same inputs. With other inputs it runs again if `rerun_on_change`, else
    the call is refused (a stage that later stages build on)."""
    from elastic_moe.atomic import atomic_write_json, read_json
    from elastic_moe.errors import UserError

    marker = out / ".stages" / f"{name}.json"
    if marker.is_file():
        done = read_json(marker)
        before = done.get("inputs", inputs)
        old = before.get("checkpoint")
        if old is not None and not (out / old).is_dir():  # a marker from before checkpoints were kept relative to OUT
            before = {**before, "checkpoint": _within(out, Path(old))}
        if before == inputs:
            print(f"[quickstart] {name}: done already, skipped")
            return done
        if not rerun_on_change:
            was = ", ".join(f"{k} {v}" for k, v in before.items())
            raise UserError(f"{out} was made with {name} {was}; give the same arguments again, or another --out")
        print(f"[quickstart] {name}: arguments changed, run again")
    print(f"[quickstart] {name} ...", flush=True)
    t0 = time.perf_counter()
    result = fn() or {}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["inputs"] = inputs
    atomic_write_json(marker, result)
    return result


def _within(out: Path, path: Path) -> str:
    """`path` relative to `out` when it lies inside it (how --out was spelled does not matter), else as given."""
    try:
        return str(path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _cli(*argv: str) -> None:
    from elastic_moe.cli import main
    from elastic_moe.errors import Interrupted, UserError

    code = main(list(argv))
    if code > 128:  # the stage stopped on a signal (it said so); the quickstart stops the same way
        raise Interrupted(f"stage `elastic-moe {argv[0]}`; run the same command again to resume", code - 128)
    if code:
        raise UserError(f"stage `elastic-moe {' '.join(argv[:1])}` failed with exit code {code}")


def run(args) -> int:
    from elastic_moe.atomic import run_lock
    from elastic_moe.commands.run_args import refuse_other_command

    refuse_other_command(Path(args.out), "quickstart")
    with run_lock(args.out):  # one command at a time on a folder
        return _run(args)


def _run(args) -> int:
    from elastic_moe.atomic import atomic_write_text
    from elastic_moe.checkpoint import find_checkpoint, read_meta
    from elastic_moe.config import ModelConfig
    from elastic_moe.errors import UserError

    if not 0 < args.active_frac <= 1:  # checked before the minutes of pre-training it would otherwise follow
        raise UserError(f"--active-frac {args.active_frac} must be in (0, 1]")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps {args.max_steps} must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = out / "pretrain"
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    # the later stages build on the pre-trained checkpoint: another --max-steps for the same --out is refused
    timings = {"pretrain": _stage(out, "pretrain", lambda: _cli("pretrain", "--out", str(pre), *steps),
                                  {"--max-steps": args.max_steps or "default"}, rerun_on_change=False)}
    ckpt = find_checkpoint(pre)
    same_ckpt = {"checkpoint": _within(out, ckpt)}  # the same folder however --out was spelled
    # a small slice of the space keeps the demo to a minute; `elastic-moe family CKPT` measures all of it
    timings["family"] = _stage(out, "family", lambda: _cli(
        "family", str(ckpt), "--out", str(out / "family"), "--layers", "2,3,4", "--experts", "4,8", "--top-k", "1,2",
        "--repeats", "3", "--no-progress"), same_ckpt, rerun_on_change=True)
    cfg = ModelConfig.from_dict(read_meta(ckpt)["model"])
    budget = int(args.active_frac * cfg.num_params(active=True))
    timings["extract"] = _stage(out, "extract", lambda: _cli(
        "extract", str(ckpt), str(out / "extracted"), "--max-active-params", str(budget), "--family",
        str(out / "family"), "--hf", str(out / "extracted-hf"), "--force", "--no-progress"),
        {**same_ckpt, "--active-frac": args.active_frac}, rerun_on_change=True)
    post_report = None
    if not args.skip_posttrain:
        from elastic_moe.posttrain import run_quickstart_posttrain

        # the report's path is kept relative to OUT, like the checkpoint's: the same run however --out is spelled
        res = _stage(out, "posttrain", lambda: {"report": _within(out, run_quickstart_posttrain(ckpt, out / "posttrain"))},
                     same_ckpt, rerun_on_change=False)
        post_report = res.get("report")
        timings["posttrain"] = res
    report = _report(out, pre, ckpt, budget, cfg, timings, post_report)
    atomic_write_text(out / "report.md", report)
    print(f"[quickstart] report: {out / 'report.md'}")
    return 0


def _report(out: Path, pre: Path, ckpt: Path, budget: int, cfg, timings: dict, post_report) -> str:
    """report.md: what each stage produced, as tables read from the stages' own outputs."""
    from elastic_moe.family import load_table
    from elastic_moe.metrics import read_metrics

    total_s = sum(v.get("seconds", 0) for v in timings.values())
    lines = ["# elastic-moe quickstart report", "",
             f"Run folder `{out}`; {total_s:.0f} s of stages in all ("
             + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" for k, v in timings.items()) + ").", ""]

    rows = read_metrics(pre)
    evals = next(({k[5:-5]: v for k, v in r.items() if k.startswith("eval/") and k.endswith("/loss")}
                  for r in reversed(rows) if any(k.startswith("eval/") for k in r)), {})
    last = rows[-1] if rows else {}
    lines += ["## 1. Elastic pre-training", "",
              f"{cfg.num_params() / 1e6:.2f} M parameters ({cfg.num_params(active=True) / 1e6:.2f} M active), "
              f"{cfg.num_hidden_layers} layers, {cfg.moe_num_experts} experts, top-{cfg.moe_k}, trained for "
              f"{last.get('step', 0)} steps on {last.get('tokens', 0):,} tokens. Checkpoint `{ckpt}`; full report "
              "[pretrain/report.md](pretrain/report.md).", ""]
    if evals:
        full = evals.get("full")
        lines += ["Held-out loss of sub-models trained together in this one run:", "",
                  "| sub-model | held-out loss | / full |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {v / full:.4f} |" if full else f"| {k} | {v:.4f} | - |" for k, v in evals.items()]
        lines.append("")
    lines += ["![loss](pretrain/loss.png)", ""]

    table = load_table(out / "family")
    fam_rows = table[0] if table else []
    full_row = next((r for r in fam_rows if r["name"] == "full"), None)
    if fam_rows:
        front = sorted((r for r in fam_rows if r.get("front_active_params")), key=lambda r: r["active_params"])
        lines += ["## 2. The sub-model family, measured on this machine", "",
                  f"{len(fam_rows)} sub-models measured (every row: `family/family.csv`). The frontier of held-out "
                  "loss against active parameters:", "",
                  "| sub-model | active params (M) | held-out loss | decode ms/token (batch 1) | memory MB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['active_params'] / 1e6:.3f} | {r['loss']:.4f} | {r['decode_ms_b1']:.2f} "
                  f"| {r['memory_mb_b1']:.1f} |" for r in front]
        lines += ["", "![quality vs active](family/quality_vs_active.png)", "",
                  "![quality vs latency](family/quality_vs_latency.png)", ""]

    ext = out / "extracted" / "config.json"
    if ext.is_file():
        chosen = json.loads(ext.read_text()).get("extract") or {}
        pick = chosen.get("family_row") or {}
        lines += ["## 3. Extracted under a budget", "",
                  f"Budget: at most {budget / 1e6:.3f} M active parameters. Chosen: **{chosen.get('name', '?')}**. "
                  "Standalone checkpoint `extracted/`, Hugging Face folder `extracted-hf/` (loads in transformers as "
                  "`Ernie4_5_MoeForCausalLM`).", ""]
        if pick and full_row:
            lines += ["| | full model | extracted | extracted / full |", "|---|---|---|---|"]
            for label, key, fmt in (("total params (M)", "total_params", "{:.3f}"),
                                    ("active params (M)", "active_params", "{:.3f}"),
                                    ("held-out loss", "loss", "{:.4f}"),
                                    ("decode ms/token (batch 1)", "decode_ms_b1", "{:.2f}"),
                                    ("memory MB (batch 1)", "memory_mb_b1", "{:.1f}")):
                a, b = full_row[key], pick[key]
                scale = 1e6 if key.endswith("params") else 1
                lines.append(f"| {label} | {fmt.format(a / scale)} | {fmt.format(b / scale)} | {b / a:.3f} |")
            lines.append("")
        if chosen.get("elastic_max_abs_diff") is not None:
            lines.append(f"- Its logits against the elastic forward at the same spec: max |diff| "
                         f"{chosen['elastic_max_abs_diff']:.2e}.")
        reb = chosen.get("rebalance") or {}
        if "max_over_mean_before" in reb:
            lines.append(f"- Router bias for the kept experts: {reb['action']}; busiest expert "
                         f"{reb['max_over_mean_before']:.2f}x -> {reb['max_over_mean_after']:.2f}x the mean load, "
                         f"held-out loss {reb['heldout_loss_before']:.4f} -> {reb['heldout_loss_after']:.4f}.")
        lines += ["", *_samples(ckpt, out / "extracted"), "Try it:", "", "```bash",
                  f"elastic-moe generate {out / 'extracted'} --prompt 'def parse(' --max-tokens 60",
                  "python -c \"from transformers import AutoModelForCausalLM as M; "
                  f"print(M.from_pretrained('{out / 'extracted-hf'}'))\"", "```", ""]

    if post_report:
        rel = Path(post_report)
        if rel.is_absolute() or not (out / rel).is_file():  # a marker from before: the path as --out was spelled
            rel = Path(_within(out, rel))
        lines += ["## 4. Post-training", "",
                  "SFT, then domain experts trained with RL on verifiable rewards, then on-policy distillation of "
                  f"the experts into one student, then general RL. Full report: [{rel}]({rel}).", ""]
        rep_json = (out / rel).with_suffix(".json")
        rep = json.loads(rep_json.read_text()) if rep_json.is_file() else {}
        scores, order = rep.get("scores", {}), rep.get("order", {})
        if scores:  # in the pipeline report's order (a report from before it recorded one: the pipeline's stages)
            rank = {"sft": 0, "opd": 2, "general": 3}
            stages = [s for s in order.get("stages") or sorted(scores, key=lambda s: (rank.get(s, 1), s)) if s in scores]
            domains = order.get("domains") or sorted({d for s in scores.values() for d in s})
            lines += ["Score (100 x mean reward on held-out tasks, greedy) per domain after each stage:", "",
                      "| domain | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
            lines += [f"| {d} | " + " | ".join(f"{scores[s].get(d, float('nan')):.1f}" for s in stages) + " |"
                      for d in domains]
            lines.append("")
        unchanged = rep.get("unchanged_stages") or []
        if unchanged:  # at this size and length a domain's rewards can all be equal: nothing to learn from
            lines += [f"No step updated the model in {', '.join(f'`{n}`' for n in unchanged)} (every group's "
                      "rewards were equal): those columns repeat the model each started from.", ""]
    return "\n".join(lines) + "\n"


def _samples(full_ckpt: Path, extracted: Path, prompt: str = "def parse(", tokens: int = 40) -> list[str]:
    """Greedy completions of one prompt by the full model and by the extracted one."""
    from elastic_moe.checkpoint import load_checkpoint
    from elastic_moe.generate import SamplingParams, generate
    from elastic_moe.tokenizer import Tokenizer

    lines = [f"Greedy completions of `{prompt}` ({tokens} tokens; a model this small, trained this briefly, has "
             "learned the look of Python more than its sense):", ""]
    for label, path in (("full model", full_ckpt), ("extracted", extracted)):
        model, meta = load_checkpoint(path)
        if not (Path(meta["path"]) / "tokenizer" / "tokenizer.json").is_file():
            return []  # nothing to turn text into tokens: the report goes without samples
        tok = Tokenizer.load(Path(meta["path"]) / "tokenizer")
        done = generate(model.eval(), [[tok.bos_id, *tok.encode(prompt)]],
                        SamplingParams(max_new_tokens=tokens, temperature=0.0), eos_id=tok.eos_id)[0]
        text = prompt + tok.decode([t for t in done.tokens if t != tok.eos_id])
        lines += [f"{label}:", "", "```python", text.replace("```", "'''"), "```", ""]
    return lines
