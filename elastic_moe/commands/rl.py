"""`elastic-moe rl [CONFIG.toml] --out RUN_DIR [--init SFT_CKPT]`: GRPO training of one domain expert."""

from __future__ import annotations

import argparse

from elastic_moe.commands.run_args import add_run_arguments, load_run_config, note_cpu_only

HELP = "GRPO training of a domain expert from an SFT checkpoint (rollout engine, reward pool, R3); run again to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "configs/rl_reasoning.toml", "--set rollout.group_size=8 --set grpo.kl_coef=0.01",
                      init_help="SFT checkpoint or run directory to start from (init)")
    p.add_argument("--r3", choices=["on", "off"], help="Rollout Router Replay (grpo.r3)")
    p.add_argument("--numerics", choices=["unified", "mismatch"], help="numerics.mode")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.rl_train import DEFAULT_CONFIG, RLConfig, train_rl
    from elastic_moe.runloop import raise_if_stopped

    note_cpu_only("rl")
    cfg = load_run_config(RLConfig, DEFAULT_CONFIG, args, "rl")
    if args.r3 is not None:
        cfg.grpo.r3 = args.r3 == "on"
    if args.numerics is not None:
        cfg.numerics.mode = args.numerics
    summary = train_rl(cfg, args.out)
    raise_if_stopped(summary)
    return 0
