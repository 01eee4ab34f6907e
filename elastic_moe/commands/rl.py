"""`elastic-moe rl [CONFIG.toml] --out RUN_DIR [--init SFT_CKPT]`: GRPO training of one domain expert."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "GRPO training of a domain expert from an SFT checkpoint (rollout engine, reward pool, R3); run again to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: RUN_DIR/config.toml when resuming, else the "
                                             "packaged configs/rl_reasoning.toml)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, report.md")
    p.add_argument("--init", help="SFT checkpoint or run directory to start from (init)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--r3", choices=["on", "off"], help="Rollout Router Replay (grpo.r3)")
    p.add_argument("--numerics", choices=["unified", "mismatch"], help="numerics.mode")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set rollout.group_size=8 --set grpo.kl_coef=0.01")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.grpo_trainer import DEFAULT_CONFIG, RLConfig, train_rl
    from elastic_moe.tomlconfig import load_config

    out = Path(args.out)
    path = args.config or (out / "config.toml" if (out / "config.toml").is_file() else DEFAULT_CONFIG)
    cfg = load_config(RLConfig, path, args.set)
    if args.init is not None:
        cfg.init = args.init
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.r3 is not None:
        cfg.grpo.r3 = args.r3 == "on"
    if args.numerics is not None:
        cfg.numerics.mode = args.numerics
    summary = train_rl(cfg, out)
    return 130 if summary["interrupted"] else 0
