"""Staleness-aware admission and batch selection (the bounded-staleness rule of the asynchronous loop).

Groups (G samples of one prompt) are numbered 0, 1, 2, ... and N = groups_per_step of them make one trainer step.
With the trainer at weight version v:

    admission: group g may start only while  g < (v + eta + 1) * N
    selection: step v trains groups v*N ... (v+1)*N - 1, in order, once all of them are scored

Group g of step t = g // N was admitted at a version v >= t - eta, and its tokens are at least that new (a partial
rollout moves later tokens to newer versions), so no sample is trained more than eta versions after any of its
tokens was generated. Rollouts and scoring of the next eta steps proceed while the trainer works, which also absorbs
long-tail responses: the rollout workers keep generating later groups while a long one finishes. eta = 0 admits
exactly the N groups of the current step and waits for all of them: the synchronous loop, and a fixed batch
composition makes the run independent of timing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GroupSample:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]  # the weight version that sampled each token
    finish_reason: str  # stop | length
    routes: dict[int, torch.Tensor] | None = None

    @property
    def min_version(self) -> int:
        return min(self.versions) if self.versions else 0


@dataclass
class Group:
    gid: int  # global group index: the prompt stream position
    task_index: int
    samples: list[GroupSample]
    rewards: list[float | None] = field(default_factory=list)
    start_version: int = 0  # weight version when its rollout started (the oldest token's version)
    attempt: int = 0
    rollout_s: float = 0.0  # the rollout worker's time on this group

    @property
    def min_version(self) -> int:
        return min((s.min_version for s in self.samples if s.versions), default=self.start_version)


class StalenessBuffer:
    """Bookkeeping of the controller: which groups are admitted, in flight, ready and trained, each exactly once."""

    def __init__(self, groups_per_step: int, eta: int, total_groups: int, first_group: int = 0):
        if eta < 0:
            raise ValueError("eta must be >= 0")
        self.N, self.eta, self.total = groups_per_step, eta, total_groups
        self.first = self.next_gid = first_group  # next group to admit (first_group: resuming)
        self.start_version: dict[int, int] = {}  # admitted, not yet trained: gid -> version at admission
        self.ready: dict[int, Group] = {}
        self.trained: list[int] = []

    def admissible(self, version: int) -> bool:
        return self.next_gid < min(self.total, (version + self.eta + 1) * self.N)

    def admit(self, version: int) -> int:
        assert self.admissible(version)
        gid = self.next_gid
        self.next_gid += 1
        self.start_version[gid] = version
        return gid

    def put(self, group: Group) -> None:
        if group.gid not in self.start_version or group.gid in self.ready:
            raise RuntimeError(f"group {group.gid} delivered twice or never admitted")
        self.ready[group.gid] = group

    def select(self, version: int) -> list[Group] | None:
        """The N groups of step `version` (gids version*N ...), or None while one of them is not ready."""
        gids = range(version * self.N, min((version + 1) * self.N, self.total))
        if not gids or any(g not in self.ready for g in gids):
            return None
        batch = [self.ready.pop(g) for g in gids]
        for g in gids:
            del self.start_version[g]
            self.trained.append(g)
        return batch

    @property
    def in_flight(self) -> int:
        return len(self.start_version) - len(self.ready)

    @property
    def done(self) -> bool:
        return self.first + len(self.trained) >= self.total
