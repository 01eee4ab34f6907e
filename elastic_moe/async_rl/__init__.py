"""Decoupled, fully asynchronous RL: a controller and role workers (rollout, reward, agent loop, trainer), local
threads by default or Ray actors, bounded staleness with partial rollouts and a decoupled-PPO correction.
See controller.py for the data flow and buffer.py for the staleness rule."""

from .buffer import Group, GroupSample, StalenessBuffer
from .controller import Controller, RunConfig
from .weights import WeightStore
from .workers import RewardWorker, RolloutSettings, RolloutWorker, TrainerWorker, WorkerDied

__all__ = ["Controller", "Group", "GroupSample", "RewardWorker", "RolloutSettings", "RolloutWorker", "RunConfig",
           "StalenessBuffer", "TrainerWorker", "WeightStore", "WorkerDied"]
