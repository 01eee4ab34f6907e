"""The controller of decoupled asynchronous GRPO: admits groups under the staleness bound, dispatches them to
rollout workers and their samples to reward workers, hands full batches to the trainer, restarts dead workers and
requeues what they held, checkpoints and resumes.

    ctl = Controller(run_cfg, model, prompts, reward_fn, rollout_settings, grpo_cfg, eos_id, out_dir=...)
    summary = ctl.run()          # asynchronous (run_cfg.eta versions of staleness at most)
    summary = ctl.run_sync()     # the synchronous reference loop: rollout all, score all, train, repeat

Data flow (each arrow a future; one call in flight per worker so a death loses exactly that call):
    admit gid -> RolloutWorker.rollout(job) -> Group -> RewardWorker.score(sample) x G -> StalenessBuffer
    -> TrainerWorker.step(N groups) -> new weights in the WeightStore -> rollout workers pull them between chunks
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from elastic_moe import ops
from elastic_moe.errors import UserError, require, threads_check
from elastic_moe.grpo_trainer import GRPOConfig

from .buffer import Group, StalenessBuffer
from .local import local_handle
from .ray_backend import is_actor_death
from .weights import WeightStore
from .workers import (
    TRAINER_STATE,
    RewardJob,
    RewardWorker,
    RolloutJob,
    RolloutSettings,
    RolloutWorker,
    TrainerWorker,
    WorkerDied,
    mix,
)


@dataclass
class RunConfig:
    steps: int = 10  # trainer steps
    groups_per_step: int = 4  # prompts per step (x rollout.group_size samples)
    eta: int = 1  # max staleness in weight versions; 0: synchronous
    backend: str = "local"  # local (threads) | ray (actors)
    rollout_workers: int = 1
    reward_workers: int = 2
    rollout_cpus: float = 1.0  # Ray resources per role
    reward_cpus: float = 0.25
    trainer_cpus: float = 1.0
    lr: float = 1e-4  # the trainer's log-probs use rollout.temperature, the sampling temperature
    seed: int = 0
    threads: int = 1  # torch threads per worker
    long_tail_min_tokens: int = 0  # > 0: per-group token budget min * Pareto(alpha), capped at max_new_tokens
    long_tail_alpha: float = 1.2
    save_every: int = 0  # trainer steps between checkpoints (and at the end and on SIGINT/SIGTERM); 0: only those
    keep_checkpoints: int = 2
    tensorboard: bool = True  # mirror metrics.jsonl to RUN_DIR/tb when tensorboard is installed
    max_restarts: int = 10  # per role, before the run gives up

    def validate(self) -> None:
        checks = [
            (self.backend in ("local", "ray"), f"run.backend = {self.backend!r}: expected local or ray"),
            (self.eta >= 0 and self.steps >= 0 and self.groups_per_step >= 1,
             "run: eta >= 0, steps >= 0, groups_per_step >= 1"),
            (self.rollout_workers >= 1 and self.reward_workers >= 1, "run: at least one rollout and one reward worker"),
            (self.lr > 0, "run: lr must be > 0"),
            # torch threads per worker; on Ray the workers may run on other machines, so no upper bound here
            threads_check(self.threads, "run.threads", low=1) if self.backend == "local"
            else (self.threads >= 1, f"run.threads = {self.threads} must be >= 1"),
            (self.max_restarts >= 0 and self.save_every >= 0 and self.keep_checkpoints >= 1,
             "run: max_restarts >= 0, save_every >= 0, keep_checkpoints >= 1"),
            (self.long_tail_min_tokens >= 0 and self.long_tail_alpha > 0,
             "run: long_tail_min_tokens >= 0 and long_tail_alpha > 0"),
            (min(self.rollout_cpus, self.reward_cpus, self.trainer_cpus) > 0, "run: *_cpus must be > 0"),
        ]
        require(checks)


@dataclass
class Stats:
    rollout_busy_s: float = 0.0
    trainer_busy_s: float = 0.0
    reward_latency_s: list[float] = field(default_factory=list)
    staleness: Counter = field(default_factory=Counter)  # sample lag (versions) at training -> count
    token_staleness: Counter = field(default_factory=Counter)
    restarts: Counter = field(default_factory=Counter)  # role -> worker restarts
    requeued: Counter = field(default_factory=Counter)  # role -> jobs requeued after a death
    duplicates: int = 0  # results that arrived for work already done (ignored)


class Controller:
    def __init__(self, cfg: RunConfig, model, prompts: list[list[int]], reward_fn: Callable, rollout: RolloutSettings,
                 grpo: GRPOConfig, eos_id: int, out_dir: str | Path | None = None, log: Callable | None = None):
        cfg.validate()
        rollout.validate()
        self.cfg, self.model, self.prompts, self.reward_fn = cfg, model, prompts, reward_fn
        self.rs, self.grpo, self.eos_id = rollout, grpo, eos_id
        self.out = Path(out_dir) if out_dir is not None else None
        self.log = log or (lambda msg: None)
        self.stats = Stats()
        self.rows: list[dict] = []
        self.faults: list[tuple[str, float]] = []  # (role, after this many trained groups) to kill: tests
        self.trainer, self.rollers, self.scorers, self.sink, self.weights = None, [], [], None, None
        self._train_in_flight = None  # (future, groups, t submitted, queue depths, version, t0) of the async loop
        self.stop = None  # a runloop.StopSignal: on SIGINT/SIGTERM the run checkpoints where it is and returns

    # ---------------------------------------------------------------------------------------------- plumbing

    def _order(self, gid: int) -> int:
        """The task of group gid: consecutive slices of per-epoch shuffles of the prompts."""
        epoch, pos = divmod(gid, len(self.prompts))
        perm = list(range(len(self.prompts)))
        random.Random(mix(self.cfg.seed, epoch)).shuffle(perm)
        return perm[pos]

    def job(self, gid: int) -> RolloutJob:
        t = self._order(gid)
        budget = self.rs.max_new_tokens
        if self.cfg.long_tail_min_tokens > 0:
            u = random.Random(mix(self.cfg.seed, gid, 7)).random()
            budget = min(budget, math.ceil(self.cfg.long_tail_min_tokens * (1 - u) ** (-1 / self.cfg.long_tail_alpha)))
        return RolloutJob(gid, t, self.prompts[t], budget, self.cfg.seed)

    def _start(self):
        """Resume state, weight store and workers."""
        c = self.cfg
        start, state_path = 0, None
        # grpo.kl_coef > 0: the penalty is towards the initial policy, so copy it before a resume loads newer weights
        ref = copy.deepcopy(self.model).requires_grad_(False) if self.grpo.kl_coef > 0 else None
        if self.out is not None:
            from elastic_moe.checkpoint import load_state, read_meta
            from elastic_moe.runloop import latest_checkpoint

            ck = latest_checkpoint(self.out)
            if ck is not None:
                from safetensors.torch import load_file

                meta = read_meta(ck)
                check_resume(meta, c, self.out)
                load_state(self.model, load_file(str(ck / "model.safetensors")), str(ck))
                start = meta["async_rl"]["step"]
                state_path = str(ck / TRAINER_STATE)
                self.log(f"resuming from {ck} (step {start})")
        if c.backend == "ray":
            from .ray_backend import check_cpus, ray_handle, start_ray
            from .weights import RayWeightStore

            start_ray()
            check_cpus(c.trainer_cpus + c.rollout_workers * c.rollout_cpus + c.reward_workers * c.reward_cpus)
            make, weights = ray_handle, RayWeightStore()
        else:
            make, weights = local_handle, WeightStore()
        self._make = make
        self.weights = weights
        # restarted rollout workers copy this pristine model, never the one the trainer is updating (a deepcopy
        # mid-step would also copy the trainer's forward hooks), and then pull the latest weights
        self._roll_args = (copy.deepcopy(self.model), weights, self.rs, self.eos_id, ops.FP32, None, c.threads)
        self.trainer = make("trainer", TrainerWorker, (self.model, weights, self.grpo, c.lr, self.rs.temperature, start,
                                                       state_path, c.threads, ref), c.trainer_cpus)
        self.trainer.submit("ping").result()  # the initial weights are published
        self.rollers = [make(f"rollout{i}", RolloutWorker, self._roll_args, c.rollout_cpus)
                        for i in range(c.rollout_workers)]
        self.scorers = [make(f"reward{i}", RewardWorker, (self.reward_fn,), c.reward_cpus)
                        for i in range(c.reward_workers)]
        return start

    def _restart(self, role: str, pool: list, i: int) -> None:
        self.stats.restarts[role] += 1
        if self.stats.restarts[role] > self.cfg.max_restarts:
            raise RuntimeError(f"{role} workers died {self.stats.restarts[role]} times: giving up")
        args = self._roll_args if role == "rollout" else (self.reward_fn,)
        cls = RolloutWorker if role == "rollout" else RewardWorker
        pool[i].stop()
        pool[i] = self._make(f"{role}{i}", cls, args, self.cfg.rollout_cpus if role == "rollout" else
                             self.cfg.reward_cpus)
        self.log(f"{role} worker {i} died: restarted")

    def _save_path(self, step: int) -> str | None:
        if self.out is None:
            return None
        if step == self.cfg.steps or (self.cfg.save_every and step % self.cfg.save_every == 0):
            return str(self.out / "checkpoints" / f"step_{step:08d}")
        return None

    def _meta(self, step: int) -> dict:
        """A checkpoint's `async_rl` meta: what a resume must keep (check_resume)."""
        return {"step": step, "seed": self.cfg.seed, "groups_per_step": self.cfg.groups_per_step}

    def _record(self, step: int, groups: list[Group], m: dict, t0: float, depth: dict) -> dict:
        s = self.stats
        lags = Counter()
        for g in groups:
            for smp in g.samples:
                lags[step - smp.min_version] += 1
                for v in smp.versions:
                    s.token_staleness[step - v] += 1
        s.staleness.update(lags)
        if lags and max(lags) > self.cfg.eta and self.mode == "async":
            raise AssertionError(f"staleness bound violated: lag {max(lags)} > eta {self.cfg.eta}")
        el = time.perf_counter() - t0
        trained = sum(len(r["gids"]) for r in self.rows) + len(groups)
        row = {"step": step + 1, "mode": self.mode, "elapsed_s": el, "gids": [g.gid for g in groups],
               "samples_per_s": trained * self.rs.group_size / el,
               "trainer_idle_frac": 1 - s.trainer_busy_s / el,
               "rollout_idle_frac": 1 - s.rollout_busy_s / (el * self.cfg.rollout_workers),
               "staleness_hist": {str(k): v for k, v in sorted(lags.items())},
               "reward_latency_s": sum(s.reward_latency_s) / max(len(s.reward_latency_s), 1), **depth,
               **{k: v for k, v in m.items() if isinstance(v, (int, float))}}
        self.rows.append(row)
        if self.sink is not None:
            self.sink.log(row)
        return row

    def _open_sink(self, start: int):
        self.sink = None
        if self.out is not None:
            from elastic_moe.metrics import MetricsSink

            self.out.mkdir(parents=True, exist_ok=True)
            self.sink = MetricsSink(self.out, resume_step=start, tensorboard=self.cfg.tensorboard)

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.signum is not None

    def _stop_at(self, version: int, start: int, t0: float) -> dict:
        """A signal arrived: checkpoint the trainer at `version` (unless that step saved one), drop the rollouts and
        verifications in flight, and return the summary with `stopped_by` set (runloop.raise_if_stopped)."""
        path = None
        if self.out is not None:
            from elastic_moe.runloop import latest_checkpoint

            path = self.out / "checkpoints" / f"step_{version:08d}"
            if version > start and not path.is_dir():
                self.trainer.submit("save", str(path), self._meta(version)).result()
            path = latest_checkpoint(self.out)  # None: stopped before the first one
            self.log(f"stopped at step {version}; checkpoint {path}; run the same command again to resume")
        for h in (*self.rollers, *self.scorers):
            h.kill()
        summary = self._finish(start, t0)
        summary.update(interrupted=version < self.cfg.steps, step=version, checkpoint=path and str(path))
        return summary

    def _step_line(self, version: int, start: int, t0: float, row: dict) -> str:
        el = time.perf_counter() - t0
        eta = el / max(version - start, 1) * (self.cfg.steps - version)
        return (f"step {version}/{self.cfg.steps}: reward {row.get('reward/mean', math.nan):.3f} lag "
                f"{_hist(row['staleness_hist'])} ({el:.0f} s, ETA {eta:.0f} s)")

    def _finish(self, start: int, t0: float) -> dict:
        wall = time.perf_counter() - t0
        if self.sink is not None:
            self.sink.close()
        if self.out is not None:
            from elastic_moe.runloop import prune_checkpoints

            if (self.out / "checkpoints").is_dir():
                prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        params = self.trainer.submit("parameters").result()
        for h in (self.trainer, *self.rollers, *self.scorers):
            h.stop()
        self.weights.close()
        s = self.stats
        trained = [g for r in self.rows for g in r["gids"]]
        n = len(trained) * self.rs.group_size
        # a signal during the last step: the run finished, and the command still ends as interrupted
        stopped = {"stopped_by": int(self.stop.signum), "interrupted": False,
                   "step": start + len(self.rows)} if self._stopping() else {}
        return {**stopped, "mode": self.mode, "steps": len(self.rows), "start_step": start, "wall_s": wall, "samples": n,
                "wall_per_sample_s": wall / max(n, 1), "trained_gids": trained,
                "trainer_idle_frac": 1 - s.trainer_busy_s / wall,
                "rollout_idle_frac": 1 - s.rollout_busy_s / (wall * self.cfg.rollout_workers),
                "staleness_hist": {str(k): v for k, v in sorted(s.staleness.items())},
                "token_staleness_hist": {str(k): v for k, v in sorted(s.token_staleness.items())},
                "reward_latency_s": sum(s.reward_latency_s) / max(len(s.reward_latency_s), 1),
                "restarts": dict(s.restarts), "requeued": dict(s.requeued), "duplicates": s.duplicates,
                "losses": [r.get("loss/pg_loss", math.nan) for r in self.rows], "rows": self.rows, "params": params}

    # --------------------------------------------------------------------------------- the asynchronous loop

    def _stop_workers(self) -> None:
        """After an error or a signal: rollout and reward workers drop their call at the next check; the trainer
        finishes its step (and the checkpoint it may be writing), whose metrics row is logged, so that a resume from
        that checkpoint leaves no step out of metrics.jsonl. No worker thread outlives the run: one still inside
        torch when the interpreter exits aborts the process."""
        for h in (*self.rollers, *self.scorers):
            h.kill()
        in_flight, self._train_in_flight = self._train_in_flight, None
        if in_flight is not None:
            fut, batch, ts, depth, version, t0 = in_flight
            try:
                m = fut.result(timeout=120.0)
                self.stats.trainer_busy_s += time.perf_counter() - ts
                self._record(version, batch, m, t0, depth)
            except BaseException:  # noqa: BLE001 - the error that stopped the run is the one to report
                pass
        for h in (*self.rollers, *self.scorers, *([self.trainer] if self.trainer is not None else [])):
            h.stop()
        if self.weights is not None:
            self.weights.close()
        if self.sink is not None:
            self.sink.close()

    def _with_workers(self, loop: Callable[[int], dict]) -> dict:
        try:
            return loop(self._start())
        except BaseException:
            self._stop_workers()
            raise

    def run(self) -> dict:
        return self._with_workers(self._run_async)

    def run_sync(self) -> dict:
        """Rollout every group of the step, score every sample (reward workers in parallel), train; repeat."""
        return self._with_workers(self._run_sync)

    def _run_async(self, start: int) -> dict:
        self.mode = "async"
        c, N, G = self.cfg, self.cfg.groups_per_step, self.rs.group_size
        self._open_sink(start)
        buf = StalenessBuffer(N, c.eta, c.steps * N, first_group=start * N)
        version = start
        pending_roll: deque[RolloutJob] = deque()
        pending_rew: deque[RewardJob] = deque()
        scoring: dict[int, Group] = {}
        roll_busy: dict = {}  # future -> (worker index, job, t0)
        rew_busy: dict = {}
        train_fut = None
        faults = sorted(self.faults, key=lambda f: f[1])
        t0 = time.perf_counter()
        while not buf.done:
            if self._stopping() and train_fut is None:
                return self._stop_at(version, start, t0)
            while not self._stopping() and buf.admissible(version):
                pending_roll.append(self.job(buf.admit(version)))
            # stopping (the trainer's step is still to be kept): no new rollout or verification, which the stop would
            # drop after waiting it out
            idle = [] if self._stopping() else [i for i in range(len(self.rollers))
                                                 if i not in {v[0] for v in roll_busy.values()}]
            for i in idle:
                if not pending_roll:
                    break
                job = pending_roll.popleft()
                roll_busy[self.rollers[i].submit("rollout", job)] = (i, job, time.perf_counter())
            idle = [] if self._stopping() else [i for i in range(len(self.scorers))
                                                 if i not in {v[0] for v in rew_busy.values()}]
            for i in idle:
                if not pending_rew:
                    break
                job = pending_rew.popleft()
                rew_busy[self.scorers[i].submit("score", job)] = (i, job, time.perf_counter())
            if train_fut is None and not self._stopping():
                batch = buf.select(version)
                if batch is not None:
                    depth = {"queue/pending_rollouts": len(pending_roll), "queue/pending_rewards": len(pending_rew),
                             "queue/ready_groups": len(buf.ready), "queue/in_flight_groups": buf.in_flight}
                    path = self._save_path(version + 1)
                    train_fut = self.trainer.submit("step", batch, path, self._meta(version + 1))
                    train_info = (batch, time.perf_counter(), depth)
                    self._train_in_flight = (train_fut, *train_info, version, t0)
            while faults and len(buf.trained) >= faults[0][1]:  # fault injection (tests)
                role = faults.pop(0)[0]
                pool = self.rollers if role == "rollout" else self.scorers
                busy = roll_busy if role == "rollout" else rew_busy
                victim = next(iter(v[0] for v in busy.values()), 0)
                self.log(f"fault injection: killing {role} worker {victim}")
                pool[victim].kill()
            futs = [*roll_busy, *rew_busy] + ([train_fut] if train_fut is not None else [])
            if not futs:
                raise RuntimeError("async-rl controller: nothing in flight and nothing to start (a bookkeeping bug)")
            done, _ = wait(futs, timeout=5.0, return_when=FIRST_COMPLETED)
            now = time.perf_counter()
            for f in done:
                if f in roll_busy:
                    i, job, ts = roll_busy.pop(f)
                    self.stats.rollout_busy_s += now - ts
                    try:
                        group = f.result()
                    except BaseException as e:  # noqa: BLE001
                        if not (isinstance(e, WorkerDied) or is_actor_death(e)):
                            raise
                        self._restart("rollout", self.rollers, i)
                        self.stats.requeued["rollout"] += 1
                        job.attempt += 1
                        pending_roll.appendleft(job)
                        continue
                    group.rewards = [math.nan] * G  # nan: not scored yet; None: infrastructure failure
                    scoring[group.gid] = group
                    pending_rew.extend(RewardJob(group.gid, k, group.attempt, group.task_index, s.tokens)
                                       for k, s in enumerate(group.samples))
                elif f in rew_busy:
                    i, job, ts = rew_busy.pop(f)
                    try:
                        job, r, latency = f.result()
                    except BaseException as e:  # noqa: BLE001
                        if not (isinstance(e, WorkerDied) or is_actor_death(e)):
                            raise
                        self._restart("reward", self.scorers, i)
                        self.stats.requeued["reward"] += 1
                        pending_rew.appendleft(job)
                        continue
                    self.stats.reward_latency_s.append(latency)
                    group = scoring.get(job.gid)
                    if group is None or not (isinstance(group.rewards[job.index], float)
                                             and math.isnan(group.rewards[job.index])):
                        self.stats.duplicates += 1
                        continue
                    group.rewards[job.index] = r
                    if not any(isinstance(x, float) and math.isnan(x) for x in group.rewards):
                        buf.put(scoring.pop(job.gid))
                else:
                    m = f.result()  # a trainer failure ends the run; rerunning resumes from the last checkpoint
                    self._train_in_flight = None
                    batch, ts, depth = train_info
                    self.stats.trainer_busy_s += now - ts
                    row = self._record(version, batch, m, t0, depth)
                    version = m["version"]
                    train_fut = None
                    self.log(self._step_line(version, start, t0, row))
        return self._finish(start, t0)

    # ------------------------------------------------------------------------------ the synchronous reference

    def _run_sync(self, start: int) -> dict:
        self.mode = "sync"
        c, N = self.cfg, self.cfg.groups_per_step
        self._open_sink(start)
        t0 = time.perf_counter()
        for step in range(start, c.steps):
            futs = [self.rollers[k % len(self.rollers)].submit("rollout", self.job(g))
                    for k, g in enumerate(range(step * N, (step + 1) * N))]
            groups = [f.result() for f in futs]
            self.stats.rollout_busy_s += sum(g.rollout_s for g in groups)  # per call: the workers run side by side
            jobs = [RewardJob(g.gid, k, 0, g.task_index, s.tokens) for g in groups for k, s in enumerate(g.samples)]
            futs = [self.scorers[k % len(self.scorers)].submit("score", j) for k, j in enumerate(jobs)]
            scored = [f.result() for f in futs]
            for g in groups:
                g.rewards = [None] * len(g.samples)
            for job, r, latency in scored:
                groups[job.gid - step * N].rewards[job.index] = r
                self.stats.reward_latency_s.append(latency)
            tt = time.perf_counter()
            m = self.trainer.submit("step", groups, self._save_path(step + 1), self._meta(step + 1)).result()
            self.stats.trainer_busy_s += time.perf_counter() - tt
            row = self._record(step, groups, m, t0, {})
            self.log(self._step_line(step + 1, start, t0, row))
            if self._stopping() and step + 1 < c.steps:
                return self._stop_at(step + 1, start, t0)
        return self._finish(start, t0)


def check_resume(meta: dict, cfg: RunConfig, out) -> None:
    """Group g is trained at step g // groups_per_step, in an order that run.seed shuffles: resumed with another value
    of either, a run would train some groups twice and never others. (A checkpoint from before groups_per_step was
    saved is not checked for it.)"""
    saved = meta.get("async_rl", {})
    changed = [f"run.{k} {saved[k]} -> {getattr(cfg, k)}" for k in ("groups_per_step", "seed")
               if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        raise UserError(f"{out} holds a run made with other settings ({'; '.join(changed)}): resume with the same "
                        "ones, or use another --out")


def param_digest(params: dict[str, torch.Tensor]) -> float:
    return float(sum(p.double().sum() for p in params.values()))


def _hist(h: dict) -> str:
    """{lag: count} as `0:12 1:4` for the log line."""
    return " ".join(f"{k}:{v}" for k, v in h.items())
