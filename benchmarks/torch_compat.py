"""Does the package work with the torch releases it says it supports (`torch>=2.6` in pyproject)?

For each torch version: a virtual environment of its own (`runs/torch_compat/torch-VERSION`, made on first use:
`pip install torch==VERSION`, then this checkout with `-e .[dev]` and torch pinned), then the README's test
command in it, plus the slow torchrun tests (DDP and FSDP2 over gloo, resumed). The torch of the running
interpreter is the reference row. PyPI's Linux wheels of older torch releases are CUDA builds (5-6 GB each with
their libraries); they run on a CPU too.

    python benchmarks/torch_compat.py                          # 2.6.0 2.7.1 2.8.0 2.9.0 and this interpreter's
    python benchmarks/torch_compat.py --versions 2.10.0 --no-current
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, command_line, machine, md_table, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUITE = ["-m", "not gpu and (not slow or ci_sample)"]  # the README's test command
TORCHRUN = ["tests/test_pretrain.py", "-m", "slow", "-k", "torchrun"]


def venv_python(version: str, root: Path) -> Path:
    env = root / f"torch-{version}"
    py = env / "bin" / "python"
    if not py.exists():
        print(f"setting up {env} (torch=={version}; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={version}"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={version}\n")  # the package's own install must not move torch
    try:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-e", ".[dev]"], cwd=ROOT, check=True,
                       env={**os.environ, "PIP_CONSTRAINT": f.name})
    finally:
        os.unlink(f.name)
    return py


def pytest_run(py: Path, args: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run([str(py), "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *args], cwd=ROOT,
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    skipped = re.findall(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$", out, re.M)
    broken = r.returncode not in (0, 1)  # 2 interrupted, 3 internal error, 4 usage error, 5 no test collected
    if broken:
        failed.append(f"pytest exit {r.returncode}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    return dict(passed=counts.get("passed", 0), failed=counts.get("failed", 0) + counts.get("error", 0)
                + counts.get("errors", 0) + broken, skipped=counts.get("skipped", 0), failures=failed,
                skips=[f"{Path(f).name}: {why}" for f, why in skipped], seconds=round(time.perf_counter() - t, 1))


def check(py: Path) -> dict:
    version = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    print(f"torch {version}: the README's test command", flush=True)
    suite = pytest_run(py, SUITE)
    print(f"  {suite['passed']} passed, {suite['failed']} failed, {suite['skipped']} skipped, {suite['seconds']} s; "
          f"torchrun tests", flush=True)
    dist = pytest_run(py, TORCHRUN)
    print(f"  {dist['passed']} passed, {dist['failed']} failed, {dist['skipped']} skipped", flush=True)
    return dict(torch=version, suite=suite, torchrun=dist)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", default="2.6.0,2.7.1,2.8.0,2.9.0", help="comma-separated torch versions")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "torch_compat", help="where the environments live")
    ap.add_argument("--no-current", action="store_true", help="skip the running interpreter's torch")
    ap.add_argument("--out", type=Path, default=DOCS)
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    versions = [v for v in args.versions.split(",") if v]
    results = [check(venv_python(v, args.root)) for v in versions]
    if not args.no_current:
        results.append(check(Path(sys.executable)))

    rows = []
    for r in results:
        s, d = r["suite"], r["torchrun"]
        notes = sorted(set(s["skips"] + d["skips"]))
        rows.append([r["torch"], s["passed"], s["failed"], s["skipped"], f"{s['seconds']:.0f}",
                     f"{d['passed']} / {d['failed']} / {d['skipped']}",
                     "<br>".join(s["failures"] + d["failures"] + notes) or "-"])
    ok = all(r["suite"]["failed"] == 0 and r["torchrun"]["failed"] == 0 for r in results)
    md = f"""# torch compatibility

`{command_line()}`: the README's test command (`pytest -q {' '.join(SUITE)}`) and the slow torchrun tests
(`{' '.join(TORCHRUN)}`: two ranks over gloo, DDP and FSDP2, killed and resumed, against one process) under each
torch release, each in an environment of its own. Machine: {machine()} (the running interpreter's torch; the other
rows use PyPI's CUDA builds of torch on the same CPU).

{md_table(["torch", "suite passed", "failed", "skipped", "suite s", "torchrun passed / failed / skipped",
           "failures, then why tests were skipped"], rows)}

What differs across releases, and what the package does about it:
- `torch._grouped_mm` (the experts' grouped GEMM): absent before 2.8, CUDA-only in 2.8, on the CPU from 2.9.
  `ops.grouped_mm_available` probes it once at import; without it the experts run as one matmul per expert, and
  asking for the `grouped_mm` backend is a one-line error.
- FSDP2 over gloo on a CPU: torch 2.6 fails on its first all-gather (its CPU streams cannot record events) and
  torch 2.8 sums the ranks' gradients instead of averaging them; `distributed.check_fsdp2` refuses both with a
  one-line error before sharding. (On GPUs FSDP2 runs on NCCL, not checked here.)
- FSDP2 before torch 2.13 finds the tensors to hook its backward all-gather onto with `tree_flatten`, which does
  not look inside a dataclass it does not know: the model's output is registered as a pytree node.
- The compiled CPU decode step: torch 2.6's inductor fails on the experts' multiply-sum form (an internal
  assertion), so before 2.8 it runs the gathered form; a batch whose experts need the per-expert loop (no CPU
  grouped GEMM) runs its steps uncompiled.
- Triton: torch 2.6 installs Triton 3.2 and torch 2.7 Triton 3.3.1, which have neither the programmatic-dependent-
  launch intrinsics nor the `launch_pdl` option, and torch 2.8's Triton 3.4 has intrinsics its own compiler cannot
  call; `triton_decode.HAS_PDL` leaves PDL out there (the decode kernels are otherwise the same). The sm90 compile
  check drives Triton 3.3+'s compiler API: skipped under torch 2.6.
- torch 2.6's `torch.export.register_dataclass` calls its own deprecated helper (a FutureWarning at every import
  of the package); `model.py` filters that one warning at that one call.
"""
    headline = dict(all_passed=ok, **{r["torch"]: dict(passed=r["suite"]["passed"] + r["torchrun"]["passed"],
                                                       failed=r["suite"]["failed"] + r["torchrun"]["failed"],
                                                       skipped=r["suite"]["skipped"] + r["torchrun"]["skipped"])
                                      for r in results})
    print(f"report: {args.out / 'torch_compat.md'}")
    write_report("torch_compat", md, headline, args.out)  # prints the headline JSON last


if __name__ == "__main__":
    main()
