"""One memory cgroup per sandbox run: a single limit for all of the run's processes, its tmpfs and its memfd files.

RLIMIT_AS bounds each process of a sandbox on its own, so code that forks (up to the process limit) or keeps data
in memfd or tmpfs files can hold several times `Limits.memory_mb`. Where this process may create cgroups (root with
the cgroup-v1 memory controller; on cgroup v2, the real root cgroup, or a delegated subtree named by
ELASTIC_MOE_SANDBOX_CGROUP), each run gets a child cgroup with `memory + swap limit = Limits.run_memory_mb`; the
kernel's out-of-memory killer then acts inside that cgroup only, and `oom_kills()` tells the caller that it did.
Elsewhere `create()` returns None and the per-process limits are all there is (`reason()` says why).

Where the cpu controller is there too (cgroup v1: a `cpu` hierarchy this process may write to; cgroup v2: `cpu`
enabled for the parent's children), the run's processes also share one CPU weight, equal to every other run's: a
run that starts many busy processes (up to its process limit) then slows a concurrent run no more than a
one-process run would (session 30's red team: 26 spinners made a concurrent run 7x slower on two CPUs, 9x pinned
to one). `cpu_share()` says whether runs get one.

Cost: a few hundred microseconds to create and remove the cgroups, and 5 to 15 ms per run on this project's
cgroup-v1 machines, almost all of it in moving the child into the memory cgroup (the kernel waits for an RCU grace
period when no other move happened just before); joining the cpu cgroup right after adds about 0.1 ms.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from dataclasses import dataclass

_PARENT: tuple[str, int] | None = None
_PROBED = False
_REASON = ""
_COUNTER = itertools.count()
PREFIX = "emoe-sandbox-"


_CPU_PARENT: str | None = None  # cgroup v1: the folder in the cpu hierarchy where runs' cpu cgroups go


@dataclass
class MemoryCgroup:
    path: str
    version: int  # 1 or 2
    cpu_path: str | None = None  # cgroup v1: the run's cgroup in the cpu hierarchy (v2: `path` holds both)

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    @property
    def procs_files(self) -> list[str]:
        """Every cgroup.procs file a process of the run must join (memory first)."""
        return [self.procs_file] + ([os.path.join(self.cpu_path, "cgroup.procs")] if self.cpu_path else [])

    def _counter(self, file: str, key: str | None = None) -> int:
        try:
            with open(os.path.join(self.path, file)) as f:
                if key is None:
                    return int(f.read())
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def oom_kills(self) -> int:
        """How many processes the out-of-memory killer took in this cgroup because it reached its own limit (a kill
        by a machine-wide OOM also counts in oom_kill, but then the limit was never hit)."""
        if self.version == 1:  # some kernels leave failcnt at 0 at the limit: the peak usage tells too
            hit = False
            for x in ("", "memsw."):  # memsw. files exist only with swap accounting
                limit = self._counter(f"memory.{x}limit_in_bytes")
                peak = self._counter(f"memory.{x}max_usage_in_bytes")
                hit |= limit > 0 and (self._counter(f"memory.{x}failcnt") > 0 or peak >= limit - (64 << 10))
            return self._counter("memory.oom_control", "oom_kill") if hit else 0
        hit = self._counter("memory.events", "oom")
        return self._counter("memory.events", "oom_kill") if hit else 0

    def pids(self) -> list[int]:
        out: set[int] = set()
        for file in self.procs_files:
            try:
                with open(file) as f:
                    out.update(int(line) for line in f if line.strip())
            except OSError:
                pass
        return sorted(out)

    def remove(self, wait_s: float = 2.0) -> bool:
        """SIGKILL whatever still runs in the cgroup (e.g. a process that left the sandbox's process group),
        then delete it (and its cpu cgroup). False if it could not be deleted in `wait_s`."""
        deadline = time.monotonic() + wait_s
        kill_file = os.path.join(self.path, "cgroup.kill")  # cgroup v2, Linux 5.14+: no race with pid reuse
        with contextlib.suppress(OSError):
            write_control(kill_file, "1")
        folders = [self.path] + ([self.cpu_path] if self.cpu_path else [])
        while True:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for folder in list(folders):
                try:
                    os.rmdir(folder)
                    folders.remove(folder)
                except FileNotFoundError:
                    folders.remove(folder)
                except OSError:  # busy: killed processes take a moment to leave
                    pass
            if not folders:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def write_control(path: str, text: str) -> None:
    """Write a cgroup control file that must already exist (never create a plain file in its place)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _mount_entries() -> list[tuple[str, str, str, str]]:
    """(mount point, root, fstype, super options) of every mount, from /proc/self/mountinfo."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            entries.append((fields[4], fields[3], fstype, options))
    return entries


def _mounts() -> dict[str, tuple[str, str]]:
    """{"v1": (mount point, root), "cpu-v1": (...), "v2": (...)} for the memory-v1, cpu-v1 and cgroup2
    hierarchies."""
    found: dict[str, tuple[str, str]] = {}
    for point, root, fstype, options in _mount_entries():
        if fstype == "cgroup" and "memory" in options.split(","):
            found["v1"] = (point, root)
        elif fstype == "cgroup" and "cpu" in options.split(","):
            found.setdefault("cpu-v1", (point, root))
        elif fstype == "cgroup2":
            found.setdefault("v2", (point, root))
    return found


def _version_of(folder: str) -> int:
    """1 or 2 for a folder of a memory-v1 or a cgroup2 hierarchy; raises OSError for anything else."""
    real = os.path.realpath(folder)
    if not os.path.isdir(real):
        raise OSError(f"{folder} is not a folder")
    best = ("", "", "")
    for point, _, fstype, options in _mount_entries():
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, fstype, options)
    if best[1] == "cgroup2":
        return 2
    if best[1] == "cgroup" and "memory" in best[2].split(","):
        return 1
    raise OSError(f"{folder} is on a {best[1] or 'unknown'} file system, not a memory cgroup hierarchy")


def _own_cgroup_dir(mount: tuple[str, str], path: str) -> str:
    """The folder of cgroup `path` (as /proc/self/cgroup names it) under a mount of the hierarchy's `root`."""
    point, root = mount
    if root != "/":
        root = root.rstrip("/")
        if path != root and not path.startswith(root + "/"):  # "/a" is not the root of "/ab/c"
            raise OSError(f"this process's cgroup {path} is outside the mounted part {root} of its hierarchy")
        path = path[len(root):]
    return os.path.join(point, path.lstrip("/"))


def _find_parent() -> tuple[str, int]:
    """The folder where runs' cgroups go and its cgroup version; raises OSError with the reason."""
    mounts = _mounts()
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in entries:
        if "memory" in controllers.split(",") and "v1" in mounts:
            return _own_cgroup_dir(mounts["v1"], path), 1
    for hierarchy, _, path in entries:
        if hierarchy == "0" and "v2" in mounts:
            folder = _own_cgroup_dir(mounts["v2"], path)
            with open(os.path.join(folder, "cgroup.subtree_control")) as f:
                if "memory" in f.read().split():  # in practice only at the real root (no-internal-process rule)
                    return folder, 2
            raise OSError(f"the memory controller is not enabled for the children of {folder} (on cgroup v2, "
                          f"delegate a subtree and name it in ELASTIC_MOE_SANDBOX_CGROUP: docs/tasks.md)")
    raise OSError("no memory cgroup hierarchy is mounted")


def _find_cpu_parent() -> str:
    """cgroup v1: the folder in the cpu hierarchy where runs' cpu cgroups go; raises OSError with the reason."""
    mounts = _mounts()
    if "cpu-v1" not in mounts:
        raise OSError("no cgroup-v1 cpu hierarchy is mounted")
    with open("/proc/self/cgroup") as f:
        for _, controllers, path in (line.rstrip("\n").split(":", 2) for line in f):
            if "cpu" in controllers.split(","):
                return _own_cgroup_dir(mounts["cpu-v1"], path)
    raise OSError("this process is in no cgroup of the cpu hierarchy")


def _v2_has_cpu(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "cgroup.subtree_control")) as f:
            return "cpu" in f.read().split()
    except OSError:
        return False


def _limit_files(version: int) -> tuple[str, str]:
    if version == 1:
        return "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
    return "memory.max", "memory.swap.max"


def _create_in(parent: str, version: int, limit_bytes: int, cpu_parent: str | None = None) -> MemoryCgroup:
    name = f"{PREFIX}{os.getpid()}-{next(_COUNTER)}"
    cg = MemoryCgroup(os.path.join(parent, name), version)
    os.mkdir(cg.path)
    try:
        if cpu_parent is not None:  # best effort: without it the run has no equal CPU share, nothing worse
            with contextlib.suppress(OSError):
                os.mkdir(os.path.join(cpu_parent, name))
                cg.cpu_path = os.path.join(cpu_parent, name)
        memory, swap = _limit_files(version)
        write_control(os.path.join(cg.path, memory), str(limit_bytes))
        if os.path.exists(os.path.join(cg.path, swap)):  # absent without swap accounting
            write_control(os.path.join(cg.path, swap), str(limit_bytes) if version == 1 else "0")  # v2: swap alone
        if version == 2:  # one out-of-memory kill takes the whole run
            write_control(os.path.join(cg.path, "memory.oom.group"), "1")
    except OSError:
        cg.remove()
        raise
    return cg


def _remove_stale(parent: str) -> None:
    """Delete run cgroups left by processes that died before cleaning up (a folder of either hierarchy)."""
    for name in os.listdir(parent):
        if name.startswith(PREFIX):
            pid = name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                MemoryCgroup(os.path.join(parent, name), 0).remove(wait_s=0.2)


def parent() -> tuple[str, int] | None:
    """(folder, version) where runs' cgroups are created, probed once per process; None where not possible.

    ELASTIC_MOE_SANDBOX_CGROUP: "auto" (default) looks for a memory hierarchy this process may write to, "off"
    turns the cgroups off, anything else is the folder to create them in."""
    global _PARENT, _PROBED, _REASON
    if not _PROBED:
        _PROBED = True
        setting = os.environ.get("ELASTIC_MOE_SANDBOX_CGROUP", "auto")
        if setting == "off":
            _REASON = "turned off by ELASTIC_MOE_SANDBOX_CGROUP=off"
        elif not os.path.exists("/proc/self/cgroup"):
            _REASON = "no /proc/self/cgroup (not Linux)"
        else:
            try:
                if setting == "auto":
                    folder, version = _find_parent()
                else:  # a folder prepared for us, e.g. a cgroup-v2 subtree delegated to this user
                    folder, version = setting, _version_of(setting)
                _create_in(folder, version, 64 << 20).remove()
                _remove_stale(folder)
                _PARENT = (folder, version)
                _probe_cpu(version)
            except (OSError, ValueError) as e:
                if setting != "auto":  # asked for by name: fail loudly, on every run
                    _PROBED = False
                    raise OSError(f"ELASTIC_MOE_SANDBOX_CGROUP={setting} is not usable: {e}") from e
                _REASON = f"{type(e).__name__}: {e}"
    return _PARENT


def _probe_cpu(version: int) -> None:
    """cgroup v1: find and try the cpu hierarchy (a run without an equal CPU share is not an error)."""
    global _CPU_PARENT
    if version != 1:
        return
    with contextlib.suppress(OSError, ValueError):
        folder = _find_cpu_parent()
        probe = os.path.join(folder, f"{PREFIX}{os.getpid()}-probe")
        os.mkdir(probe)
        os.rmdir(probe)
        _remove_stale(folder)
        _CPU_PARENT = folder


def cpu_share() -> bool:
    """Whether each run's processes share one CPU weight, equal to every other run's."""
    where = parent()
    if where is None:
        return False
    return _CPU_PARENT is not None if where[1] == 1 else _v2_has_cpu(where[0])


def reason() -> str:
    """Why runs get no memory cgroup ("" when they do)."""
    parent()
    return _REASON


def create(limit_bytes: int) -> MemoryCgroup | None:
    """A fresh cgroup limited to `limit_bytes` (memory and swap), or None where this machine allows none."""
    where = parent()
    if where is None:
        return None
    return _create_in(*where, limit_bytes, _CPU_PARENT if where[1] == 1 else None)
