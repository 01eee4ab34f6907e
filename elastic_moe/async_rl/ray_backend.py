"""Ray backend: every role worker is an actor with its own resources (num_cpus per role; GPUs for rollout and
trainer on a cluster), weights go through the object store (weights.RayWeightStore). A killed actor fails its
in-flight calls with a RayActorError, which the controller treats like a local WorkerDied."""

from __future__ import annotations

from concurrent.futures import Future


class RayHandle:
    def __init__(self, name: str, cls, args: tuple, num_cpus: float = 1, num_gpus: float = 0):
        import ray

        self.name = name
        self.actor = ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                             max_concurrency=1).remote(*args)

    def submit(self, method: str, *args) -> Future:
        return getattr(self.actor, method).remote(*args).future()

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)

    def stop(self) -> None:
        self.kill()


def start_ray(**kwargs) -> None:
    """`ray.init` for this process (once), keeping the process's SIGTERM handler: Ray's own exits at once, so a
    SIGTERM would skip every checkpoint and cleanup (and the one-line message)."""
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return
    old = signal.getsignal(signal.SIGTERM)
    ray.init(ignore_reinit_error=True, include_dashboard=False, **kwargs)
    if threading.current_thread() is threading.main_thread() and old is not None:
        signal.signal(signal.SIGTERM, old)


def check_cpus(needed: float) -> None:
    """Actors asking for more CPUs than the Ray cluster has are never scheduled: the run would wait forever."""
    import ray

    from elastic_moe.errors import UserError

    have = ray.cluster_resources().get("CPU", 0)
    if needed > have:
        raise UserError(f"the Ray workers ask for {needed:g} CPUs (run.trainer_cpus + rollout_workers x rollout_cpus "
                        f"+ reward_workers x reward_cpus), the Ray cluster has {have:g}: lower them")


def ray_handle(name: str, cls, args: tuple, num_cpus: float = 1) -> RayHandle:
    return RayHandle(name, cls, args, num_cpus)


def is_actor_death(e: BaseException) -> bool:
    try:
        from ray.exceptions import RayActorError, WorkerCrashedError
    except ImportError:
        return False
    return isinstance(e, (RayActorError, WorkerCrashedError))
