"""`elastic-moe posttrain [PIPELINE.toml] --out DIR [--init PRETRAINED]`: SFT -> domain experts -> OPD -> general RL."""

from __future__ import annotations

import argparse

HELP = "four-stage post-training (SFT, domain experts, multi-teacher OPD, general RL) with lineage and a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="pipeline TOML (default: the packaged configs/posttrain_tiny.toml)")
    p.add_argument("--out", required=True, metavar="DIR", help="pipeline directory: one folder per stage, report.md")
    p.add_argument("--init", help="pre-trained checkpoint or run directory (init)")
    p.add_argument("--quick", action="store_true", help="skip the baselines (mixed multi-task RL, weight averaging)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set opd.steps=10 --set opd.loss.kind=sampled")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.commands.run_args import refuse_other_command
    from elastic_moe.posttrain import load_pipeline_config, run_pipeline

    refuse_other_command(args.out, "posttrain")
    cfg = load_pipeline_config(args.config, args.set)
    report = run_pipeline(cfg, args.out, quick=args.quick, init=args.init)
    print(f"report: {report}")
    return 0
