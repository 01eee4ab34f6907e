"""What the training commands (pretrain, sft, rl) share: the config / --out / resume / --set arguments and how a run's
config is found (the given file, else RUN_DIR/config.toml when resuming, else the packaged default)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_run_arguments(p: argparse.ArgumentParser, default_config: str, set_example: str,
                      init_help: str | None = None) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: RUN_DIR/config.toml when resuming, else the "
                                             f"packaged {default_config})")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoints, metrics.jsonl, report.md")
    if init_help:
        p.add_argument("--init", help=init_help)
    p.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. {set_example}")


def note_cpu_only(command: str) -> None:
    """Post-training commands train on the CPU; on a machine with a GPU, say so rather than leave it idle unsaid."""
    import sys

    import torch

    if torch.cuda.is_available():
        print(f"note: `elastic-moe {command}` trains on the CPU (the GPU is used by pretrain, family, extract and "
              "generate)", file=sys.stderr)


# the file each command that owns a whole folder leaves in it (the training commands leave config.toml)
SIGNATURES = {"posttrain": "pipeline.json", "quickstart": ".stages"}
RUN_START = {"tokenizer", "config.json", "lost+found"}  # what may precede a training command's config.toml


def refuse_other_command(out: Path, command: str, cls=None, upgrade=None, inputs=()) -> None:
    """A run folder holds the run of one command: a folder that another command wrote is refused in one line, before
    anything is written (its report, metrics and checkpoints would be mixed with or replaced by this command's).
    `cls` is this command's config class: a config.toml in the folder must be one of it (after `upgrade(data)`,
    which brings the settings of an older version up to date). `inputs` (the config file, the corpus) may sit in a
    first run's folder."""
    from elastic_moe.errors import UserError
    from elastic_moe.tomlconfig import from_dict, read_toml

    out = Path(out)
    for owner, name in SIGNATURES.items():
        if owner != command and (out / name).exists():
            raise UserError(f"{out} holds a run of `elastic-moe {owner}` ({name}); use another --out")
    toml = out / "config.toml"
    if not toml.is_file():
        # a training command's folder is its run alone: anything but what a first session killed before writing
        # config.toml can leave (the lock, the tokenizer, config.json, temporary files), hidden files and the
        # command's own inputs belongs to something else
        mine = {out / Path(p).resolve().relative_to(out.resolve()).parts[0] for p in inputs
                if p and out.resolve() in Path(p).resolve().parents}
        others = sorted(p.name for p in out.iterdir() if p.name not in RUN_START and not p.name.startswith(".")
                        and p not in mine) if out.is_dir() else []
        if cls is not None and others:
            raise UserError(f"{out} is not empty and holds no run of `elastic-moe {command}` (no config.toml; it has "
                            f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): use a new or empty --out")
        return
    if cls is None:
        raise UserError(f"{out} holds a run of another command ({toml}); use another --out")
    import dataclasses

    data = read_toml(toml)  # a damaged file is named as such ("malformed config ...")
    if upgrade is not None:
        upgrade(data)
    if not set(data) <= {f.name for f in dataclasses.fields(cls)}:  # sections of another command's config
        raise UserError(f"{out} holds a run of another command ({toml}: sections {', '.join(sorted(data))}); "
                        "use another --out")
    try:
        from_dict(cls, data)
    except UserError as e:
        raise UserError(f"{out} holds a run whose settings are not this command's ({toml}: {e}); use another "
                        "--out") from None


def load_run_config(cls, default_path: Path, args: argparse.Namespace, command: str):
    """The run's config with the common command-line overrides applied."""
    from elastic_moe.tomlconfig import load_config

    out = Path(args.out)
    refuse_other_command(out, command, cls, inputs=(args.config, getattr(args, "data", None)))
    path = args.config or (out / "config.toml" if (out / "config.toml").is_file() else default_path)
    overrides = list(args.set)  # the flags go last, so they win, and through the same checks as --set
    if getattr(args, "init", None) is not None:
        overrides.append(f"init={json.dumps(args.init)}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    return load_config(cls, path, overrides)
