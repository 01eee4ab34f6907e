"""The `async-rl` command's config (TOML sections: toy, task, run, rollout, grpo)."""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic_moe.errors import UserError
from elastic_moe.grpo_trainer import GRPOConfig

from .controller import RunConfig
from .toy import ToyConfig
from .workers import RolloutSettings


@dataclass
class TaskConfig:
    domain: str = "reasoning"
    difficulty: int = 1
    train_size: int = 256
    seed: int = 0
    reward_delay_s: float = 0.0  # an added sleep per verification (benchmarks: a slow verifier)
    reward_pool_workers: int = 0  # > 0: verify on a RewardPool of that many processes (local backend); 0: in-thread
    reward_timeout_s: float = 10.0

    def validate(self) -> None:
        if self.domain not in ("reasoning", "code", "open_ended"):
            raise UserError(f"task.domain = {self.domain!r}: async-rl runs single-turn domains (reasoning, code, "
                            "open_ended)")
        if self.train_size < 1 or self.difficulty < 1:
            raise UserError("task: train_size and difficulty must be >= 1")
        if self.reward_delay_s < 0 or self.reward_pool_workers < 0 or self.reward_timeout_s <= 0:
            raise UserError("task: reward_delay_s >= 0, reward_pool_workers >= 0, reward_timeout_s > 0")


@dataclass
class AsyncRLConfig:
    init: str = ""  # SFT checkpoint (with tokenizer/) to train on `task`; "" runs the toy job
    toy: ToyConfig = field(default_factory=ToyConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(mask_truncated=False))

    def validate(self) -> None:
        if self.run.backend == "ray" and self.init and self.task.reward_pool_workers > 0:
            raise UserError("task.reward_pool_workers > 0 needs run.backend = \"local\": the reward pool's worker "
                            "processes cannot be handed to Ray actors (set task.reward_pool_workers = 0 under Ray)")
