"""`elastic-moe sft [CONFIG.toml] --out RUN_DIR [--init CKPT]`: supervised fine-tuning on task demonstrations."""

from __future__ import annotations

import argparse

from elastic_moe.commands.run_args import add_run_arguments, load_run_config, note_cpu_only

HELP = "supervised fine-tuning on task demonstrations (post-training stage 1); run again to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "configs/sft.toml", "--set train.batch_size=16 --set data.domains=['reasoning']",
                      init_help="pre-trained checkpoint or run directory to start from (init)")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.runloop import raise_if_stopped
    from elastic_moe.sft import DEFAULT_CONFIG, SFTConfig, train_sft

    note_cpu_only("sft")
    summary = train_sft(load_run_config(SFTConfig, DEFAULT_CONFIG, args, "sft"), args.out)
    raise_if_stopped(summary)
    return 0
