"""elastic-moe quickstart [--out DIR]: the whole path on the embedded default corpus, ending with a report.

pre-train (tiny elastic config) -> measure the sub-model family -> extract one under a budget (+ Hugging Face
folder) -> post-train -> report.md. Every stage is resumable and skipped once its output exists.
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
                   help="extraction budget: this fraction of the full model's active parameters (default 0.8)")
    p.add_argument("--skip-posttrain", action="store_true")


def _stage(out: Path, name: str, fn) -> dict:
    """Run `fn` once: its result is kept in OUT/.stages/NAME.json, and a finished stage is not run again."""
    marker = out / ".stages" / f"{name}.json"
    if marker.is_file():
        print(f"[quickstart] {name}: done already, skipped")
        return json.loads(marker.read_text())
    print(f"[quickstart] {name} ...", flush=True)
    t0 = time.perf_counter()
    result = fn() or {}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    from elastic_moe.atomic import atomic_write_json

    atomic_write_json(marker, result)
    return result


def _cli(*argv: str) -> None:
    from elastic_moe.cli import main
    from elastic_moe.errors import UserError

    code = main(list(argv))
    if code:
        raise UserError(f"stage `elastic-moe {' '.join(argv[:1])}` failed with exit code {code}")


def run(args) -> int:
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
    timings = {"pretrain": _stage(out, "pretrain", lambda: _cli("pretrain", "--out", str(pre), *steps))}
    ckpt = find_checkpoint(pre)
    # a small slice of the space keeps the demo to a minute; `elastic-moe family CKPT` measures all of it
    timings["family"] = _stage(out, "family", lambda: _cli(
        "family", str(ckpt), "--out", str(out / "family"), "--layers", "2,3,4", "--experts", "4,8", "--top-k", "1,2",
        "--repeats", "3", "--no-progress"))
    cfg = ModelConfig.from_dict(read_meta(ckpt)["model"])
    budget = int(args.active_frac * cfg.num_params(active=True))
    timings["extract"] = _stage(out, "extract", lambda: _cli(
        "extract", str(ckpt), str(out / "extracted"), "--max-active-params", str(budget), "--family",
        str(out / "family"), "--hf", str(out / "extracted-hf"), "--force", "--no-progress"))
    post_report = None
    if not args.skip_posttrain:
        from elastic_moe.posttrain import run_quickstart_posttrain

        res = _stage(out, "posttrain", lambda: {"report": str(run_quickstart_posttrain(ckpt, out / "posttrain"))})
        post_report = res.get("report")
        timings["posttrain"] = res
    report = _report(out, pre, ckpt, budget, cfg, timings, post_report)
    atomic_write_text(out / "report.md", report)
    print(f"[quickstart] report: {out / 'report.md'}")
    return 0


def _report(out: Path, pre: Path, ckpt: Path, budget: int, cfg, timings: dict, post_report) -> str:
    import csv

    lines = ["# elastic-moe quickstart report", ""]
    lines += [f"Run folder: `{out}`. Stage wall times: " + ", ".join(f"{k} {v.get('seconds', 0):.0f} s" for k, v in timings.items()), ""]
    lines += ["## 1. Elastic pre-training", "",
              f"{cfg.num_params() / 1e6:.2f} M parameters ({cfg.num_params(active=True) / 1e6:.2f} M active), "
              f"{cfg.num_hidden_layers} layers, {cfg.moe_num_experts} experts, top-{cfg.moe_k}; "
              f"checkpoint `{ckpt}`. Full report: [pretrain/report.md](pretrain/report.md).", "",
              "![loss](pretrain/loss.png)", ""]
    fam = out / "family" / "family.csv"
    if fam.is_file():
        rows = list(csv.DictReader(fam.open()))
        lines += ["## 2. The sub-model family, measured on this machine", "",
                  f"{len(rows)} sub-models measured; the table is `family/family.csv`. Pareto frontier: "
                  "quality against active parameters and against measured latency.", "",
                  "![quality vs active](family/quality_vs_active.png)", "",
                  "![quality vs latency](family/quality_vs_latency.png)", ""]
    ext = out / "extracted" / "config.json"
    if ext.is_file():
        meta = json.loads(ext.read_text())
        chosen = meta.get("extract") or meta.get("extracted") or {}
        lines += ["## 3. Extracted under a budget", "",
                  f"Budget: at most {budget / 1e6:.2f} M active parameters. Standalone checkpoint `extracted/`, "
                  f"Hugging Face folder `extracted-hf/` (loads in transformers as `Ernie4_5_MoeForCausalLM`).", ""]
        if chosen:
            lines += ["```json", json.dumps(chosen, indent=2)[:3000], "```", ""]
    if post_report:
        lines += ["## 4. Post-training", "", f"See [{Path(post_report).relative_to(out)}]({Path(post_report).relative_to(out)}).", ""]
    return "\n".join(lines) + "\n"
