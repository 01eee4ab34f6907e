"""Reward pool: concurrent scoring, hostile code through the pool, kills on timeout, infrastructure failures
reported as reward=None (never a silent 0), backpressure and metrics."""

from __future__ import annotations

import importlib.util
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import eventually

from elastic_moe import sandbox
from elastic_moe.reward_pool import RewardPool, _pct
from elastic_moe.tasks import get_mixed_suite, get_suite
from elastic_moe.tasks.base import Task


def _answer(task):
    demo = task.demonstration()
    return demo if task.domain == "agent" else demo[-1]["content"]


def _sandbox_procs() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                uid_line = next(ln for ln in Path(f"/proc/{d}/status").read_text().splitlines() if ln.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if sandbox.SANDBOX_UID_BASE <= int(uid_line.split()[1]) < sandbox.SANDBOX_UID_BASE + sandbox.PID_LIMIT:
                out.append(int(d))
    return out


@pytest.fixture(scope="module")
def code_task():
    task = get_suite("code", "train", 1, seed=5, difficulty=1)[0]
    task.metadata["timeout_s"] = 2.0  # hostile runs end fast
    return task


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory bomb": "x = bytearray(8 * 1024**3)",
    "huge output": "while True:\n    print('x' * 100000)",
    "write outside": f"open({str(Path(__file__).resolve().parents[1] / 'pwned.txt')!r}, 'w').write('x')",
    "read secrets": "import os\nprint(os.environ['EMOE_POOL_SECRET'])",
    "read project": f"print(open({str(Path(__file__).resolve())!r}).read())",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', 1), timeout=1)",
    "signal parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)",
    "deep recursion": "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)",
}


def test_scores_a_mixed_batch_in_order():
    tasks = get_mixed_suite("train", 12, seed=0, difficulty=1)
    answers = [_answer(t) for t in tasks]
    wrong = ["Answer: -123456789"] * len(tasks)
    with RewardPool(num_workers=2) as pool:
        good = pool.score(tasks, answers)
        bad = pool.score(tasks, wrong)
        m = pool.metrics()
    assert all(v.correct and v.reward == 1.0 for v in good), [v.reason for v in good if not v.correct]
    assert all(v.reward is not None for v in bad)
    assert not any(v.correct for t, v in zip(tasks, bad) if t.domain != "open_ended")  # may meet a constraint
    assert m["completed"] == 24 and m["infra_errors"] == 0 and m["queue_depth"] == 0
    assert m["throughput_per_s"] > 0 and m["latency_p50_ms"] <= m["latency_p99_ms"]


def test_hostile_code_through_the_pool(code_task, monkeypatch):
    monkeypatch.setenv("EMOE_POOL_SECRET", "hunter2")
    fn = code_task.reference["function"]
    completions = [f"```python\ndef {fn}(x):\n    return 0\n{body}\n```" for body in HOSTILE.values()]
    # the solution itself is right, so only containment keeps these from passing
    completions = [c.replace("return 0", f"return {code_task.reference['solution'].split('return ')[1].strip()}")
                   for c in completions]
    t0 = time.monotonic()
    with RewardPool(num_workers=2, task_timeout_s=20) as pool:
        verdicts = pool.score([code_task] * len(completions), completions)
        after = pool.score([code_task], [_answer(code_task)])[0]
        m = pool.metrics()
    for name, v in zip(HOSTILE, verdicts):
        assert v.reward == 0.0 and not v.correct, (name, v)  # contained, and a real verdict, not an infra error
    assert after.correct  # the pool keeps serving
    assert m["worker_restarts"] == 0 and m["infra_errors"] == 0
    assert not (Path(__file__).resolve().parents[1] / "pwned.txt").exists()
    assert time.monotonic() - t0 < 30
    assert eventually(lambda: _sandbox_procs() == []), _sandbox_procs()


def test_timeout_kills_the_worker_and_reports_infra(code_task, tmp_path, monkeypatch):
    slow = code_task.__class__(**{**code_task.to_dict(), "metadata": {**code_task.metadata, "timeout_s": 30}})
    fn = slow.reference["function"]
    import glob
    import tempfile

    # a temporary folder of this test's own: other processes' sandboxes (a second test run) come and go in /tmp
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)

    def temp_folders():
        return set(glob.glob(f"{tmp_path}/emoe-*"))

    before = temp_folders()
    with RewardPool(num_workers=1, task_timeout_s=1.0) as pool:
        v = pool.score([slow], [f"```python\nimport time\ntime.sleep(60)\ndef {fn}(x):\n    return x\n```"])[0]
        assert v.reward is None and v.status == "timeout" and "killed" in v.error
        # a fresh worker took over; a reasoning task, as a sandboxed run may not fit in 1 s on a loaded machine
        arith = get_suite("reasoning", "train", 1, seed=0, difficulty=1)[0]
        ok = pool.score([arith], [_answer(arith)])[0]
        m = pool.metrics()
    assert ok.correct, ok
    assert m["timeouts"] == 1 and m["worker_restarts"] == 1 and m["infra_errors"] == 1
    assert eventually(lambda: _sandbox_procs() == []), _sandbox_procs()  # the sandbox died with its worker
    assert temp_folders() <= before  # and its temporary folder went with it (the killed worker could not remove it)


def test_verifier_exception_is_infra_not_zero():
    broken = Task("x", "reasoning", [{"role": "user", "content": "?"}], reference={}, metadata={"family": "arith"})
    unknown = Task("y", "chemistry", [{"role": "user", "content": "?"}], reference={}, metadata={})
    with RewardPool(num_workers=1) as pool:
        a, b = pool.score([broken, unknown], ["Answer: 1", "Answer: 1"])
    assert a.reward is None and a.status == "error" and "KeyError" in a.error
    assert b.reward is None and "unknown domain" in b.error


def test_dead_worker_is_replaced(code_task):
    fn = code_task.reference["function"]
    with RewardPool(num_workers=1, task_timeout_s=20) as pool:
        fut = pool.submit(code_task, f"```python\nimport time\ntime.sleep(1.5)\ndef {fn}(x):\n    return x\n```")
        time.sleep(0.5)
        os.kill(pool._workers[0].handle[0].pid, 9)
        v = fut.result(timeout=20)
        assert v.reward is None and "died" in v.error
        assert pool.score([code_task], [_answer(code_task)])[0].correct


def test_backpressure_bounded_queue(code_task):
    fn = code_task.reference["function"]
    slow = f"```python\nimport time\ntime.sleep(0.5)\ndef {fn}(x):\n    return x\n```"
    with RewardPool(num_workers=1, queue_size=2) as pool:
        futures = [pool.submit(code_task, slow) for _ in range(3)]  # one running, two queued
        assert eventually(lambda: pool.metrics()["queue_depth"] == 2)
        with pytest.raises(queue.Full):
            pool.submit(code_task, slow, timeout=0.05)
        assert pool.metrics()["queue_depth"] == 2
        assert all(f.result().reward == 0.0 for f in futures)


def test_close_without_wait_fails_queued_jobs_as_infra(code_task):
    fn = code_task.reference["function"]
    slow = f"```python\nimport time\ntime.sleep(0.5)\ndef {fn}(x):\n    return x\n```"
    pool = RewardPool(num_workers=1, queue_size=8)
    futures = [pool.submit(code_task, slow) for _ in range(4)]
    time.sleep(0.1)
    pool.close(wait=False)
    results = [f.result(timeout=10) for f in futures]
    assert any(r.reward is None and "closed" in r.error for r in results)
    with pytest.raises(RuntimeError):
        pool.submit(code_task, slow)


@pytest.mark.slow
def test_ray_backend_ci_sample(ray_cluster):
    tasks = get_mixed_suite("train", 4, seed=0, difficulty=1)
    with RewardPool(num_workers=2, backend="ray") as pool:
        assert all(v.correct for v in pool.score(tasks, [_answer(t) for t in tasks]))


REPO = Path(__file__).resolve().parents[1]


def test_percentiles_are_nearest_rank():
    xs = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert _pct(xs, 0.99) == pytest.approx(99.0) and _pct(xs, 0.50) == pytest.approx(50.0)  # were 100 and 51
    assert _pct([0.001, 0.002], 0.5) == pytest.approx(1.0) and _pct([0.005], 0.99) == pytest.approx(5.0)


def test_an_unpicklable_job_fails_alone_and_the_pool_keeps_working(arith_task):
    with RewardPool(num_workers=1, task_timeout_s=20) as pool:
        v = pool.submit(arith_task, lambda: 0).result(timeout=20)
        assert v.reward is None and "could not send the job" in v.error  # was: the whole pool broken
        answer = f"Answer: {arith_task.reference['answer']}"
        assert pool.submit(arith_task, answer).result(timeout=20).correct


def test_a_job_submitted_while_the_pool_closes_is_never_lost(arith_task):
    pool = RewardPool(num_workers=1, task_timeout_s=20)
    put = pool._queue.put

    def put_while_closing(job, timeout=None):  # close() runs between submit's check and its put
        closer = threading.Thread(target=pool.close)
        closer.start()
        pool._thread.join(timeout=1)  # before the fix the dispatcher had already left with the queue empty
        put(job, timeout=timeout)
        pool._closing_thread = closer

    pool._queue.put = put_while_closing
    fut = pool.submit(arith_task, f"Answer: {arith_task.reference['answer']}")
    pool._closing_thread.join(timeout=30)
    assert fut.done() and fut.result().correct  # was: a future that never completes


def test_benchmark_latencies_exclude_the_warm_up(arith_task):
    spec = importlib.util.spec_from_file_location("bench_reward_pool", REPO / "benchmarks" / "reward_pool.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    answer = f"Answer: {arith_task.reference['answer']}"
    with RewardPool(num_workers=1) as pool:
        bench.warm_up([pool], [arith_task] * 3, [answer] * 3)
        m = pool.metrics()
        assert m["completed"] == 0 and m["latency_p50_ms"] is None  # the warm-up is not measured
        pool.score([arith_task] * 2, [answer] * 2)
        m = pool.metrics()
        assert m["submitted"] == 2 and m["completed"] == 2 and m["latency_p99_ms"] is not None


@pytest.mark.usefixtures("one_thread")
def test_a_worker_that_fails_to_start_leaves_no_earlier_worker_running(monkeypatch):
    from elastic_moe import reward_pool

    started = []
    real = reward_pool._ProcessBackend.start

    def start(self):
        if started:
            raise OSError("no more processes")
        started.append(real(self))
        return started[-1]

    monkeypatch.setattr(reward_pool._ProcessBackend, "start", start)
    with pytest.raises(OSError, match="no more processes"):
        reward_pool.RewardPool(num_workers=3)
    proc, conn, tmp = started[0]
    assert proc.poll() is not None and conn.closed and not os.path.exists(tmp)


@pytest.mark.usefixtures("one_thread")
def test_a_worker_process_that_cannot_be_started_leaves_no_folder(monkeypatch):
    import tempfile

    from elastic_moe import reward_pool

    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        made.append(real_mkdtemp(*a, **kw))
        return made[-1]

    def popen(*a, **kw):
        raise OSError("fork failed")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(OSError, match="fork failed"):
        reward_pool.RewardPool(num_workers=1)
    assert made and not any(os.path.exists(p) for p in made)


class _KillsItsWorker:
    """A completion whose unpickling ends the worker process that receives it (a worker crash)."""

    def __reduce__(self):
        return os._exit, (3,)


def test_worker_deaths_separated_by_successes_do_not_break_the_pool(arith_task):
    """The give-up rule counts consecutive worker deaths: occasional crashes over a long run, each followed by
    jobs that succeed, are each reported as an infrastructure failure and never break the pool."""
    with RewardPool(num_workers=1, task_timeout_s=30) as pool:
        answer = arith_task.demonstration()[-1]["content"]
        for _ in range(5):  # more deaths in all than the 3 * num_workers a row allows
            v = pool.submit(arith_task, _KillsItsWorker()).result(timeout=30)
            assert v.reward is None and v.status == "error" and "died" in v.error
            assert pool.score([arith_task], [answer])[0].correct
        m = pool.metrics()
    assert m["worker_restarts"] == 5 and m["infra_errors"] == 5 and m["timeouts"] == 0


def test_a_verifier_error_is_not_counted_as_a_timeout():
    """metrics(): a verifier exception is an infrastructure error, but not a timeout."""
    broken = Task("x", "reasoning", [{"role": "user", "content": "?"}], reference={}, metadata={"family": "arith"})
    with RewardPool(num_workers=1) as pool:
        (v,) = pool.score([broken], ["Answer: 1"])
        m = pool.metrics()
    assert v.reward is None and v.status == "error"
    assert m["infra_errors"] == 1 and m["timeouts"] == 0
