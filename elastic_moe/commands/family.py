"""`elastic-moe family CKPT [--out DIR]`: measure the sub-model family of a checkpoint (table + Pareto plots)."""

from __future__ import annotations

import argparse
from pathlib import Path

from elastic_moe.commands import arg_types as types

HELP = "measure every sub-model (layers x experts x top-k): loss, params, latency, memory; table and Pareto plots"


def int_list(text: str) -> list[int]:
    from elastic_moe.errors import UserError

    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:  # "," would otherwise mean "every value" without a word
        raise UserError(f"expected comma-separated integers, got {text!r}")
    return values


def add_measure_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--batch-sizes", default="1", help="batch sizes to time, e.g. 1,8 (default 1)")
    g.add_argument("--prompt-len", type=int, default=64, help="prompt tokens for prefill latency (default 64)")
    g.add_argument("--decode-tokens", type=int, default=8, help="decode steps per timed generation (default 8)")
    g.add_argument("--repeats", type=types.int_at_least(1), default=10, help="timed generations per sub-model and batch size")
    g.add_argument("--quantile", type=types.finite_float, default=0.5, help="reported quantile of the step times (default: median)")
    g.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="auto: CPU time for a one-thread CPU model (robust on a shared machine), else wall time")
    g.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the loss (default 8)")
    g.add_argument("--eval-batch-size", type=int, default=8)
    g.add_argument("--tasks", help="also measure accuracy on this task suite: reasoning, code, agent, open_ended")
    g.add_argument("--num-tasks", type=int, default=16)
    g.add_argument("--task-tokens", type=int, default=48, help="max new tokens per task answer")
    g.add_argument("--objective", choices=("loss", "accuracy"), default="loss",
                   help="quality for the frontier: held-out loss, or task accuracy (needs --tasks)")
    g.add_argument("--data", help="corpus for held-out text (default: the run's own data settings)")
    g.add_argument("--device", type=types.device, default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=types.threads, default=1,
                   help="torch CPU threads (default 1: one-core latency, timed in CPU time; 0: torch's default)")
    g.add_argument("--no-progress", action="store_true")


def measure_config(args):
    from elastic_moe.measure import MeasureConfig

    return MeasureConfig(batch_sizes=tuple(int_list(args.batch_sizes)), prompt_len=args.prompt_len,
                         decode_tokens=args.decode_tokens, repeats=args.repeats, quantile=args.quantile, clock=args.clock, eval_batches=args.eval_batches,
                         eval_batch_size=args.eval_batch_size, tasks=args.tasks, num_tasks=args.num_tasks,
                         task_tokens=args.task_tokens)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder or run directory (its latest checkpoint)")
    p.add_argument("--out", help="output folder (default: CKPT/family, where `extract` looks for it)")
    g = p.add_argument_group("space")
    g.add_argument("--layers", help="kept-layer counts, e.g. 2,3,4 (default: all)")
    g.add_argument("--experts", help="experts kept per MoE layer, e.g. 4,6,8 (default: all)")
    g.add_argument("--top-k", help="top-k values, e.g. 1,2 (default: 1..moe_k)")
    g.add_argument("--per-layer-top-k", action="store_true", help="also every per-MoE-layer mix of the top-k values")
    g.add_argument("--search", choices=("auto", "grid", "halving"), default="auto",
                   help="auto: the full grid up to --max-measured sub-models, successive halving above")
    g.add_argument("--max-measured", type=types.int_at_least(1), default=64, help="sub-models to time at most (default 64)")
    g.add_argument("--fresh", action="store_true", help="ignore cached measurements")
    add_measure_arguments(p)


def run(args) -> int:
    import torch

    from elastic_moe.errors import UserError
    from elastic_moe.family import Space, load_inputs, run_family

    if args.data == "":  # Path("") is the current folder
        raise UserError("--data is empty: give the corpus file or folder, or leave --data out (the run's own data)")
    if args.threads:
        torch.set_num_threads(args.threads)
    mc = measure_config(args)
    mc.validate()
    if args.out:  # before the checkpoint and the corpus are read
        refuse_out(Path(args.out), args.data)
    inp = load_inputs(args.ckpt, args.data, args.device, mc.eval_batch_size, mc.eval_batches)
    space = Space(int_list(args.layers) if args.layers else None, int_list(args.experts) if args.experts else None,
                  int_list(args.top_k) if args.top_k else None, args.per_layer_top_k)
    out = Path(args.out) if args.out else Path(inp.checkpoint) / "family"
    refuse_out(out, inp.corpus)  # the run's own corpus, now that it is known
    res = run_family(inp, out, space, mc, args.search, args.max_measured, args.objective,
                     progress=not args.no_progress, fresh=args.fresh)
    print_summary(res)
    print(f"wrote {out / 'family.csv'}, {out / 'family.jsonl'}, " + ", ".join(str(p) for p in res.plots))
    return 0


def refuse_out(out: Path, corpus: str | None) -> None:
    """A family folder holds one family's table, cache and plots: not another command's run, not a folder of other
    files, not a folder inside the corpus (the next run would read the table as text)."""
    from elastic_moe.atomic import refuse_inside_corpus
    from elastic_moe.commands.run_args import SIGNATURES
    from elastic_moe.errors import UserError
    from elastic_moe.family import CACHE, META, PLOTS, TABLE

    refuse_inside_corpus(out, corpus)
    if not out.is_dir():
        if out.exists():
            raise UserError(f"{out} exists and is not a folder; use another --out")
        return
    for name in ("config.toml", *SIGNATURES.values()):
        if (out / name).exists():
            raise UserError(f"{out} holds a run of another command ({name}); use another --out")
    mine = {TABLE, META, CACHE, "family.csv", *PLOTS}
    others = sorted(p.name for p in out.iterdir() if p.name not in mine and not p.name.startswith("."))
    if others:
        raise UserError(f"{out} is not empty and holds no family table (it has {', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); use a new or empty --out")


def print_summary(res) -> None:
    meta = res.meta
    col = meta["latency_col"]
    q = "accuracy" if meta.get("objective") == "accuracy" else "loss"
    front = [r for r in res.rows if r.get(f"front_{col}")]
    print(f"frontier ({q} vs {col}): {len(front)} of {len(res.rows)} sub-models")
    print(f"  {'name':<14} {q:>8} {'active M':>9} {'total M':>8} {col:>13}")
    for r in sorted(front, key=lambda r: r[col]):
        print(f"  {r['name']:<14} {r[q]:8.4f} {r['active_params'] / 1e6:9.3f} {r['total_params'] / 1e6:8.3f} "
              f"{r[col]:13.3f}")
