"""`elastic-moe posttrain [PIPELINE.toml] --out DIR [--init PRETRAINED]`: SFT -> domain experts -> OPD -> general RL."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "four-stage post-training (SFT, domain experts, multi-teacher OPD, general RL) with lineage and a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="pipeline TOML (default: the settings in DIR/pipeline.json when resuming, "
                                             "else the packaged configs/posttrain_tiny.toml)")
    p.add_argument("--out", required=True, metavar="DIR", help="pipeline directory: one folder per stage, report.md")
    p.add_argument("--init", help="pre-trained checkpoint or run directory (init)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="skip the baselines (mixed multi-task RL, weight averaging); a re-run keeps the saved choice")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set opd.steps=10 --set opd.loss.kind=sampled")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.atomic import read_json
    from elastic_moe.commands.run_args import note_cpu_only, refuse_other_command
    from elastic_moe.posttrain import load_pipeline_config, run_pipeline

    note_cpu_only("posttrain")
    refuse_other_command(args.out, "posttrain")
    saved = Path(args.out) / "pipeline.json"
    if args.config is None and saved.is_file():  # a re-run of a pipeline: its own settings, as the other commands
        from elastic_moe.errors import UserError
        from elastic_moe.posttrain import PipelineConfig
        from elastic_moe.tomlconfig import apply_overrides, from_dict

        data = read_json(saved).get("config")
        if not isinstance(data, dict):
            raise UserError(f"{saved} is corrupt (no config); remove it to make it again")
        cfg = from_dict(PipelineConfig, apply_overrides(data, args.set))
        print(f"settings from {saved}")
    else:
        cfg = load_pipeline_config(args.config, args.set)
    if args.quick is None and saved.is_file():  # a re-run, with its config file named again or not
        args.quick = read_json(saved).get("quick") is True
    report = run_pipeline(cfg, args.out, quick=bool(args.quick), init=args.init)
    print(f"report: {report}")
    return 0
