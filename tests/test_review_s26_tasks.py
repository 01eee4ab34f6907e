"""Review (session 26) of the task verifiers, the code sandbox and the reward pool: each test shows one defect."""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from pathlib import Path

import pytest

from elastic_moe import sandbox
from elastic_moe.reward_pool import RewardPool, _pct
from elastic_moe.tasks import get_suite, verify
from elastic_moe.tasks.base import parse_int

REPO = Path(__file__).resolve().parents[1]
FAST = sandbox.Limits(timeout_s=3, memory_mb=256, max_procs=16, file_size_mb=1, max_output_bytes=200_000)


@pytest.fixture(scope="module")
def add_task():
    return next(t for t in get_suite("code", "train", 20, 0, 1) if t.metadata["family"] == "add")


@pytest.fixture(scope="module")
def arith_task():
    return next(t for t in get_suite("reasoning", "train", 20, 0, 1) if t.metadata["family"] == "arith")


# ------------------------------------------------------------------------------------------------ verifiers


def test_a_unicode_minus_is_a_minus_sign_in_integer_answers():
    # countdown answers already take U+2212; an arith or agent answer of "−229" was "not an integer"
    assert parse_int("\u2212229") == -229 and parse_int("\u22121,000") == -1000
    task = next(t for t in get_suite("reasoning", "train", 40, 1, 2)
                if t.metadata["family"] == "arith" and t.reference["answer"] < 0)
    assert verify(task, f"Answer: \u2212{-task.reference['answer']}").correct


def test_a_code_block_indented_under_a_list_item_still_runs(add_task):
    indented = "".join("   " + ln + "\n" for ln in add_task.reference["solution"].splitlines())
    reply = f"1. The function:\n   ```python\n{indented}   ```\n"
    assert verify(add_task, reply).correct  # was IndentationError: a right answer scored 0


def test_a_completion_with_a_lone_surrogate_is_scored_not_raised(add_task):
    sol, fn = add_task.reference["solution"], add_task.reference["function"]
    assert verify(add_task, f"```python\n{sol}# \ud800\n```").correct  # was UnicodeEncodeError out of verify
    v = verify(add_task, f"```python\ndef {fn}(x):\n    return '\ud800'\n```")
    assert v.reward == 0.0 and "SyntaxError" in v.reason  # not valid source: Python's own error, scored 0


@pytest.mark.parametrize("bad", [None, 5, [{"role": "assistant"}], [{"role": "assistant", "content": None}], ["hi"]])
def test_a_malformed_completion_is_a_wrong_verdict_not_an_exception(bad, add_task, arith_task):
    agent_task = get_suite("agent", "train", 1, 0, 1)[0]
    for task in (arith_task, agent_task):
        v = verify(task, bad)  # raised TypeError / KeyError: "never raises for a bad completion"
        assert v.reward == 0.0 and "completion" in v.reason
    prompt_then_bad = [*agent_task.messages, {"role": "assistant", "content": 7}]
    assert verify(agent_task, prompt_then_bad).reward == 0.0


# ------------------------------------------------------------------------------------------------- sandbox


def test_fallback_cannot_write_outside_its_folder_through_a_directory_fd():
    target = f"/dev/shm/emoe-s26-{os.getpid()}"
    code = (f"import os\nfd = os.open('/dev', os.O_RDONLY)\n"
            f"os.close(os.open({target[5:]!r}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n")
    try:
        r = sandbox.run_code(code, FAST, "fallback")
        assert r.status == "failed" and "not allowed" in r.stderr_tail, r
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)
    r = sandbox.run_code("import json, fractions, os\nprint(len(os.listdir('/usr')) > 0)", FAST, "fallback")
    assert r.status == "passed" and r.stdout == "True\n"  # reading and imports still work


@pytest.mark.parametrize("field, value", [("disk_mb", 0), ("timeout_s", math.nan), ("timeout_s", 0),
                                          ("memory_mb", 0), ("max_output_bytes", -1), ("cpu_s", 0),
                                          ("total_memory_mb", -1)])
def test_bad_limits_are_refused_naming_the_field(field, value):
    # disk_mb=0 mounted an unlimited /sandbox tmpfs ("size=0m"); a NaN timeout raised "cannot convert float NaN"
    with pytest.raises(ValueError, match=field) as e:
        sandbox.run_code("print(1)", sandbox.Limits(**{field: value}))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- reward pool


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


def test_a_later_block_defining_a_longer_name_does_not_replace_the_solution(add_task):
    sol, fn = add_task.reference["solution"], add_task.reference["function"]
    reply = (f"```python\n{sol}```\nAnd a variant that prints:\n"
             f"```python\ndef {fn}_verbose(x):\n    print({fn}(x))\n```")
    assert verify(add_task, reply).correct  # the second block "contained" `def {fn}` and was run alone
    v = verify(add_task, f"```python\ndef {fn}0(x):\n    return 0\n```")
    assert not v.correct and "no definition" in v.reason


def test_an_unknown_task_family_is_named_at_once():
    from elastic_moe.errors import UserError
    from elastic_moe.tasks import get_mixed_suite

    # was: the suite grown to 64 n + 64 tasks before "only 0 ... found" (2.5 min for code, n=50)
    with pytest.raises(UserError, match=r"unknown code task families \['adds'\] at difficulty 1 .*known: add"):
        get_suite("code", "train", 50, families=["adds"])
    with pytest.raises(UserError, match=r"unknown agent task families \['route'\] at difficulty 1"):
        get_suite("agent", "train", 50, families=["route"])  # a family of difficulty 3 only
    assert {t.metadata["family"] for t in get_suite("agent", "train", 5, families=["price"])} == {"price"}
    with pytest.raises(UserError, match="n must be >= 0, not -5"):  # said "not -1" (the per-domain count)
        get_mixed_suite("train", -5)
