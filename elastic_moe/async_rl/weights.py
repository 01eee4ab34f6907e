"""Versioned weight sync from the trainer to the rollout workers.

The trainer publishes (version, state dict) after every optimizer step; a rollout worker polls `version()` between
generation chunks and pulls `get()` when it is newer. Locally the store holds one CPU copy in-process, shared by
every worker thread (no copy per reader). Across machines (`RayWeightStore`) the state dict is put once into the Ray
object store by the trainer and the store actor holds only its reference: readers fetch it from the nearest copy.
"""

from __future__ import annotations

import threading

import torch


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class WeightStore:
    """In-process: latest (version, state dict); publishing a newer version replaces it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._version = -1
        self._state: dict[str, torch.Tensor] | None = None

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        with self._lock:
            if version <= self._version:
                raise ValueError(f"weight version {version} published after {self._version}")
            self._state, self._version = state, version

    def version(self) -> int:
        return self._version

    def get(self) -> tuple[int, dict[str, torch.Tensor]]:
        with self._lock:
            return self._version, self._state

    def close(self) -> None:
        pass


class _StoreActor:
    """Ray actor: the latest version and an object reference to its weights (kept in a list so Ray does not
    resolve it when it is passed around)."""

    def __init__(self):
        self._version, self._ref = -1, None

    def publish(self, ref_box: list, version: int) -> None:
        if version > self._version:
            self._version, self._ref = version, ref_box[0]

    def version(self) -> int:
        return self._version

    def get(self) -> tuple[int, list]:
        return self._version, [self._ref]


class RayWeightStore:
    """The same interface as WeightStore over a named-less Ray actor; picklable, so workers get it as an argument."""

    def __init__(self, actor=None):
        import ray

        self.actor = actor if actor is not None else ray.remote(num_cpus=0)(_StoreActor).remote()

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        import ray

        ray.get(self.actor.publish.remote([ray.put(state)], version))

    def version(self) -> int:
        import ray

        return ray.get(self.actor.version.remote())

    def get(self) -> tuple[int, dict[str, torch.Tensor]]:
        import ray

        version, box = ray.get(self.actor.get.remote())
        return version, ray.get(box[0])

    def close(self) -> None:
        """The end of the run (its workers stopped): the actor, and with it the last weights' object, goes."""
        import ray

        ray.kill(self.actor, no_restart=True)

    def __reduce__(self):
        return (RayWeightStore, (self.actor,))
