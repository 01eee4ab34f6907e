"""Local backend: each worker object is served by its own thread, calls in submission order (the embedded default).

Generation and training are torch ops that release the GIL, and verifiers that wait on I/O (sandboxes, remote
judges) overlap freely; pure-Python overhead does not. Ray (ray_backend.py) runs the same workers as processes.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from .workers import WorkerDied


class LocalHandle:
    def __init__(self, name: str, cls, *args, **kwargs):
        self.name = name
        self.obj = cls(*args, **kwargs)
        self._q: queue.Queue = queue.Queue()
        self.alive = True
        self._thread = threading.Thread(target=self._loop, name=f"async-rl-{name}", daemon=True)
        self._thread.start()

    def submit(self, method: str, *args) -> Future:
        fut: Future = Future()
        if not self.alive:
            fut.set_exception(WorkerDied(self.name))
        else:
            self._q.put((fut, method, args))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, method, args = item
            if not self.alive:
                fut.set_exception(WorkerDied(self.name))
                continue
            try:
                fut.set_result(getattr(self.obj, method)(*args))
            except WorkerDied as e:
                self.alive = False
                fut.set_exception(e)
            except BaseException as e:  # noqa: BLE001 - handed to the controller through the future
                fut.set_exception(e)

    def kill(self) -> None:
        """Fault injection: the call in flight fails at the worker's next check, later ones at once."""
        self.alive = False
        self.obj.kill()

    def stop(self) -> None:
        """Serve what was submitted, then end the thread (waits for a trainer step in flight)."""
        self._q.put(None)
        self._thread.join(timeout=120.0)


def local_handle(name: str, cls, args: tuple, num_cpus: float = 1) -> LocalHandle:
    return LocalHandle(name, cls, *args)
