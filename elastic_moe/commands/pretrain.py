"""`elastic-moe pretrain [CONFIG.toml] --out RUN_DIR`: elastic MoE pre-training; the same command resumes."""

from __future__ import annotations

import argparse

from elastic_moe.commands.run_args import add_run_arguments, load_run_config

HELP = "elastic (once-for-all) MoE pre-training; run the same command again to resume from RUN_DIR"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "configs/tiny.toml", "--set train.batch_size=8 --set elastic.p_full=1.0")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (train.save_every)")
    p.add_argument("--data", help="corpus file or folder of text files and .jsonl files (one JSON object per line, text in "
                                   "the field data.jsonl_field, default 'text'); default: Python's standard-library sources")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.errors import UserError
    from elastic_moe.runloop import raise_if_stopped
    from elastic_moe.train import DEFAULT_CONFIG, TrainConfig, train

    if args.data == "":  # Path("") is the current folder
        raise UserError("--data is empty: give the corpus file or folder, or leave --data out (the standard library)")
    cfg = load_run_config(TrainConfig, DEFAULT_CONFIG, args, "pretrain")
    if args.save_every is not None:
        cfg.train.save_every = args.save_every
    if args.data is not None:
        cfg.data.path = args.data
    summary = train(cfg, args.out)
    raise_if_stopped(summary)
    return 0
