"""`elastic-moe extract CKPT OUT --max-latency-ms X`: the best measured sub-model under a budget, standalone."""

from __future__ import annotations

import argparse

from elastic_moe.commands import arg_types as types
from elastic_moe.commands import export

HELP = "write the best measured sub-model under a parameter, latency or memory budget as a standalone model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder or run directory (its latest checkpoint)")
    p.add_argument("out", help="output checkpoint folder")
    g = p.add_argument_group("budget (exactly one)").add_mutually_exclusive_group(required=True)
    g.add_argument("--max-total-params", help="e.g. 1.5M, 300k, 2e6")
    g.add_argument("--max-active-params", help="parameters one token uses, e.g. 800k")
    g.add_argument("--max-latency-ms", type=types.finite_float, help="measured latency (decode ms per token unless --latency prefill)")
    g.add_argument("--max-memory-mb", type=types.finite_float, help="measured peak memory of generation (weights + activations + KV)")
    p.add_argument("--latency", choices=("decode", "prefill"), default="decode")
    p.add_argument("--batch-size", type=types.int_at_least(1), default=1, help="batch size of the latency / memory budget (default 1)")
    p.add_argument("--objective", choices=("loss", "accuracy"), default="loss")
    p.add_argument("--family", help="family table folder (default: CKPT/family; measured there if missing)")
    p.add_argument("--hf", metavar="HF_DIR", help="also write a Hugging Face Ernie4_5_MoeForCausalLM folder")
    p.add_argument("--hf-dtype", choices=export.DTYPES, default="float32",
                   help="weights' dtype in HF_DIR (default float32; the router stays fp32)")
    p.add_argument("--heal", type=types.int_at_least(0), default=0, metavar="TOKENS",
                   help="continue pre-training the extracted model for about this many tokens (reports loss before/after)")
    p.add_argument("--heal-lr", type=types.positive_float, help="learning rate of --heal (default: the run's final learning rate)")
    p.add_argument("--bias-rate", type=types.positive_float, help="router bias update rate for re-balancing (default: 10x the run's "
                   "train.router_bias_rate)")
    p.add_argument("--rebalance-batches", type=types.int_at_least(0), default=4, help="training batches for re-balancing; 0: only reset "
                                                                     "the load counters")
    p.add_argument("--data", help="corpus for held-out text (default: the run's own data settings)")
    p.add_argument("--device", type=types.device, default="auto")
    p.add_argument("--threads", type=types.threads, default=1, help="torch CPU threads, as for `family` (default 1; 0: torch's "
                                                         "default); re-timing uses the family table's")
    p.add_argument("--force", action="store_true", help="replace existing OUT / HF_DIR")
    p.add_argument("--no-progress", action="store_true")


def budget_from_args(args):
    from elastic_moe.extract import Budget, parse_count

    if args.max_total_params is not None:
        return Budget("total_params", parse_count(args.max_total_params))
    if args.max_active_params is not None:
        return Budget("active_params", parse_count(args.max_active_params))
    if args.max_latency_ms is not None:
        return Budget("latency_ms", args.max_latency_ms, args.batch_size, args.latency)
    return Budget("memory_mb", args.max_memory_mb, args.batch_size)


def run(args) -> int:
    import torch

    from elastic_moe.checkpoint import find_checkpoint
    from elastic_moe.errors import UserError
    from elastic_moe.extract import extract_under_budget
    from elastic_moe.family import load_inputs, load_table

    if args.data == "":  # Path("") is the current folder
        raise UserError("--data is empty: give the corpus file or folder, or leave --data out (the run's own data)")
    for what, path in (("OUT", args.out), ("--hf", args.hf)):
        if path == "":  # the current folder: refused as occupied, with --force suggested to replace it
            raise UserError(f"{what} is empty: give the folder to write the sub-model to")
    if args.heal_lr is not None and not args.heal:
        raise UserError("--heal-lr is the learning rate of --heal: pass --heal TOKENS too")
    if args.hf_dtype != "float32" and not args.hf:
        raise UserError("--hf-dtype is the dtype of the Hugging Face folder: pass --hf HF_DIR too")
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = budget_from_args(args)
    # the held-out batches the family table measured its losses on (when there is a table), so that the
    # re-balancing's "before" loss is the table's
    table = load_table(args.family or find_checkpoint(args.ckpt) / "family")
    measured = table[1].get("measure") if table and isinstance(table[1], dict) else None
    sizes = [measured.get(k) if isinstance(measured, dict) else None for k in ("eval_batch_size", "eval_batches")]
    size, count = (v if isinstance(v, int) and v >= 1 else 8 for v in sizes)  # a damaged table: the defaults
    if args.objective == "accuracy" and not (table and isinstance(table[1], dict)
                                             and table[1].get("objective") == "accuracy"):
        raise UserError("--objective accuracy ranks sub-models by a family table measured on a task suite: run "
                        "`elastic-moe family CKPT --objective accuracy --tasks DOMAIN` first (its folder: --family)")
    inp = load_inputs(args.ckpt, args.data, args.device, eval_batch_size=size, eval_batches=count)
    extract_under_budget(inp, args.out, budget, family_dir=args.family, hf_dir=args.hf, hf_dtype=args.hf_dtype,
                         objective=args.objective,
                         heal_tokens=args.heal, heal_lr=args.heal_lr, rebalance_rate=args.bias_rate,
                         rebalance_batches=args.rebalance_batches, force=args.force, progress=not args.no_progress)
    return 0
