"""Benchmark scripts: both sides of a comparison do the same work, reports name the command run, `--quick` runs
leave the committed results alone, GPU scripts on a machine without one say so, and vLLM results are reused only
for their own job."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_opd_ours_cycles_through_every_prompt_as_trl_does():
    import opd_throughput

    prompts = [[i] * (i + 1) for i in range(12)]  # prompts of different lengths
    seen = [p for step in range(6) for p in opd_throughput.step_prompts(prompts, 4, step)]
    assert seen[:12] == prompts and seen[12:] == prompts  # every prompt, in turn, not the first 4 again and again
    assert opd_throughput.step_prompts(prompts, 4, 1) == prompts[4:8]


def test_grpo_reasoning_reproduce_names_every_setting():
    import grpo_reasoning

    args = Namespace(steps=150, eval_every=10, lr=1e-4, reward="answer", test_size=200, final_test_size=500)
    cmd = grpo_reasoning.reproduce(args).split()
    for flag, value in (("--steps", "150"), ("--eval-every", "10"), ("--lr", "0.0001"), ("--reward", "answer"),
                        ("--test-size", "200"), ("--final-test-size", "500")):
        assert cmd[cmd.index(flag) + 1] == value


def test_async_rl_reproduce_names_the_run_settings():
    import async_rl

    a = Namespace(steps=12, groups=4, group_size=4, eta=1, delay=0.1, reward_workers=4, min_tokens=6, max_tokens=64,
                  chunk=8, lr=3e-3, seeds="0,1", backend="ray")
    cmd = async_rl.reproduce(a).split()
    for flag, value in (("--steps", "12"), ("--eta", "1"), ("--delay", "0.1"), ("--reward-workers", "4"),
                        ("--seeds", "0,1"), ("--backend", "ray")):
        assert cmd[cmd.index(flag) + 1] == value


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"benchmarks/{name}.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def test_gpu_throughput_report_names_the_command_run(tmp_path):
    # --budget 0 skips every section: the tiny model is built and the report written, nothing measured
    args = ["--device", "cpu", "--tiny", "--budget", "0", "--out", str(tmp_path / "run")]
    r = run_script("gpu_throughput", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = "python benchmarks/gpu_throughput.py " + " ".join(args)
    assert f"`{cmd}`" in (tmp_path / "run" / "gpu_throughput.md").read_text()
    assert json.loads(r.stdout.strip().splitlines()[-1])["device"] == "cpu"
    # a report rewritten from the saved results names the run's command, and its own
    full = tmp_path / "run" / "gpu_throughput_full.json"
    r = run_script("gpu_throughput", "--report-only", str(full), "--out", str(tmp_path / "re"))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "re" / "gpu_throughput.md").read_text()
    assert f"`{cmd}`" in md and "--report-only" in md


def test_triton_tiles_report_names_the_command_of_the_run(tmp_path, monkeypatch):
    import triton_tiles

    S = {"device": "cpu", "torch": "2.13", "command": "python3 benchmarks/triton_tiles.py --only half_rows",
         "best": "committed", "best_tok_s": 1.0, "committed_tok_s": 1.0, "best_speedup_vs_committed": 1.0,
         "candidates": {"committed": {"tiles": {"qkv": [8, 1024, 4]}, "pdl": False, "tok_s": 1.0, "step_ms": 2.0,
                                      "prefill_ms": 3.0, "tokens_agreeing": 8, "max_abs_logprob_diff": 0.0}},
         "profile": None}
    (tmp_path / "run.json").write_text(json.dumps(S))
    monkeypatch.setattr(sys, "argv", ["benchmarks/triton_tiles.py", "--report-only", str(tmp_path / "run.json"),
                                      "--out", str(tmp_path)])
    triton_tiles.main()
    md = (tmp_path / "triton_tiles.md").read_text()
    assert "`python3 benchmarks/triton_tiles.py --only half_rows`" in md and "--report-only" in md


@pytest.mark.parametrize("name,args", [("gpu_throughput", []), ("triton_tiles", []),
                                       ("model_throughput", ["--device", "cuda"])])
def test_gpu_scripts_on_a_machine_without_one_say_so_in_one_line(tmp_path, name, args):
    out = ["--out-dir" if name == "model_throughput" else "--out", str(tmp_path / "out")]
    r = run_script(name, *args, *out, env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode != 0
    assert r.stderr.strip() == f"{name}: needs a CUDA GPU (none visible)"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,flag", [("model_throughput", "--out-dir"), ("opd_throughput", "--out")])
def test_quick_runs_do_not_replace_the_committed_results(tmp_path, name, flag):
    import common

    mod = __import__(name)
    dest = flag.lstrip("-").replace("-", "_")
    assert getattr(mod.parse_args([]), dest) == common.DOCS
    assert getattr(mod.parse_args(["--quick"]), dest) == common.ROOT / "runs" / "bench_quick"
    assert getattr(mod.parse_args(["--quick", flag, str(tmp_path)]), dest) == tmp_path


def test_model_throughput_median_of_two_rounds_is_their_mean(monkeypatch):
    import common
    import model_throughput

    clock = [0.0]
    took = {"ours": [1.0, 3.0], "hf": [4.0, 2.0]}

    def fn(k):
        return lambda: clock.__setitem__(0, clock[0] + took[k].pop(0))

    monkeypatch.setattr(common, "time", type("T", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    # the bf16 rows time 2 rounds: the median of 2 is their mean, not the slower one
    assert model_throughput.alternate({k: fn(k) for k in took}, 2) == {"ours": 2.0, "hf": 3.0}


FAKE_WORKER = """#!{python}
import json, sys
from pathlib import Path
count = Path(sys.argv[0]).with_suffix(".count")
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
if {fail}:
    sys.exit(1)
job = json.load(open(sys.argv[2]))
json.dump({{"vllm": "fake", "run": n, "cases": [{{"name": c["name"]}} for c in job["cases"]]}}, open(sys.argv[3], "w"))
"""


def fake_python(path: Path, fail: bool) -> Path:
    path.write_text(FAKE_WORKER.format(python=sys.executable, fail=fail))
    path.chmod(0o755)
    return path


def test_vllm_results_are_reused_only_for_the_same_exports_and_a_finished_run(tmp_path):
    import vllm_parity

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights 1")
    ok, bad = fake_python(tmp_path / "ok", False), fake_python(tmp_path / "bad", True)

    def cases(new_tokens):
        return [{"name": "a / full", "path": str(folder), "prompts": [[5, 6]], "new_tokens": new_tokens}]

    work = tmp_path / "work"
    work.mkdir()
    assert vllm_parity.run_vllm(ok, work, cases(32), False)[0]["run"] == 1
    assert vllm_parity.run_vllm(ok, work, cases(32), False)[0]["run"] == 1  # the same job: reused
    (folder / "model.safetensors").write_bytes(b"weights 2")  # exported again with other weights
    assert vllm_parity.run_vllm(ok, work, cases(32), False)[0]["run"] == 2
    # a run of another job cut short, then the same job again: the first job's results must not stand in for it
    with pytest.raises(subprocess.CalledProcessError):
        vllm_parity.run_vllm(bad, work, cases(16), False)
    assert vllm_parity.run_vllm(ok, work, cases(16), False)[0]["run"] == 3


@pytest.mark.parametrize("rc,out", [(5, "2 deselected in 0.1s"), (2, "1 passed, 1 error, Interrupted")])
def test_torch_compat_counts_a_pytest_run_that_ran_nothing_or_broke_as_failed(tmp_path, rc, out):
    import torch_compat

    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho '{out}'\nexit {rc}\n")
    fake.chmod(0o755)
    r = torch_compat.pytest_run(fake, ["tests/none.py"])
    assert r["failed"] >= 1 and any(f"pytest exit {rc}" in f for f in r["failures"])
