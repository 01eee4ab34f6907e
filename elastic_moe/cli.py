"""`elastic-moe` console command: one subcommand per job, each in its own module under `elastic_moe.commands`.

A subcommand module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int | None`.
Modules are imported only when their subcommand runs, so `elastic-moe --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from elastic_moe.errors import Interrupted, UserError, raise_interrupted

# name -> module under elastic_moe.commands
COMMANDS = {
    "async-rl": "async_rl",
    "export": "export",
    "extract": "extract",
    "family": "family",
    "generate": "generate",
    "import-hf": "import_hf",
    "posttrain": "posttrain",
    "pretrain": "pretrain",
    "quickstart": "quickstart",
    "rl": "rl",
    "sandbox": "sandbox",
    "sft": "sft",
}


def _load(name: str):
    return importlib.import_module(f"elastic_moe.commands.{COMMANDS[name]}")


def _add_version(parser: argparse.ArgumentParser) -> None:
    from elastic_moe import __version__

    parser.add_argument("--version", action="version", version=f"elastic-moe {__version__}")


def build_parser(names: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic-moe", description="Once-for-all elastic MoE training on CPU or GPU")
    _add_version(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if name in names:
            mod = _load(name)
            p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
            mod.add_arguments(p)
        else:
            sub.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = [a for a in argv if a in COMMANDS][:1]
    names = wanted if wanted and "-h" not in argv[:1] and "--help" not in argv[:1] else []
    if not names:  # top-level help lists every subcommand with its one-line help
        parser = argparse.ArgumentParser(prog="elastic-moe")
        _add_version(parser)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        for name in COMMANDS:
            sub.add_parser(name, help=_help_line(name))
        parser.parse_args(argv)
        return 2
    args = build_parser(names).parse_args(argv)
    who = f"elastic-moe {args.command}"
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # under torchrun every rank reports: say which one
        who += f" (rank {os.environ.get('RANK', '?')})"
    on_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, raise_interrupted) if on_main_thread else None
    try:
        code = _load(args.command).run(args)
    except UserError as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        why = f" ({e})" if str(e) else ""
        print(f"{who}: interrupted by {signal.Signals(signum).name}{why}", file=sys.stderr)
        return 128 + signum
    except OSError as e:  # a path the user gave that cannot be read or written (not a folder, read-only, ...)
        if e.filename is None:
            raise
        print(f"{who}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return int(code or 0)


def _help_line(name: str) -> str:
    try:
        return _load(name).HELP
    except Exception as e:  # a broken optional dependency must not break --help
        return f"(unavailable: {e})"


if __name__ == "__main__":
    sys.exit(main())
