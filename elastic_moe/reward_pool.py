"""A pool of CPU workers that verify completions concurrently, apart from the accelerators (ERNIE 5.1's elastic
CPU pool for code sandboxes and verifiers).

    with RewardPool(num_workers=2) as pool:
        verdicts = pool.score(tasks, completions)      # list[Verdict], in order
        fut = pool.submit(task, completion)            # blocks while the queue is full (backpressure)
        pool.metrics()                                 # throughput, queue depth, p50/p99 latency, failures

Workers are local processes (backend="process") or Ray actors (backend="ray", imported lazily). A job that runs
past `task_timeout_s` has its worker killed (with everything it started) and replaced. Infrastructure failures
-- timeouts, dead workers, verifier exceptions -- come back as Verdict(reward=None, status="timeout"/"error",
error=...), never as a silent 0: the trainer must drop such samples, not learn from them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path

from elastic_moe.tasks.base import Task, Verdict


def _score_one(task: Task, completion) -> Verdict:
    from elastic_moe.tasks import verify

    try:
        return verify(task, completion)
    except Exception as e:  # noqa: BLE001 - a verifier bug is an infrastructure failure, not a score
        return Verdict.infra_error(f"verifier raised {type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-500:]}")


def _worker_main(fd: int) -> None:
    """Entry point of a worker process: score jobs from the connection until it closes."""
    conn = Connection(fd)
    # the worker leads its own process group, so a kill also reaches what it started (sandboxes have their own
    # session and die with it through PR_SET_PDEATHSIG)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the caller, which shuts the pool down
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        job_id, task, completion = job
        conn.send((job_id, _score_one(task, completion)))


@dataclass
class _Job:
    id: int
    task: Task
    completion: object
    future: Future
    submitted: float
    started: float = 0.0


@dataclass
class _Worker:
    handle: object  # backend-specific
    job: _Job | None = None
    deadline: float = 0.0


class _ProcessBackend:
    """Workers are `python -m elastic_moe.reward_pool --worker FD` processes talking over a socketpair.

    Plain subprocesses rather than multiprocessing, so the caller's main module is never re-imported (no
    `if __name__ == "__main__"` guard needed) and nothing is forked from a threaded parent.
    """

    name = "process"

    def __init__(self, wake_fd: int):
        self.wake_fd = wake_fd
        root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH", "")
        self.env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}

    def start(self):
        mine, theirs = socket.socketpair()
        # the worker's temporary folders (one per sandboxed run) go under a folder of its own, which is removed
        # when the worker is: a worker killed on a timeout never gets to remove them itself
        tmp = tempfile.mkdtemp(prefix="emoe-pool-worker-")
        try:
            os.chmod(tmp, 0o755)  # the sandbox may run code as another user
            proc = subprocess.Popen(
                [sys.executable, "-m", "elastic_moe.reward_pool", "--worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env={**self.env, "TMPDIR": tmp}, stdin=subprocess.DEVNULL,
            )
        except BaseException:
            mine.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            theirs.close()
        return (proc, Connection(mine.detach()), tmp)

    def send(self, handle, job: _Job) -> None:
        handle[1].send((job.id, job.task, job.completion))

    def wait(self, busy: list[_Worker], timeout: float) -> list[tuple[_Worker, Verdict | None, str]]:
        by_obj = {}
        for w in busy:
            by_obj[w.handle[1]] = w
        ready = mp_wait([*by_obj, self.wake_fd], timeout)
        out, done = [], set()
        for obj in ready:
            if obj == self.wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_fd, 4096)
                continue
            w = by_obj[obj]
            if id(w) in done:
                continue
            done.add(id(w))
            proc, conn, _ = w.handle
            try:
                if conn.poll():
                    job_id, verdict = conn.recv()
                    if w.job is not None and job_id == w.job.id:
                        out.append((w, verdict, ""))
                    continue
            except (EOFError, OSError):
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)
            out.append((w, None, f"worker process died (exit code {proc.returncode})"))
        return out

    def kill(self, handle) -> None:
        proc, conn, tmp = handle
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        conn.close()
        shutil.rmtree(tmp, ignore_errors=True)

    def stop(self, handle) -> None:
        proc, conn, tmp = handle
        with contextlib.suppress(OSError):
            conn.send(None)
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            self.kill(handle)
        conn.close()
        shutil.rmtree(tmp, ignore_errors=True)


class _RayBackend:
    name = "ray"

    def __init__(self, wake_fd: int):
        import ray  # optional dependency

        from elastic_moe.async_rl.ray_backend import start_ray

        self.ray = ray
        start_ray(log_to_driver=False)
        self.actor_cls = ray.remote(num_cpus=1)(_RayScorer)
        self.wake_fd = wake_fd

    def start(self):
        return [self.actor_cls.remote(), None]  # [actor, ObjectRef of the job in flight]

    def send(self, handle, job: _Job) -> None:
        handle[1] = handle[0].score.remote(job.task, job.completion)

    def wait(self, busy: list[_Worker], timeout: float) -> list[tuple[_Worker, Verdict | None, str]]:
        refs = {w.handle[1]: w for w in busy if w.handle[1] is not None}
        if not refs:
            time.sleep(min(timeout, 0.01))
            return []
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=min(timeout, 0.01))
        out = []
        for ref in ready:
            w = refs[ref]
            w.handle[1] = None
            try:
                out.append((w, self.ray.get(ref), ""))
            except Exception as e:  # noqa: BLE001 - actor died: infrastructure
                out.append((w, None, f"ray actor failed: {type(e).__name__}: {e}"))
        return out

    def kill(self, handle) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(handle[0], no_restart=True)

    def stop(self, handle) -> None:
        self.kill(handle)


class _RayScorer:
    def score(self, task: Task, completion) -> Verdict:
        return _score_one(task, completion)


@dataclass
class _Stats:
    submitted: int = 0
    completed: int = 0
    infra_errors: int = 0
    timeouts: int = 0
    worker_restarts: int = 0
    first_submit: float | None = None
    last_done: float | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=10_000))  # submit -> result, seconds
    service: deque = field(default_factory=lambda: deque(maxlen=10_000))  # worker start -> result, seconds


def _pct(xs, q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)] * 1000.0  # nearest rank: p99 of 100 samples is the 99th


class RewardPool:
    def __init__(self, num_workers: int = 2, queue_size: int = 64, task_timeout_s: float = 30.0,
                 backend: str = "process"):
        if num_workers < 1 or queue_size < 1 or task_timeout_s <= 0:
            raise ValueError("num_workers and queue_size must be >= 1, task_timeout_s > 0")
        self.num_workers, self.task_timeout_s = num_workers, task_timeout_s
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        backends = {"process": _ProcessBackend, "ray": _RayBackend}
        self._workers: list[_Worker] = []
        try:
            if backend not in backends:
                raise ValueError(f"backend must be process or ray, not {backend!r}")
            self._backend = backends[backend](self._wake_r)
            for _ in range(num_workers):
                self._workers.append(_Worker(self._backend.start()))
        except BaseException:  # a worker that failed to start: the ones before it are not left running
            for w in self._workers:
                self._backend.kill(w.handle)
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        self._ids = itertools.count()
        self._stats = _Stats()
        self._lock = threading.Lock()
        self._closing = False
        self._submitting = 0  # submit() calls between their closed check and their put: close() waits for them
        self._broken: str | None = None
        self._thread = threading.Thread(target=self._dispatch, name="reward-pool", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- public API

    def submit(self, task: Task, completion, timeout: float | None = None) -> Future:
        """Queue one job; blocks while the queue is full. Raises queue.Full after `timeout` seconds of waiting."""
        with self._lock:
            if self._closing or self._broken:
                raise RuntimeError(f"reward pool is {'closed' if self._closing else 'broken: ' + str(self._broken)}")
            self._submitting += 1
        fut: Future = Future()
        now = time.monotonic()
        job = _Job(next(self._ids), task, completion, fut, now)
        try:
            self._queue.put(job, timeout=timeout)
            with self._lock:
                self._stats.submitted += 1
                if self._stats.first_submit is None:
                    self._stats.first_submit = now
        finally:
            with self._lock:
                self._submitting -= 1
            self._wake()
        if self._broken:  # the dispatcher failed and drained the queue while this job was being put
            self._drain_queue(f"reward pool dispatcher failed: {self._broken}")
        return fut

    def score(self, tasks: Sequence[Task], completions: Sequence) -> list[Verdict]:
        if len(tasks) != len(completions):
            raise ValueError(f"{len(tasks)} tasks but {len(completions)} completions")
        futures = [self.submit(t, c) for t, c in zip(tasks, completions)]
        return [f.result() for f in futures]

    def metrics(self) -> dict:
        with self._lock:
            s = self._stats
            span = (s.last_done - s.first_submit) if s.first_submit is not None and s.last_done else 0.0
            return {
                "backend": self._backend.name,
                "workers": self.num_workers,
                "submitted": s.submitted,
                "completed": s.completed,
                "infra_errors": s.infra_errors,
                "timeouts": s.timeouts,
                "worker_restarts": s.worker_restarts,
                "queue_depth": self._queue.qsize(),
                "in_flight": sum(w.job is not None for w in self._workers),
                "throughput_per_s": s.completed / span if span > 0 else 0.0,
                "latency_p50_ms": _pct(s.latencies, 0.50),
                "latency_p99_ms": _pct(s.latencies, 0.99),
                "service_p50_ms": _pct(s.service, 0.50),
            }

    def reset_metrics(self) -> None:
        """Forget the counts and latencies so far (e.g. after a warm-up); call it with no job in flight."""
        with self._lock:
            self._stats = _Stats()

    def close(self, wait: bool = True) -> None:
        """Stop taking jobs; with wait, finish the queued ones first, else fail them as infrastructure errors."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if not wait:
            self._drain_queue("reward pool closed before the job ran")
        self._wake()
        self._thread.join()
        for w in self._workers:
            self._backend.stop(w.handle)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close(wait=exc[0] is None)

    # ------------------------------------------------------------------------------------------- dispatcher

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _drain_queue(self, why: str) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            self._finish(job, Verdict.infra_error(why))

    def _finish(self, job: _Job, verdict: Verdict) -> None:
        now = time.monotonic()
        with self._lock:
            s = self._stats
            s.completed += 1
            s.last_done = now
            s.latencies.append(now - job.submitted)
            if job.started:
                s.service.append(now - job.started)
            if verdict.reward is None:
                s.infra_errors += 1
                s.timeouts += verdict.status == "timeout"
        if not job.future.done():
            job.future.set_result(verdict)

    def _restart(self, w: _Worker) -> None:
        self._backend.kill(w.handle)
        w.handle, w.job = self._backend.start(), None
        with self._lock:
            self._stats.worker_restarts += 1

    def _dispatch(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - report it on every pending future
            self._broken = f"{type(e).__name__}: {e}"
            for w in self._workers:
                if w.job is not None:
                    self._finish(w.job, Verdict.infra_error(f"reward pool dispatcher failed: {self._broken}"))
            self._drain_queue(f"reward pool dispatcher failed: {self._broken}")

    def _loop(self) -> None:
        deaths = 0  # consecutive worker deaths
        while True:
            for w in self._workers:  # hand out queued jobs to idle workers
                if w.job is None:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    job.started = time.monotonic()
                    w.job, w.deadline = job, job.started + self.task_timeout_s
                    try:
                        self._backend.send(w.handle, job)
                    except Exception as e:  # noqa: BLE001 - a dead worker, or a job that cannot be pickled
                        self._finish(job, Verdict.infra_error(f"could not send the job to a worker: {e}"))
                        self._restart(w)
            busy = [w for w in self._workers if w.job is not None]
            if self._closing and not busy and self._queue.empty():
                with self._lock:
                    if self._submitting == 0 and self._queue.empty():
                        return
            now = time.monotonic()
            timeout = min([w.deadline - now for w in busy], default=0.5)
            for w, verdict, err in self._backend.wait(busy, max(0.0, min(timeout, 0.5))):
                job = w.job
                if job is None:
                    continue
                if verdict is None:
                    self._finish(job, Verdict.infra_error(err))
                    deaths += 1
                    if deaths > 3 * self.num_workers:  # workers die at start-up: give up instead of looping
                        raise RuntimeError(f"{deaths} worker deaths in a row, last: {err}")
                    self._restart(w)
                else:
                    deaths = 0
                    w.job = None
                    self._finish(job, verdict)
            now = time.monotonic()
            for w in self._workers:
                if w.job is not None and now >= w.deadline:
                    job = w.job
                    self._restart(w)
                    msg = f"verification exceeded the pool's {self.task_timeout_s:g} s limit; worker killed"
                    self._finish(job, Verdict.infra_error(msg, status="timeout"))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker_main(int(sys.argv[2]))
