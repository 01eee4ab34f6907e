"""`elastic-moe pretrain [CONFIG.toml] --out RUN_DIR`: elastic MoE pre-training; the same command resumes."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "elastic (once-for-all) MoE pre-training; run the same command again to resume from RUN_DIR"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: RUN_DIR/config.toml when resuming, else the "
                                             "packaged configs/tiny.toml)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoints, metrics.jsonl, report.md")
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (train.save_every)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--data", help="corpus file or folder (data.path; default: Python's standard-library sources)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.batch_size=8 --set elastic.p_full=1.0")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import DEFAULT_CONFIG, TrainConfig, train

    out = Path(args.out)
    path = args.config or (out / "config.toml" if (out / "config.toml").is_file() else DEFAULT_CONFIG)
    cfg = load_config(TrainConfig, path, args.set)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.save_every is not None:
        cfg.train.save_every = args.save_every
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.data is not None:
        cfg.data.path = args.data
    summary = train(cfg, out)
    return 130 if summary["interrupted"] else 0
