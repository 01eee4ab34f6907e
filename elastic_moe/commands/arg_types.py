"""Command-line value types: a bad value is refused by argparse, naming the flag, before any work starts."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return v


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= v < 2**63:
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}" if v < low else f"{v} is too large")
        return v

    return parse


seed = int_at_least(0)


def threads(text: str) -> int:
    """A torch thread count: 0 (torch's default) up to 4x this machine's CPUs."""
    from elastic_moe.errors import threads_check

    v = int_at_least(0)(text)
    ok, msg = threads_check(v, "--threads")
    if not ok:
        raise argparse.ArgumentTypeError(msg.removeprefix("--threads = "))
    return v


def device(text: str) -> str:
    """auto, cpu, cuda, cuda:N, ...: a device torch knows and this machine has."""
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cpu" and dev.index is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: the CPU takes no device index (cpu)")
    if dev.type not in ("cpu", "cuda"):  # meta holds no data; mps, xpu, ... are not supported by this project
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu or a CUDA device (cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
