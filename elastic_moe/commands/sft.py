"""`elastic-moe sft [CONFIG.toml] --out RUN_DIR [--init CKPT]`: supervised fine-tuning on task demonstrations."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "supervised fine-tuning on task demonstrations (post-training stage 1); run again to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: RUN_DIR/config.toml when resuming, else the "
                                             "packaged configs/sft.toml)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, report.md")
    p.add_argument("--init", help="pre-trained checkpoint or run directory to start from (init)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.batch_size=16 --set data.domains=['reasoning']")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.sft import DEFAULT_CONFIG, SFTConfig, train_sft
    from elastic_moe.tomlconfig import load_config

    out = Path(args.out)
    path = args.config or (out / "config.toml" if (out / "config.toml").is_file() else DEFAULT_CONFIG)
    cfg = load_config(SFTConfig, path, args.set)
    if args.init is not None:
        cfg.init = args.init
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    summary = train_sft(cfg, out)
    return 130 if summary["interrupted"] else 0
