"""The two ways a command stops early: bad input (UserError: one line, exit 2) and a stop asked for by a signal
(Interrupted: one line, exit 128 + the signal's number, 130 for SIGINT, 143 for SIGTERM)."""

import os
import signal


class UserError(ValueError):
    """Bad input (config, spec, checkpoint, corpus, path): the message names the problem in one line."""


def require(checks: list[tuple[bool, str]]) -> None:
    """A config's validation: the message of the first (condition, message) pair whose condition is false."""
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def threads_check(threads: int, key: str, low: int = 0) -> tuple[bool, str]:
    """A (condition, message) pair for a torch thread count: `low` (0: torch's default) up to 4x this machine's
    CPUs. More only slows a run down, and a huge count spawns threads until the process dies."""
    cpus = os.cpu_count() or 1
    return (low <= threads <= 4 * cpus, f"{key} = {threads} must be in [{low}, {4 * cpus}] ("
            + ("0: torch's default; " if low == 0 else "") + f"this machine has {cpus} CPUs)")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the signal arrived or where a stage reports that it stopped on one."""

    def __init__(self, what: str = "", signum: int = signal.SIGINT):
        super().__init__(what, int(signum))  # both in args, so the exception survives pickling (process pools)

    @property
    def signum(self) -> int:
        return self.args[1]

    def __str__(self) -> str:
        return self.args[0]


def raise_interrupted(signum, frame) -> None:
    """A signal handler: SIGTERM unwinds like Ctrl-C, so every `finally` and temporary-file cleanup runs."""
    raise Interrupted(signum=signum)
