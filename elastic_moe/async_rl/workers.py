"""The role workers: rollout, reward, agent loop and trainer. Plain classes: the local backend serves each from a
thread, the Ray backend makes each an actor; the controller talks to both the same way.

A worker "dies" for real under Ray (ray.kill). Locally `kill()` sets a flag the worker checks between generation
chunks and after each verification, raising WorkerDied: its in-flight call never returns a result, as with a crash.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from elastic_moe import ops
from elastic_moe.checkpoint import TRAINER_STATE, save_checkpoint, torch_state
from elastic_moe.errors import require
from elastic_moe.generate import SamplingParams
from elastic_moe.grpo_trainer import GRPOConfig, GRPOTrainer
from elastic_moe.rollout import RolloutBatch, RolloutEngine, Sample

from .buffer import Group, GroupSample
from .weights import snapshot


class WorkerDied(RuntimeError):
    """The worker was killed while (or before) serving the call: its result is lost and must be redone."""


def mix(*xs: int) -> int:
    """A seed from integers (splitmix-style), so a group's samples depend on (seed, group, chunk) only."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return h


@dataclass
class RolloutSettings:
    group_size: int = 4
    max_new_tokens: int = 32
    chunk_tokens: int = 8  # partial rollouts: check the weight version every chunk; 0: one chunk
    temperature: float = 1.0
    top_p: float = 1.0
    return_routes: bool = True  # for R3

    def validate(self) -> None:
        checks = [
            (self.group_size >= 2, "rollout.group_size must be >= 2 (advantages are relative to the group)"),
            (self.max_new_tokens >= 1 and self.chunk_tokens >= 0, "rollout: max_new_tokens >= 1, chunk_tokens >= 0"),
            (self.temperature > 0 and 0 < self.top_p <= 1, "rollout.temperature must be > 0 and top_p in (0, 1]"),
        ]
        require(checks)


@dataclass
class RolloutJob:
    gid: int
    task_index: int
    prompt: list[int]
    max_new_tokens: int
    seed: int
    attempt: int = 0


class _Killable:
    dead = False

    def kill(self) -> None:
        self.dead = True

    def check(self) -> None:
        if self.dead:
            raise WorkerDied(type(self).__name__)

    def ping(self) -> bool:
        return True


class RolloutWorker(_Killable):
    """Samples a group in chunks; between chunks it pulls newer weights and continues the unfinished samples under
    them (partial rollout), recording the version of every token."""

    def __init__(self, model, weights, settings: RolloutSettings, eos_id: int, numerics: ops.Numerics = ops.FP32,
                 spec=None, threads: int = 0):
        if threads:
            torch.set_num_threads(threads)
        self.engine = RolloutEngine(model, numerics, spec)
        self.weights, self.s, self.eos_id = weights, settings, eos_id
        self.syncs = 0

    def sync(self) -> None:
        if self.weights.version() > self.engine.version:
            version, state = self.weights.get()
            self.engine.load_weights(state, version)
            self.syncs += 1

    def rollout(self, job: RolloutJob) -> Group:
        t0 = time.perf_counter()
        self.check()
        self.sync()
        s, G = self.s, self.s.group_size
        start = self.engine.version
        out = [GroupSample(list(job.prompt), [], [], [], "length", None) for _ in range(G)]
        active = list(range(G))
        chunk = s.chunk_tokens or job.max_new_tokens
        produced, c = 0, 0
        while active and produced < job.max_new_tokens:
            n = min(chunk, job.max_new_tokens - produced)
            sp = SamplingParams(n, s.temperature, s.top_p, (), s.return_routes, seed=mix(job.seed, job.gid, c))
            if c == 0:
                comps = self.engine.generate([job.prompt], sp, self.eos_id, n=G)
            else:  # every active sample has `produced` tokens: the batch needs no padding
                comps = self.engine.generate([job.prompt + out[i].tokens for i in active], sp, self.eos_id)
            for i, comp in zip(active, comps):
                o = out[i]
                if comp.routes is not None:
                    # the new call re-ran the earlier positions: keep the routes they were sampled with. After a weight
                    # sync, the new chunk's tokens were drawn with those positions re-run under the new weights, so
                    # R3 then replays a mix of versions (TIS on the per-version log-probs covers the gap)
                    o.routes = comp.routes if o.routes is None else {
                        k: torch.cat([o.routes[k][:-1], r[len(comp.prompt) - 1:]]) for k, r in comp.routes.items()}
                o.tokens += comp.tokens
                o.logprobs += comp.logprobs
                o.versions += [self.engine.version] * len(comp.tokens)
                o.finish_reason = comp.finish_reason
            produced += n
            c += 1
            active = [i for i in active if out[i].finish_reason != "stop"]
            self.check()
            if active and produced < job.max_new_tokens:
                self.sync()
        return Group(job.gid, job.task_index, out, start_version=start, attempt=job.attempt,
                     rollout_s=time.perf_counter() - t0)


@dataclass
class RewardJob:
    gid: int
    index: int  # sample index in the group
    attempt: int
    task_index: int
    tokens: list[int]


class RewardWorker(_Killable):
    """Scores one sample with `reward_fn(task_index, tokens) -> float | None` (None: infrastructure failure; so is
    a NaN or infinite reward, which would otherwise poison its group's advantages and with them the whole step)."""

    def __init__(self, reward_fn):
        self.reward_fn = reward_fn

    def score(self, job: RewardJob) -> tuple[RewardJob, float | None, float]:
        self.check()
        t0 = time.perf_counter()
        r = self.reward_fn(job.task_index, job.tokens)
        self.check()
        r = float(r) if r is not None and math.isfinite(r) else None
        return job, r, time.perf_counter() - t0


class AgentWorker(_Killable):
    """Multi-turn tool episodes (tasks.agent.run_episode) with the current versioned weights: returns the message
    trace, the verdict and the weight versions used per turn."""

    def __init__(self, model, weights, tokenizer, tasks, max_new_tokens: int = 64, max_turns: int = 4):
        self.engine = RolloutEngine(model)
        self.weights, self.tok, self.tasks = weights, tokenizer, tasks
        self.max_new_tokens, self.max_turns = max_new_tokens, max_turns

    def episode(self, task_index: int, seed: int) -> dict:
        from elastic_moe.tasks import agent

        versions: list[int] = []

        def gen(messages: list[dict]) -> str:
            self.check()
            if self.weights.version() > self.engine.version:
                self.engine.load_weights(*reversed(self.weights.get()))
            ids = self.tok.encode_chat(messages, add_generation_prompt=True)
            budget = min(self.max_new_tokens, self.engine.cfg.max_position_embeddings - len(ids))
            if budget < 1:
                return ""
            comp = self.engine.generate([ids], SamplingParams(budget, seed=mix(seed, len(versions))),
                                        eos_id=self.tok.eos_id)[0]
            versions.append(self.engine.version)
            return self.tok.decode(comp.tokens, skip_special_tokens=True)

        ep = agent.run_episode(self.tasks[task_index], gen, self.max_turns)
        return {"messages": ep.messages, "reward": ep.verdict.reward, "turns": ep.turns, "versions": versions}


class TrainerWorker(_Killable):
    """GRPO updates on batches of scored groups; publishes every new weight version to the store. The version is
    the number of trainer steps (a step with no usable sample still counts, so admission never stalls)."""

    def __init__(self, model, weights, grpo: GRPOConfig, lr: float, temperature: float, version: int = 0,
                 state_path: str | None = None, threads: int = 0, ref_model=None):
        if threads:
            torch.set_num_threads(threads)
        self.model = model
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.trainer = GRPOTrainer(model, opt, grpo, temperature, ref_model=ref_model)
        if state_path is not None:
            self.trainer.load_state_dict(torch.load(state_path, weights_only=True))
        self.trainer.version = version
        self.weights = weights
        self.weights.publish(snapshot(model), version)

    def step(self, groups: list[Group], save_to: str | None = None, meta: dict | None = None) -> dict:
        G = len(groups[0].samples)
        samples = [Sample(j, s.prompt, s.tokens, s.logprobs, s.finish_reason, s.min_version, s.routes)
                   for j, g in enumerate(groups) for s in g.samples]
        rewards = [r for g in groups for r in g.rewards]
        batch = RolloutBatch(samples, G, self.trainer.version, list(range(len(groups))))
        version = self.trainer.version
        m = self.trainer.step(batch, rewards)
        m.pop("skip_reason", None)
        self.trainer.version = version + 1
        self.weights.publish(snapshot(self.model), version + 1)
        if save_to is not None:
            self.save(save_to, meta or {})
        m["version"] = version + 1
        return m

    def save(self, path: str, meta: dict) -> None:
        state = self.trainer.state_dict()
        save_checkpoint(path, self.model, {"async_rl": meta},
                        extra={TRAINER_STATE: torch_state(state)})

    def parameters(self) -> dict[str, torch.Tensor]:
        return snapshot(self.model)


def load_trainer_state(ckpt: str | Path) -> Path:
    return Path(ckpt) / TRAINER_STATE
