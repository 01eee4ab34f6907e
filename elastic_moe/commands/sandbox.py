"""`elastic-moe sandbox FILE.py`: run a Python file in the code sandbox and print the result as one JSON line."""

from __future__ import annotations

import argparse
from pathlib import Path

from elastic_moe.commands import arg_types as types
from elastic_moe.errors import UserError

HELP = "run a Python file in the code sandbox (no network, resource limits) and print the result as one JSON line"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="Python file to run")
    p.add_argument("--timeout", type=types.finite_float, default=5.0, help="wall-clock limit in seconds (default 5)")
    p.add_argument("--memory-mb", type=int, default=512, help="address-space limit in MiB (default 512)")
    p.add_argument("--isolation", choices=["auto", "namespaces", "fallback"], default="auto")


def run(args: argparse.Namespace) -> int:
    from elastic_moe import sandbox

    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    if args.timeout <= 0 or args.memory_mb < 16:
        raise UserError("--timeout must be > 0 and --memory-mb at least 16")
    limits = sandbox.Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    try:
        result = sandbox.run_file(str(path), limits, isolation=args.isolation)
    except sandbox.SandboxError as e:
        raise UserError(str(e)) from e
    print(result.to_json())
    return 0 if result.passed else 1
