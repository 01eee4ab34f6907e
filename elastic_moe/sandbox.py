"""Run untrusted Python code in a separate, locked-down process and report what happened.

The caller (`run_code`) starts `python -I -S sandbox.py --child CONFIG` in a new session, sends the code on stdin
and watches stdout/stderr with a wall-clock deadline and an output cap. Generated code never runs in the caller.

Two isolation modes, chosen once per process by `isolation_mode()`:

* "namespaces" (Linux, root or unprivileged user namespaces): the child unshares mount, network, PID, IPC and UTS
  namespaces (plus a user namespace when not root), builds a fresh read-only root on a tmpfs that holds only
  /usr, /lib*, /bin, /sbin, the Python installation, four /dev nodes and a writable size-limited tmpfs at /sandbox
  (/tmp and /dev/shm point there), pivots into it and forks an init process (PID 1 of the new PID namespace) which
  forks the worker that runs the code. The network namespace has only a down loopback, so no socket can reach the
  host or beyond; project files, home folders, /etc and /tmp are not in the new root at all; the host's processes
  are not visible; when init dies, the kernel kills every process left in the namespace. The worker runs in a
  session of its own, and init keeps no signal handler, so nothing the code sends reaches the sandbox process or
  stops init. As root, the worker also drops to a fresh unused uid so RLIMIT_NPROC applies and it cannot signal
  anything outside. Either way it gives up every capability (the bounding set too, unless a root caller lacks
  CAP_SETPCAP) before the code runs, so it cannot remount or unmount its read-only root.
* "fallback" (no namespaces allowed, e.g. a container without CAP_SYS_ADMIN and without user namespaces): the code
  runs in an empty temporary folder under rlimits, a uid drop when root, and Python audit hooks that refuse
  sockets, fork/exec/spawn, ctypes, signals to other processes, and file access outside the folder and the Python
  installation. Audit hooks are not a security boundary against a determined attacker (see docs/tasks.md), so the
  kernel enforces the same policy too, whatever the code does to the hooks: a seccomp filter (x86_64, aarch64)
  refuses process creation, sockets, System V IPC, file metadata changes and any action on another process, and
  Landlock (where the kernel has it) the file access outside those folders and, from its ABI 6, signals to
  processes outside.

In both modes, on x86_64 and aarch64, a seccomp filter also refuses kernel interfaces no test program needs
(tracing, new namespaces, io_uring, bpf, userfaultfd, file watches, socket families such as AF_VSOCK that no
network namespace confines, setsid, huge pages, and rlimits, scheduling and priorities of init; the full list is in
`seccomp_program`).

Both modes set rlimits for CPU time, address space, process count, file size, open files and core dumps, set
RLIMIT_NICE and RLIMIT_RTPRIO to 0, and run with a scrubbed environment. Where this process may create memory
cgroups (`memory_cgroup.py`), each run also gets one, so the run's processes, tmpfs and memfd files together stay
under `Limits.run_memory_mb` (`total_memory_mb`, by default `memory_mb + disk_mb`), and, where the cpu controller
is available, one CPU weight equal to every other run's. This module imports only the standard library at top
level, because it is also the child's entry point.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass

STATUSES = ("passed", "failed", "timeout", "crashed", "killed")
SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/sandbox", "TMPDIR": "/sandbox"}
# the device files code may use (namespaces bind these four; not /dev as a whole, which holds /dev/shm and /dev/pts)
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
_MEMORY_EXIT = 3  # the worker's exit code for an uncaught MemoryError
_TAIL = 4096


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, set up or report): an infrastructure error, not a verdict."""


@dataclass
class Limits:
    timeout_s: float = 5.0  # wall clock, measured by the caller
    cpu_s: int | None = None  # RLIMIT_CPU; None: ceil(timeout_s)
    memory_mb: int = 512  # RLIMIT_AS of each process
    # the memory cgroup of the whole run, where one can be made; None: memory_mb + disk_mb; 0: no cgroup
    total_memory_mb: int | None = None
    max_procs: int = 32  # RLIMIT_NPROC (enforced only for a non-root uid; the namespace mode drops to one)
    file_size_mb: int = 16  # RLIMIT_FSIZE
    disk_mb: int = 64  # size of the /sandbox tmpfs (namespace mode)
    open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # stdout + stderr; more is killed

    def check(self) -> None:
        """ValueError naming the first field with a value no run can have (disk_mb=0 would even mean no limit)."""
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"Limits.timeout_s = {self.timeout_s!r} must be a finite number > 0")
        if self.cpu_s is not None and not (isinstance(self.cpu_s, int) and self.cpu_s >= 1):
            raise ValueError(f"Limits.cpu_s = {self.cpu_s!r} must be None or an integer >= 1")
        for name in ("memory_mb", "max_procs", "file_size_mb", "disk_mb", "open_files"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"Limits.{name} = {v!r} must be an integer >= 1")
        total = self.total_memory_mb
        if total is not None and not (isinstance(total, int) and total >= 0):
            raise ValueError(f"Limits.total_memory_mb = {total!r} must be >= 0 (0: no cgroup)")
        if not (isinstance(self.max_output_bytes, int) and self.max_output_bytes >= 0):
            raise ValueError(f"Limits.max_output_bytes = {self.max_output_bytes!r} must be an integer >= 0")

    @property
    def run_memory_mb(self) -> int:
        """The limit of the run's memory cgroup (0: none)."""
        return self.memory_mb + self.disk_mb if self.total_memory_mb is None else self.total_memory_mb


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    reason: str
    returncode: int | None  # negative: killed by that signal
    stdout: str  # the last 64 KiB of stdout
    stderr_tail: str  # the last 4 KiB of stderr
    wall_s: float
    isolation: str
    output_bytes: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# --------------------------------------------------------------------------------------------- caller side

_MODE: str | None = None
_MODE_REASON = ""


def isolation_mode() -> str:
    """"namespaces" if this machine lets the child build its namespaces (probed once per process), else "fallback".

    The environment variable ELASTIC_MOE_SANDBOX_ISOLATION=fallback forces the fallback.
    """
    global _MODE, _MODE_REASON
    if os.environ.get("ELASTIC_MOE_SANDBOX_ISOLATION") == "fallback":
        return "fallback"
    if _MODE is None:
        if not sys.platform.startswith("linux"):
            _MODE, _MODE_REASON = "fallback", f"not Linux ({sys.platform})"
        else:
            try:
                r = _run(b"pass", Limits(timeout_s=10, total_memory_mb=0), "namespaces")  # namespaces alone decide
                ok = r.status == "passed"
                _MODE, _MODE_REASON = ("namespaces", "") if ok else ("fallback", r.stderr_tail[-300:])
            except SandboxError as e:
                _MODE, _MODE_REASON = "fallback", str(e)
            if _MODE == "fallback":  # say so once: the fallback is much weaker (see the module docstring)
                print(f"elastic-moe sandbox: Linux namespaces are not available here, so generated code runs in the "
                      f"fallback ({fallback_layers()}; weaker than namespaces): {_MODE_REASON.strip()[-200:]}",
                      file=sys.stderr)
    return _MODE


def fallback_layers() -> str:
    """What confines code in the fallback on this machine, in words (the kernel layers depend on it)."""
    layers = ["rlimits", "audit hooks"]
    if os.environ.get("ELASTIC_MOE_SANDBOX_SECCOMP") != "off" and os.uname().machine in _SECCOMP_ARCH:
        layers.append("seccomp filter")
    abi = landlock_abi(_Libc()) if sys.platform.startswith("linux") else 0
    if os.environ.get("ELASTIC_MOE_SANDBOX_LANDLOCK") != "off" and abi:
        layers.append(f"Landlock ABI {abi}" + ("" if abi >= 6 else " (no signal scoping)"))
    return ", ".join(layers)


def isolation_reason() -> str:
    """Why the fallback is in effect ("" when namespaces work)."""
    isolation_mode()
    return _MODE_REASON


def run_code(code: str, limits: Limits | None = None, isolation: str = "auto") -> SandboxResult:
    """Run `code` as a `__main__` module in the sandbox. Raises SandboxError only for infrastructure failures."""
    mode = isolation_mode() if isolation == "auto" else isolation
    if mode not in ("namespaces", "fallback"):
        raise ValueError(f"isolation must be auto, namespaces or fallback, not {isolation!r}")
    try:
        source = code.encode("utf-8", "surrogateescape")  # the bytes run_file read, as they were
    except UnicodeEncodeError:  # a lone surrogate: not valid source, so the run fails with Python's own error
        source = code.encode("utf-8", "surrogatepass")
    return _run(source, limits or Limits(), mode)


def run_file(path: str, limits: Limits | None = None, isolation: str = "auto") -> SandboxResult:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return run_code(f.read(), limits, isolation)


def _ro_paths() -> list[str]:
    """Host paths bind-mounted read-only into the namespace root: system libraries and the Python installation."""
    wanted = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", sys.base_prefix, os.path.realpath(sys.base_prefix)]
    for key in ("stdlib", "platstdlib"):
        base = {k: sys.base_prefix for k in ("base", "platbase", "installed_base", "installed_platbase")}
        wanted.append(os.path.realpath(sysconfig.get_paths(vars=base)[key]))
    out: list[str] = []
    for p in wanted:
        p = os.path.normpath(p)
        if os.path.lexists(p) and p != "/" and not any(p == q or p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def _memory_cgroup(limits: Limits):
    """A memory cgroup for one run, or None where this machine allows none (imported here, not at the top,
    because this file is also the child's stdlib-only entry point)."""
    try:
        from elastic_moe import memory_cgroup
    except ImportError:  # sandbox.py used on its own, outside the package
        return None
    if limits.total_memory_mb == 0:
        return None
    try:
        return memory_cgroup.create(limits.run_memory_mb << 20)
    except OSError as e:
        raise SandboxError(f"cannot create the memory cgroup of the run: {e}") from e


def _run(code: bytes, limits: Limits, mode: str) -> SandboxResult:
    limits.check()
    cgroup = _memory_cgroup(limits)
    base = status_r = None
    try:
        try:
            base = tempfile.mkdtemp(prefix="emoe-sandbox-")
            os.chmod(base, 0o755)
            status_r, status_w = os.pipe()
        except OSError as e:
            raise SandboxError(f"cannot prepare the sandbox: {e}") from e
        cfg = {
            "mode": mode,
            "base": base,
            "ro_paths": _ro_paths() if mode == "namespaces" else [],
            "read_ok": [sys.base_prefix, os.path.realpath(sys.base_prefix), "/usr", "/lib", "/lib64", *_DEVICES],
            "cpu_s": limits.cpu_s or max(1, int(-(-limits.timeout_s // 1))),
            "memory_mb": limits.memory_mb,
            "max_procs": limits.max_procs,
            "file_size_mb": limits.file_size_mb,
            "disk_mb": limits.disk_mb,
            "open_files": limits.open_files,
            "root": os.geteuid() == 0,
            "parent_pid": os.getpid(),
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "seccomp": os.environ.get("ELASTIC_MOE_SANDBOX_SECCOMP") != "off",
            "landlock": os.environ.get("ELASTIC_MOE_SANDBOX_LANDLOCK") != "off",
            "python": os.path.realpath(sys.executable),  # a virtual environment's bin/ is not in the new root
        }
        cmd = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--child", json.dumps(cfg), str(status_w)]
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SANDBOX_ENV,
                cwd=base, start_new_session=True, close_fds=True, pass_fds=(status_w,),
            )
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox process: {e}") from e
        finally:
            os.close(status_w)
        try:
            out, err, status_msg, nbytes, timed_out, too_much = _communicate(proc, code, status_r, limits)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                _, wait_status, usage = os.wait4(proc.pid, 0)
            except ChildProcessError as e:  # reaped elsewhere (SIGCHLD ignored by the embedding program)
                raise SandboxError(f"the sandbox process could not be waited for: {e}") from None
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
    finally:
        if status_r is not None:
            os.close(status_r)
        oom_kills = cgroup.oom_kills() if cgroup else 0
        if cgroup and not cgroup.remove():
            print(f"elastic-moe sandbox: could not remove the memory cgroup {cgroup.path}", file=sys.stderr)
        if base is not None:
            _remove_tree(base)
    wall = time.monotonic() - t0
    stderr_tail = err[-_TAIL:].decode("utf-8", "replace")
    stdout = out.decode("utf-8", "replace")

    lines = status_msg.decode("utf-8", "replace").splitlines()
    if lines and lines[0].startswith("error"):
        raise SandboxError(f"sandbox setup failed ({mode}): {lines[0][6:]}")
    total_mb = limits.run_memory_mb
    if oom_kills and (not lines or lines[0] != "ok"):
        raise SandboxError(f"the sandbox could not start under its memory limit of {total_mb} MB for the whole run")
    if not timed_out and not too_much and (not lines or lines[0] != "ok"):
        raise SandboxError(f"sandbox died before running the code ({mode}): rc={proc.returncode} {stderr_tail[-300:]}")
    rc, cpu_s = proc.returncode, usage.ru_utime + usage.ru_stime
    if mode == "namespaces":  # the outer process reports the worker's wait status; its own exit code means nothing
        rc = None
        for line in lines[1:]:
            if line.startswith("exit "):
                status, cpu = line[5:].split()
                rc, cpu_s = os.waitstatus_to_exitcode(int(status)), float(cpu)

    def result(status: str, reason: str) -> SandboxResult:
        return SandboxResult(status, reason, rc, stdout, stderr_tail, wall, mode, nbytes)

    # before the timeout (a run at its memory limit can stall until the deadline), and even after an exit 0: a
    # process of the run, say a forked child, went over the run's limit
    if oom_kills:
        return result("killed", f"memory limit of {total_mb} MB for the whole sandbox ({oom_kills} process(es) killed)")
    if timed_out:
        return result("timeout", f"wall-clock limit of {limits.timeout_s:g} s")
    if too_much:
        return result("killed", f"output limit of {limits.max_output_bytes} bytes")
    if rc is None:
        raise SandboxError(f"sandbox did not report the exit status: {stderr_tail[-300:]}")
    if rc == 0:
        return result("passed", "exit 0")
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        # SIGKILL at the hard CPU limit when the code ignored SIGXCPU; any other SIGKILL is the code's own or the
        # kernel's out-of-memory killer, not one of our limits
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cfg["cpu_s"]):
            return result("timeout", f"CPU-time limit of {cfg['cpu_s']} s")
        if sig == signal.SIGXFSZ:
            return result("killed", f"file-size limit of {limits.file_size_mb} MB")
        if sig == signal.SIGKILL:
            return result("killed", "killed by SIGKILL (not a sandbox limit: the code itself or the system)")
        return result("crashed", f"killed by {name}")
    if rc == _MEMORY_EXIT and "MemoryError" in stderr_tail:
        return result("killed", f"memory limit of {limits.memory_mb} MB")
    last = stderr_tail.strip().splitlines()[-1:] or [""]
    return result("failed", f"exit {rc}: {last[0][:200]}")


def _communicate(proc: subprocess.Popen, code: bytes, status_r: int, limits: Limits):
    """Feed stdin, collect stdout/stderr/status until EOF, the deadline or the output cap."""
    deadline = time.monotonic() + limits.timeout_s
    sel = selectors.DefaultSelector()
    out, err, status = bytearray(), bytearray(), bytearray()
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: status}
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    stdin = proc.stdin.fileno()
    os.set_blocking(stdin, False)
    sel.register(stdin, selectors.EVENT_WRITE)
    pending = memoryview(code)
    nbytes, timed_out, too_much = 0, False, False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(left, 0.5)):
                fd = key.fd
                if fd == stdin:
                    try:
                        n = os.write(fd, pending[:65536])
                        pending = pending[n:]
                    except (BrokenPipeError, BlockingIOError):
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                buf = bufs[fd]
                buf += chunk
                if fd != status_r:
                    nbytes += len(chunk)
                    if len(buf) > 2 * 65536:  # keep only tails
                        del buf[: len(buf) - 65536]
                    if nbytes > limits.max_output_bytes:
                        too_much = True
            if too_much:
                break
    finally:
        sel.close()
    if proc.stdin and not proc.stdin.closed:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if timed_out or too_much:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):  # a final status line may already be there
            status += os.read(status_r, 4096)
    return bytes(out[-65536:]), bytes(err), bytes(status), nbytes, timed_out, too_much


def _remove_tree(path: str) -> None:
    """Remove a run's folder, including folders the code made without read or write permission for their owner
    (os.mkdir(d, 0o300) and files in it): rmtree alone, as a non-root caller, would leave those behind."""
    if os.geteuid() != 0:
        for root, dirs, _ in os.walk(path):  # top-down: each folder is opened up before the walk enters it
            for d in dirs:
                with contextlib.suppress(OSError):
                    if not os.path.islink(os.path.join(root, d)):  # the run is over: nothing swaps it now
                        os.chmod(os.path.join(root, d), 0o700)
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:  # the code nested folders deeper than Python's recursion limit
        subprocess.run(["rm", "-rf", "--", path], check=False)


# --------------------------------------------------------------------------------------------- child side

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 2, 1, 38
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, LINUX_CAPABILITY_VERSION_3 = 24, 47, 4, 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}


class _Libc:
    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def call(self, name: str, *args):
        fn = self.lib.syscall if name.isdigit() else getattr(self.lib, name)
        if name.isdigit():
            args = (int(name), *args)
        if fn(*args) != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{name if not name.isdigit() else 'pivot_root'}{args}: {os.strerror(err)}")

    def mount(self, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None):
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        self.call("mount", enc(src), enc(dst), enc(fstype), self.ctypes.c_ulong(flags), enc(data))

    def prctl(self, option: int, arg: int) -> None:
        ul = self.ctypes.c_ulong
        self.call("prctl", option, ul(arg), ul(0), ul(0), ul(0))


SANDBOX_UID_BASE, PID_LIMIT = 200_000, 1 << 22  # the kernel's largest pid_max


def _sandbox_uid() -> int:
    # a fresh uid per run that no account uses, so RLIMIT_NPROC counts only this run's processes; keyed by the pid
    # of the process that calls it, so no two live sandboxes share one (pid mod 100000 did where pid_max is larger)
    return SANDBOX_UID_BASE + os.getpid()


def _build_root(libc: _Libc, cfg: dict, uid: int) -> None:
    """Unshare namespaces and pivot into a minimal read-only root (runs in the outer child process)."""
    root = cfg["root"]
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    real_uid, real_gid = os.getuid(), os.getgid()
    libc.call("unshare", flags if root else flags | CLONE_NEWUSER)
    if not root:  # map ourselves to root inside the new user namespace
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {real_uid} 1"), ("gid_map", f"0 {real_gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    new = cfg["base"]
    os.umask(0o022)
    libc.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for p in cfg["ro_paths"]:
        dst = new + p
        if os.path.islink(p):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.readlink(p), dst)
            continue
        os.makedirs(dst, exist_ok=True)
        libc.mount(p, dst, None, MS_BIND | MS_REC)
        with contextlib.suppress(OSError):  # best effort: a locked mount in a user namespace may refuse it
            libc.mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.makedirs(new + "/dev")
    for dev in (d.removeprefix("/dev/") for d in _DEVICES):
        open(f"{new}/dev/{dev}", "w").close()
        libc.mount(f"/dev/{dev}", f"{new}/dev/{dev}", None, MS_BIND)
    os.makedirs(new + "/sandbox")
    owner = f",uid={uid},gid={uid}" if root else ""
    # inodes capped too (256 per MB): where no memory cgroup holds the run (a non-root caller), empty files would
    # otherwise cost kernel memory without counting against size=
    libc.mount("tmpfs", new + "/sandbox", "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={cfg['disk_mb']}m,nr_inodes={256 * cfg['disk_mb']},mode=0700{owner}")
    os.symlink("/sandbox", new + "/tmp")
    os.symlink("/sandbox", new + "/dev/shm")  # POSIX semaphores and shared memory (multiprocessing) live there
    os.makedirs(new + "/.old")
    libc.call(str(SYS_PIVOT_ROOT[os.uname().machine]), new.encode(), (new + "/.old").encode())
    os.chdir("/")
    libc.call("umount2", b"/.old", MNT_DETACH)
    os.rmdir("/.old")
    with contextlib.suppress(OSError):
        libc.mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _set_limits(cfg: dict) -> None:
    import resource

    mb = 1 << 20
    for res, soft, hard in (
        (resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),  # SIGXCPU first, SIGKILL a second later
        (resource.RLIMIT_AS, cfg["memory_mb"] * mb, cfg["memory_mb"] * mb),
        (resource.RLIMIT_NPROC, cfg["max_procs"], cfg["max_procs"]),
        (resource.RLIMIT_FSIZE, cfg["file_size_mb"] * mb, cfg["file_size_mb"] * mb),
        (resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NICE, 0, 0),  # no raising its priority above other runs'
        (resource.RLIMIT_RTPRIO, 0, 0),
    ):
        resource.setrlimit(res, (soft, hard))


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _drop_bounding_set(libc: _Libc, root: bool) -> None:
    """Empty the capability bounding set, so no later execve regains a capability over this namespace.

    A root caller may lack CAP_SETPCAP (a service's CapabilityBoundingSet, `--cap-drop`); it then keeps its
    bounding set: the uid change right after clears the permitted and effective sets, and no_new_privs stops
    set-uid and file capabilities. In a user namespace of its own the process always holds CAP_SETPCAP."""
    for cap in range(64):
        try:
            libc.prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno == errno.EINVAL:  # past the kernel's last capability
                return
            if e.errno == errno.EPERM and root:
                return
            raise


def _clear_capabilities(libc: _Libc) -> None:
    """Clear the effective, permitted, inheritable and ambient sets of this process.

    Without this, a worker in an unprivileged user namespace keeps every capability of that namespace and could,
    for one, remount the read-only binds writable."""
    ct = libc.ctypes
    zero = ct.c_ulong(0)
    libc.call("prctl", PR_CAP_AMBIENT, ct.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), zero, zero, zero)
    header = (ct.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ct.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
    libc.call("capset", header, data)


# A seccomp filter in the worker, loaded just before the code runs. Both modes refuse kernel interfaces that no test
# program needs and that kernel exploits favour (nested namespaces, io_uring, bpf, userfaultfd, ...). The fallback
# also refuses, in the kernel, what its audit hook refuses in Python, so that code which gets past the hook (session
# 19's red team did) still cannot start a process, open a socket, or signal or trace another process. Syscall
# numbers per architecture (<asm/unistd.h>).
_SECCOMP_ARCH = {  # uname machine -> (AUDIT_ARCH_*, {name: number})
    "x86_64": (0xC000003E, dict(
        socket=41, fork=57, vfork=58, execve=59, ptrace=101, unshare=272, setns=308, process_vm_readv=310,
        process_vm_writev=311, bpf=321, execveat=322, userfaultfd=323, perf_event_open=298, keyctl=250, add_key=248,
        request_key=249, pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
        pidfd_open=434, pidfd_getfd=438, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297, clone=56, clone3=435, socketpair=53, fcntl=72, prlimit64=302, setpriority=141,
        sched_setparam=142, sched_setscheduler=144, sched_setaffinity=203, sched_setattr=314, ioprio_set=251,
        migrate_pages=256, move_pages=279, prctl=157, shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65,
        semctl=66, semtimedop=220, msgget=68, msgsnd=69, msgrcv=70, msgctl=71, chmod=90, fchmod=91, fchmodat=268,
        fchmodat2=452, chown=92, fchown=93, lchown=94, fchownat=260, utime=132, utimes=235, futimesat=261,
        utimensat=280, setxattr=188, lsetxattr=189, fsetxattr=190, setxattrat=463, removexattr=197,
        lremovexattr=198, fremovexattr=199, removexattrat=466, inotify_init=253, inotify_init1=294,
        fanotify_init=300, setsid=112, ioctl=16, mmap=9, memfd_create=319)),
    "aarch64": (0xC00000B7, dict(
        socket=198, execve=221, ptrace=117, unshare=97, setns=268, process_vm_readv=270, process_vm_writev=271,
        bpf=280, execveat=281, userfaultfd=282, perf_event_open=241, keyctl=219, add_key=217, request_key=218,
        pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, pidfd_open=434,
        pidfd_getfd=438, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, clone=220,
        clone3=435, socketpair=199, fcntl=25, prlimit64=261, setpriority=140, sched_setparam=118,
        sched_setscheduler=119, sched_setaffinity=122, sched_setattr=274, ioprio_set=30, migrate_pages=238,
        move_pages=239, prctl=167, shmget=194, shmat=196, shmctl=195, shmdt=197, semget=190, semop=193, semctl=191,
        semtimedop=192, msgget=186, msgsnd=189, msgrcv=188, msgctl=187, fchmod=52, fchmodat=53, fchmodat2=452,
        fchown=55, fchownat=54, utimensat=88, setxattr=5, lsetxattr=6, fsetxattr=7, setxattrat=463, removexattr=14,
        lremovexattr=15, fremovexattr=16, removexattrat=466, inotify_init1=26, fanotify_init=262,
        setsid=157, ioctl=29, mmap=222, memfd_create=279)),
}
_FALLBACK_ONLY = (
    "socket", "socketpair", "fork", "vfork", "execve", "execveat", "pidfd_open", "pidfd_send_signal",
    # System V IPC: the fallback has no IPC namespace, so these reach other processes' segments, queues, semaphores
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv",
    "msgctl",
    # file metadata, which Landlock does not govern: modes, owners, times and extended attributes of any file the
    # uid owns (the audit hook allows these in the work folder; the kernel, nowhere)
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime", "utimes",
    "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr", "setxattrat", "removexattr", "lremovexattr",
    "fremovexattr", "removexattrat",
)
# signals to the process named by their first argument (0: the caller's process group): the fallback allows only
# itself. In namespaces mode the code may signal its own children; init ignores what they send it (no handlers) and
# the worker's own session holds no process outside the namespace.
_SIGNAL_SELF_ONLY = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
# other calls on the process named by their first argument: in the fallback only the caller; in namespaces mode
# anything but init, PID 1 (session 30: a non-root caller's worker shares init's uid, and an address-space limit
# set on init stopped it reporting the exit status; every other pid it can name is the code's own)
_SELF_ONLY = ("prlimit64", "sched_setparam", "sched_setscheduler", "sched_setaffinity", "sched_setattr",
              "migrate_pages", "move_pages")
# ... and these name it in their second argument, after "which" (PRIO_PROCESS 0, IOPRIO_WHO_PROCESS 1; any other
# "which", a process group or a user, is refused)
_WHO_SELF_ONLY = {"setpriority": 0, "ioprio_set": 1}
# fcntl commands that make the kernel signal another process (SIGIO and friends) or watch or lease files: refused
# in both modes (the read-only binds are the host's own folders; a watch on them shows what the host opens)
F_NOTIFY, F_SETLEASE, F_SETOWN, F_SETSIG, F_SETOWN_EX = 1026, 1024, 8, 10, 15
# ioctls that set a socket's SIGIO owner, as F_SETOWN does
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902
# refused commands: (argument index, commands) per call
_REFUSED_COMMANDS = {"fcntl": (1, (F_SETOWN, F_SETSIG, F_SETOWN_EX, F_NOTIFY, F_SETLEASE)),
                     "ioctl": (1, (FIOSETOWN, SIOCSPGRP))}
# huge pages, refused by flag in both modes: hugetlb memory is charged to no memory cgroup (only to the hugetlb
# controller), so on a host that reserves huge pages (GPU machines often do) a run could hold them past its limit
MAP_HUGETLB, MFD_HUGETLB, SHM_HUGETLB = 0x40000, 0x4, 0x800
_REFUSED_FLAGS = {"mmap": (3, MAP_HUGETLB), "memfd_create": (1, MFD_HUGETLB), "shmget": (2, SHM_HUGETLB)}
# socket families in namespaces mode (the fallback has none): those the network namespace confines. AF_VSOCK is
# not namespaced (session 30: a port bound on the host was in use inside); netlink only as NETLINK_ROUTE (0)
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
CLONE_THREAD, CLONE_NEWCGROUP, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 0x00010000, 0x02000000, 22, 2
# prctl options refused in the fallback: without its parent-death signal the worker would outlive a killed caller
_PRCTL_REFUSED = (PR_SET_PDEATHSIG,)
# setsid is refused in both modes (it is in the tables and in no list): the scheduler shares the CPU between
# sessions (autogroups), so children in sessions of their own took a concurrent run's CPU (session 30). The
# worker makes its one session before the filter is loaded.
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000


def seccomp_program(machine: str, pid: int, fallback: bool) -> bytes | None:
    """The classic-BPF filter for this architecture (None: no table for it), as `struct sock_filter` entries.

    Refused with EPERM in both modes: ptrace and process_vm_*, pidfd_getfd, new namespaces (unshare, setns, clone
    with a CLONE_NEW* flag), io_uring, bpf, perf events, keyrings, userfaultfd, inotify and fanotify, fcntl's
    owner/signal/notify/lease commands and the socket ioctls FIOSETOWN / SIOCSPGRP (through which the kernel
    signals another process or reports on other files), setsid (a session is a scheduling group), rlimits,
    priorities, scheduling and page moves of init (PID 1; in the fallback: of any process but `pid` itself),
    priorities of a process group or user, sockets of a family the network namespace does not confine (anything
    but AF_UNIX, AF_INET, AF_INET6 and NETLINK_ROUTE), huge pages (mmap, memfd_create and shmget with their HUGETLB
    flag), and any syscall of another ABI (x32 and i386 on x86_64, 32-bit ARM on aarch64). The fallback adds:
    process creation (fork, exec; clone unless it makes a thread), every socket and socket pair, pidfd_open /
    pidfd_send_signal, signals to any process but `pid` itself (kill(0, ...), its own process group, is allowed),
    System V IPC, changes of file modes, owners, times and extended attributes, and prctl(PR_SET_PDEATHSIG).
    clone3 answers ENOSYS, so that glibc falls back to clone, whose flags a filter can read."""
    import struct

    if machine not in _SECCOMP_ARCH:
        return None
    arch, nr = _SECCOMP_ARCH[machine]
    ld_nr, ld_arch = (0x20, 0, 0, 0), (0x20, 0, 0, 4)  # BPF_LD|W|ABS from struct seccomp_data
    ld_arg = [(0x20, 0, 0, 16 + 8 * i) for i in range(6)]  # BPF_LD|W|ABS: the low 32 bits of args[i]
    ld_arg0, ld_arg1, ld_arg2 = ld_arg[:3]
    deny, allow, nosys = (0x06, 0, 0, _RET_ERRNO | errno.EPERM), (0x06, 0, 0, _RET_ALLOW), \
        (0x06, 0, 0, _RET_ERRNO | errno.ENOSYS)
    new_namespaces = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET \
        | CLONE_NEWCGROUP

    def jeq(k: int, jt: int, jf: int) -> tuple:
        return (0x15, jt, jf, k)

    prog = [ld_arch, jeq(arch, 1, 0), deny, ld_nr]
    if machine == "x86_64":
        prog += [(0x35, 0, 1, 0x40000000), deny]  # BPF_JGE: the x32 ABI's numbers
    for name, n in nr.items():
        if name in _SIGNAL_SELF_ONLY or name in _SELF_ONLY or name in _WHO_SELF_ONLY or name in _REFUSED_COMMANDS \
                or name == "prctl":
            if not fallback and (name in _SIGNAL_SELF_ONLY or name == "prctl"):
                continue
            if (name in _SIGNAL_SELF_ONLY or name in _SELF_ONLY) and fallback:
                prog += [jeq(n, 0, 5), ld_arg0, jeq(pid, 2, 0), jeq(0, 1, 0), deny, allow]
            elif name in _SELF_ONLY:  # namespaces: not init
                prog += [jeq(n, 0, 4), ld_arg0, jeq(1, 0, 1), deny, allow]
            elif name in _REFUSED_COMMANDS or name == "prctl":  # refused commands: fcntl's second argument, ...
                arg, cmds = _REFUSED_COMMANDS.get(name, (0, _PRCTL_REFUSED))
                prog += [jeq(n, 0, len(cmds) + 3), ld_arg1 if arg == 1 else ld_arg0]
                prog += [jeq(c, len(cmds) - i, 0) for i, c in enumerate(cmds)] + [allow, deny]
            elif fallback:  # which == PRIO_PROCESS / IOPRIO_WHO_PROCESS and who in (0, pid)
                prog += [jeq(n, 0, 7), ld_arg0, jeq(_WHO_SELF_ONLY[name], 0, 3), ld_arg1, jeq(pid, 2, 0),
                         jeq(0, 1, 0), deny, allow]
            else:  # namespaces: which == PRIO_PROCESS / IOPRIO_WHO_PROCESS and who != 1
                prog += [jeq(n, 0, 6), ld_arg0, jeq(_WHO_SELF_ONLY[name], 0, 2), ld_arg1, jeq(1, 0, 1), deny, allow]
        elif name == "clone":  # BPF_JSET: new namespaces never; in the fallback, a thread only
            if fallback:
                prog += [jeq(n, 0, 5), ld_arg0, (0x45, 1, 0, new_namespaces), (0x45, 1, 0, CLONE_THREAD), deny, allow]
            else:
                prog += [jeq(n, 0, 4), ld_arg0, (0x45, 0, 1, new_namespaces), deny, allow]
        elif name == "clone3":
            prog += [jeq(n, 0, 1), nosys]
        elif name in _REFUSED_FLAGS and not (fallback and name in _FALLBACK_ONLY):  # BPF_JSET on the flags
            arg, mask = _REFUSED_FLAGS[name]
            prog += [jeq(n, 0, 4), ld_arg[arg], (0x45, 0, 1, mask), deny, allow]
        elif name in ("socket", "socketpair") and not fallback:  # by family; netlink by protocol too
            prog += [jeq(n, 0, 9), ld_arg0, jeq(AF_UNIX, 6, 0), jeq(AF_INET, 5, 0), jeq(AF_INET6, 4, 0),
                     jeq(AF_NETLINK, 0, 2), ld_arg2, jeq(0, 1, 0), deny, allow]
        elif fallback or name not in _FALLBACK_ONLY:
            prog += [jeq(n, 0, 1), deny]
    prog.append(allow)
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def _install_seccomp(libc: _Libc, fallback: bool) -> None:
    """Load seccomp_program for this process (no_new_privs must be set); a machine without a table runs without."""
    prog = seccomp_program(os.uname().machine, os.getpid(), fallback)
    if prog is None:
        return
    ct = libc.ctypes

    class SockFprog(ct.Structure):
        _fields_ = [("len", ct.c_ushort), ("filter", ct.c_void_p)]

    buf = ct.create_string_buffer(prog, len(prog))
    fprog = SockFprog(len(prog) // 8, ct.cast(buf, ct.c_void_p))
    try:
        libc.call("prctl", PR_SET_SECCOMP, ct.c_ulong(SECCOMP_MODE_FILTER), ct.byref(fprog), ct.c_ulong(0),
                  ct.c_ulong(0))
    except OSError as e:
        raise OSError(e.errno, f"cannot load the seccomp filter ({os.strerror(e.errno)}); "
                               "ELASTIC_MOE_SANDBOX_SECCOMP=off runs the sandbox without it") from None


# Landlock (Linux 5.13+, no privilege needed): the fallback's file policy, enforced by the kernel on every path
# lookup (directory handles included), plus, from ABI 6, no signals to and no abstract unix sockets of processes
# outside the sandbox. The three syscalls have the same numbers on every architecture.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
LL_SCOPE_ABSTRACT_UNIX_SOCKET, LL_SCOPE_SIGNAL = 1, 2


def landlock_abi(libc: _Libc) -> int:
    """The kernel's Landlock ABI version, 0 where it has none (too old, or not among the enabled LSMs)."""
    v = libc.lib.syscall(SYS_LANDLOCK_CREATE_RULESET, None, libc.ctypes.c_size_t(0), libc.ctypes.c_uint32(1))
    return max(int(v), 0)


def _install_landlock(libc: _Libc, workdir: str, read_ok: list[str]) -> int:
    """Allow reading (and executing) under `read_ok`, everything under `workdir`, writing /dev/null, and nothing
    else on any file system; from ABI 4 no TCP bind or connect, from ABI 6 no signals to and no abstract sockets of
    processes outside. Returns the ABI in force (0: no Landlock here, nothing done)."""
    import struct

    abi = landlock_abi(libc)
    if abi < 1:
        return 0
    ct = libc.ctypes
    handled = (1 << 13) - 1 | (LL_REFER if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0) \
        | (LL_IOCTL_DEV if abi >= 5 else 0)
    attr = struct.pack("<Q", handled)
    if abi >= 4:
        attr += struct.pack("<Q", 3)  # handled_access_net: bind and connect TCP, with no rule allowing either
    if abi >= 6:
        attr += struct.pack("<Q", LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL)
    buf = ct.create_string_buffer(attr, len(attr))
    ruleset = libc.lib.syscall(SYS_LANDLOCK_CREATE_RULESET, buf, ct.c_size_t(len(attr)), ct.c_uint32(0))
    if ruleset < 0:
        raise OSError(ct.get_errno(), f"landlock_create_ruleset: {os.strerror(ct.get_errno())}")
    file_rights = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
    try:
        rules = [(p, LL_EXECUTE | LL_READ_FILE | LL_READ_DIR) for p in read_ok] + [(workdir, handled),
                                                                                  ("/dev/null", LL_WRITE_FILE)]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:  # missing, or unreachable after the uid drop: nothing to allow there
                continue
            try:
                if not os.path.isdir(path):
                    rights &= file_rights
                rule = struct.pack("<Qi", rights & handled, fd)  # struct landlock_path_beneath_attr, packed
                rbuf = ct.create_string_buffer(rule, len(rule))
                if libc.lib.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, rbuf, ct.c_uint32(0)) != 0:
                    raise OSError(ct.get_errno(), f"landlock_add_rule {path}: {os.strerror(ct.get_errno())}")
            finally:
                os.close(fd)
        if libc.lib.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ct.c_uint32(0)) != 0:
            raise OSError(ct.get_errno(), f"landlock_restrict_self: {os.strerror(ct.get_errno())}")
    finally:
        os.close(ruleset)
    return abi


_PREIMPORT = "array bisect collections concurrent.futures concurrent.futures.thread dataclasses decimal fractions functools heapq itertools json math operator queue random re select socket statistics string textwrap threading typing unicodedata"  # noqa: E501


def _install_audit_hook(workdir: str, read_ok: list[str]) -> None:
    """Fallback isolation: refuse network, process creation, ctypes, signals and file access outside workdir."""
    real = os.path.realpath
    work = real(workdir)
    readable = [real(p) for p in read_ok] + [work]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    me = os.getpid()
    deny_always = {
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "os.fork",
        "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "ctypes.dlopen",
        "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "pty.spawn", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents",
    }
    path_events = {
        "os.listdir", "os.scandir", "os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.symlink", "os.link",
        "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "os.chdir", "glob.glob",
    }

    def under(path, roots) -> bool:
        p = real(os.fsdecode(path))
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event: str, args: tuple) -> None:
        if event in deny_always or (event == "import" and args[0] in ("ctypes", "_ctypes")):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = (mode and any(c in mode for c in "wax+")) or (flags and flags & write_flags)
            if not under(path, [work] if writing else readable):
                raise PermissionError(f"sandbox: access to {path!r} is not allowed")
            # a directory fd from outside would let relative paths (dir_fd=, which this event does not show)
            # create files there
            if not under(path, [work]) and os.path.isdir(path):
                raise PermissionError(f"sandbox: opening the directory {path!r} is not allowed")
        elif event in path_events:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not under(a, [work] if event != "os.listdir" and event != "os.scandir" else readable):  # noqa: E501
                    raise PermissionError(f"sandbox: {event} on {a!r} is not allowed")
        elif event in ("os.kill", "os.killpg"):  # (pthread_kill names a thread of this process, never another's)
            if args[0] not in (me, 0):
                raise PermissionError("sandbox: signals to other processes are not allowed")

    sys.addaudithook(hook)


def _run_user(cfg: dict, code: bytes, workdir: str, uid: int | None, hooks: bool) -> None:
    """Become the worker and run the code; never returns."""
    import builtins
    import traceback
    import types

    try:
        if hooks:
            for name in _PREIMPORT.split():  # the stdlib may be unreadable after the uid drop
                __import__(name)
        libc = _Libc() if sys.platform.startswith("linux") else None
        _set_limits(cfg)
        os.chdir(workdir)
        if not hooks:  # namespaces: the worker holds capabilities here (root, or the user namespace's owner)
            # a session of its own: kill(0, ...) then reaches the code's processes only, not the sandbox process
            # outside the PID namespace, which shares a non-root caller's uid (session 30)
            os.setsid()
            _drop_bounding_set(libc, root=uid is not None)
        if uid is not None:
            _drop_privileges(uid)
        if libc is not None:
            _clear_capabilities(libc)  # in the fallback too: a non-root caller may hold ambient capabilities
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
            if hooks:  # the uid change cleared the parent-death signal armed in _child_main
                _die_with_parent(libc, cfg["parent_pid"])
            if hooks and cfg["landlock"]:
                try:
                    _install_landlock(libc, workdir, cfg["read_ok"])
                except OSError as e:
                    raise OSError(e.errno, f"{e.strerror}; ELASTIC_MOE_SANDBOX_LANDLOCK=off runs the fallback "
                                           "without Landlock") from None
            if cfg["seccomp"]:
                _install_seccomp(libc, fallback=hooks)
        os.umask(0o077)
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        if hooks:
            _install_audit_hook(workdir, cfg["read_ok"])
    except BaseException as e:  # noqa: BLE001 - any setup failure is the sandbox's, not the code's
        _report(cfg, f"error worker setup: {type(e).__name__}: {e}")
        os._exit(121)
    _report(cfg, "ok", close=True)
    sys.argv = ["main.py"]
    if not hooks and os.path.exists(cfg["python"]):  # the interpreter's own path: code may start sys.executable
        sys.executable = cfg["python"]
    # a real __main__ module: pickle (multiprocessing's Pool, a user-defined class) finds the program's own names
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = "main.py", builtins
    sys.modules["__main__"] = main
    namespace = main.__dict__
    status = 0
    try:
        exec(compile(code, "main.py", "exec"), namespace)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except MemoryError:
        namespace.clear()
        sys.stderr.write("MemoryError\n")
        status = _MEMORY_EXIT
    except BaseException as e:  # noqa: BLE001
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # hide this frame
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status & 0xFF)


def _report(cfg: dict, line: str, close: bool = False) -> None:
    fd = cfg["status_fd"]
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, (line + "\n").encode())
    if close:
        with contextlib.suppress(OSError):
            os.close(fd)
        cfg["status_fd"] = None


def _die_with_parent(libc: _Libc, parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (e.g. a reward worker killed for a timeout)."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _child_main(cfg: dict) -> None:
    # the ordinary scheduling policy, whatever the caller's: a realtime task may not join a cpu cgroup without a
    # realtime budget, and the code must not run ahead of every normal task on the machine
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) not in (os.SCHED_OTHER, os.SCHED_BATCH,
                                                                              os.SCHED_IDLE):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    # first: everything this process and its descendants allocate is charged to the run (and share its CPU weight)
    for procs in cfg["cgroup_procs"]:
        try:
            fd = os.open(procs, os.O_WRONLY)  # no O_CREAT: it must be the cgroup's own file
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        except OSError as e:
            _report(cfg, f"error joining the run's cgroup {procs}: {e}")
            os._exit(121)
    if sys.platform.startswith("linux"):
        _die_with_parent(_Libc(), cfg["parent_pid"])
    code = sys.stdin.buffer.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if cfg["mode"] == "fallback":
        uid = _sandbox_uid() if cfg["root"] else None
        if uid is not None:
            os.chown(cfg["base"], uid, uid)
        _run_user(cfg, code, cfg["base"], uid, hooks=True)

    # namespace mode: this process (outside the new PID namespace) -> init (PID 1) -> worker (PID 2)
    uid = _sandbox_uid()
    try:
        libc = _Libc()
        _build_root(libc, cfg, uid)
    except BaseException as e:  # noqa: BLE001
        _report(cfg, f"error {type(e).__name__}: {e}")
        os._exit(121)
    alive_r, alive_w = os.pipe()  # init exits if this process is already gone before PDEATHSIG is armed
    init = os.fork()
    if init == 0:
        os.close(alive_w)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # a namespace's init gets no signal from inside that it has no handler for: drop Python's SIGINT handler,
        # or the code (same uid when the caller is not root) stops init with a KeyboardInterrupt (session 30)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        import select

        if select.select([alive_r], [], [], 0)[0]:
            os._exit(1)
        worker = os.fork()
        if worker == 0:
            os.close(alive_r)
            _run_user(cfg, code, "/sandbox", uid if cfg["root"] else None, hooks=False)
        cfg_fd, cfg["status_fd"] = cfg["status_fd"], None  # init reports only the worker's status
        while True:  # reap orphans until the worker is done; then exiting kills the rest of the namespace
            try:
                pid, st, usage = os.wait3(0)
            except ChildProcessError:
                os._exit(1)
            if pid == worker:
                os.write(cfg_fd, f"exit {st} {usage.ru_utime + usage.ru_stime:.3f}\n".encode())
                os._exit(0)
    os.close(alive_r)
    os.close(cfg["status_fd"])
    _, st = os.waitpid(init, 0)
    os._exit(0 if os.waitstatus_to_exitcode(st) == 0 else 122)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    _cfg = json.loads(sys.argv[2])
    _cfg["status_fd"] = int(sys.argv[3])
    _child_main(_cfg)
