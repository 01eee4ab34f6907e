"""Shared helpers for benchmark scripts: machine description, medians, matmul peaks, report writing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from elastic_moe.atomic import atomic_write_text
from elastic_moe.measure import cpu_name

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"
QUICK = ROOT / "runs" / "bench_quick"  # where --quick runs write: a smoke run must not replace the committed results


def report_dir(out: str | Path | None, quick: bool) -> Path:
    """Where a script writes its report: `out` if given, else docs/benchmarks for a full run and runs/bench_quick
    for a --quick one."""
    return Path(out) if out else QUICK if quick else DOCS


def need_cuda(device, script: str) -> None:
    """Exit with one line (status 1) when `device` is a CUDA device and none is visible."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (none visible)")


def machine() -> str:
    cpu = cpu_name()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}){gpu}, Python {platform.python_version()}")


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 7, emulate_bf16: bool = False,
                device: str = "cpu") -> float:
    """Best-case GEMM rate in FLOP/s for n x n x n, median of repeats."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    if emulate_bf16:
        a, b = a.bfloat16().float(), b.bfloat16().float()
        fn = lambda: (a @ b).bfloat16()  # noqa: E731
    else:
        a, b = a.to(dtype), b.to(dtype)
        fn = lambda: torch.nn.functional.linear(a, b)  # noqa: E731
    if torch.device(device).type == "cuda":
        reps = 20

        def fn_many(f=fn):
            for _ in range(reps):
                f()
            torch.cuda.synchronize()

        return 2 * n**3 * reps / median_time(fn_many, repeats, warmup=2)
    return 2 * n**3 / median_time(fn, repeats, warmup=2)


def write_report(name: str, markdown: str, headline: dict, out_dir: Path | None = None) -> None:
    out = Path(out_dir) if out_dir else DOCS
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.md", markdown)
    atomic_write_text(out / f"{name}.json", json.dumps(headline, indent=2) + "\n")
    print(json.dumps(headline))


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.0f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def peak_rss_mb_of(argv: list[str]) -> float:
    """Run a child process that prints its own peak-RSS increase (MB) as the last line."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
