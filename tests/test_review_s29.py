"""Session 29: defects from earlier sessions' "seen, not fixed" lists, each shown by a test that failed first."""

import dataclasses
import errno
import os
import struct
import subprocess
import sys

import pytest

from elastic_moe import sandbox
from elastic_moe.tasks import get_suite, open_ended


def test_open_ended_demonstration_of_a_task_saved_without_kind():
    # tasks written before session 28 carry a topic but no "kind"; their demonstration used to raise KeyError
    for task in get_suite("open_ended", "train", n=20, seed=3, difficulty=2):
        expected = open_ended.demonstration(task)
        for drop in (("kind",), ("topic", "kind")):
            old = dataclasses.replace(task, metadata={k: v for k, v in task.metadata.items() if k not in drop})
            assert open_ended.topic_and_kind(old) == (task.metadata["topic"], task.metadata["kind"])
            assert open_ended.demonstration(old) == expected
            assert old.verify(expected[-1]["content"]).correct


def test_open_ended_task_without_topic_anywhere_is_a_clear_error():
    task = get_suite("open_ended", "train", n=1, seed=0)[0]
    bare = dataclasses.replace(task, metadata={}, messages=[{"role": "user", "content": "Say something."}])
    with pytest.raises(ValueError, match="no topic and kind"):
        open_ended.demonstration(bare)


# --- the fallback sandbox's seccomp filter: the kernel refuses what the audit hook refuses in Python

_FILTER_PROBE = """
import ctypes, os, socket, sys, threading
from elastic_moe import sandbox
lib = sandbox._Libc()
lib.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
sandbox._install_seccomp(lib, fallback=sys.argv[1] == "fallback")
raw = ctypes.CDLL(None, use_errno=True)
def attempt(name, fn):
    try:
        fn()
        print(name, "allowed")
    except OSError as e:
        print(name, "refused", e.errno)
def call(ret):
    if ret == -1:
        raise OSError(ctypes.get_errno(), "")
def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
attempt("socket", lambda: socket.socket().close())
attempt("fork", fork)
def exec_():
    if sys.argv[1] == "fallback":  # refused, or this process becomes sh and exits 3
        os.execv("/bin/sh", ["sh", "-c", "exit 3"])
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/sh", ["sh", "-c", "exit 3"])
        finally:
            os._exit(7)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 3:
        raise OSError(1, "the child could not exec")
attempt("exec", exec_)
attempt("signal parent", lambda: os.kill(os.getppid(), 0))
attempt("pidfd", lambda: os.pidfd_open(os.getpid()))
attempt("signal self", lambda: os.kill(os.getpid(), 0))
attempt("own group", lambda: os.kill(0, 0))
attempt("user namespace", lambda: call(raw.unshare(sandbox.CLONE_NEWUSER)))
attempt("io_uring", lambda: call(raw.syscall(sandbox._SECCOMP_ARCH[os.uname().machine][1]["io_uring_setup"], 1, 0)))
ran = []
t = threading.Thread(target=lambda: ran.append(1))
attempt("thread", t.start)
t.join()
print("thread ran" if ran else "thread did not run")
"""


@pytest.mark.skipif(os.uname().machine not in sandbox._SECCOMP_ARCH, reason="no seccomp table for this machine")
@pytest.mark.parametrize("mode", ["fallback", "namespaces"])
def test_seccomp_filter_refuses_without_the_audit_hook(mode):
    out = subprocess.run([sys.executable, "-c", _FILTER_PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr  # an exec that got through would exit 3
    lines = set(out.stdout.splitlines())
    outside = ["socket", "fork", "exec", "signal parent", "pidfd"]  # the fallback's own refusals
    refused = ["user namespace", "io_uring"] + (outside if mode == "fallback" else [])
    allowed = ["signal self", "own group", "thread"] + ([] if mode == "fallback" else outside)
    for name in refused:
        assert f"{name} refused {errno.EPERM}" in lines, (name, out.stdout)
    for name in allowed:
        assert f"{name} allowed" in lines, (name, out.stdout)
    assert "thread ran" in lines


def test_seccomp_program_layout():
    for fallback in (True, False):
        for machine in sandbox._SECCOMP_ARCH:
            prog = sandbox.seccomp_program(machine, 1234, fallback)
            assert prog is not None and len(prog) % 8 == 0 and len(prog) // 8 < 4096  # BPF_MAXINSNS
            n = len(prog) // 8
            for i in range(n):  # every jump lands inside the program, which ends with a return
                code, jt, jf, _ = struct.unpack("<HBBI", prog[8 * i:8 * i + 8])
                if code & 0x07 == 0x05:  # BPF_JMP
                    assert i + 1 + max(jt, jf) < n
            assert struct.unpack("<HBBI", prog[-8:])[0] == 0x06
    assert sandbox.seccomp_program("riscv64", 1234, True) is None


_BYPASS = """
import _posixsubprocess, os
r, w = os.pipe()
pid = _posixsubprocess.fork_exec(["/bin/true"], [b"/bin/true"], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w,
                                 False, False, -1, None, None, None, -1, None, False)
print("escaped", pid)
"""


@pytest.mark.skipif(os.uname().machine not in sandbox._SECCOMP_ARCH, reason="no seccomp table for this machine")
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="fork_exec's argument list is that of Python 3.11")
def test_fallback_sandbox_refuses_the_unhooked_fork_exec(monkeypatch):
    # session 19's red team started a process past the audit hook with _posixsubprocess.fork_exec
    limits = sandbox.Limits(timeout_s=5, memory_mb=256)
    r = sandbox.run_code(_BYPASS, limits, isolation="fallback")
    assert r.status == "failed" and "escaped" not in r.stdout and "PermissionError" in r.stderr_tail, r
    monkeypatch.setenv("ELASTIC_MOE_SANDBOX_SECCOMP", "off")  # the filter is what stops it
    r = sandbox.run_code(_BYPASS, limits, isolation="fallback")
    assert r.status == "passed" and "escaped" in r.stdout, r


_PIDFD_ATTACK = """
import os, signal
signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)
print("signalled the caller")
"""


@pytest.mark.skipif(os.uname().machine not in sandbox._SECCOMP_ARCH, reason="no seccomp table for this machine")
def test_non_root_fallback_cannot_kill_its_caller_through_a_pidfd():
    """Session 19's red team, not root and in the fallback, killed the caller (a reward worker) through a pidfd:
    no audit event covers pidfd_open or pidfd_send_signal. Run as `nobody` with a copy of sandbox.py."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv") or not os.path.exists(python):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to start a non-root caller")
    import shutil
    import tempfile
    from pathlib import Path

    pkg = Path(tempfile.mkdtemp(prefix="emoe-test-nobody-", dir="/tmp"))
    try:
        os.chmod(pkg, 0o755)
        (pkg / "sandbox.py").write_text(Path(sandbox.__file__).read_text())
        (pkg / "attack.py").write_text(_PIDFD_ATTACK)
        driver = ("import sys; sys.path.insert(0, '.'); import sandbox; "
                  "r = sandbox.run_code(open('attack.py').read(), isolation='fallback'); print('caller alive', r.status)")
        run = subprocess.run(
            ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", driver],
            cwd=pkg, capture_output=True, text=True, timeout=60,
        )
    finally:
        shutil.rmtree(pkg, ignore_errors=True)
    assert run.returncode == 0 and "caller alive failed" in run.stdout, (run.returncode, run.stdout, run.stderr[-300:])


_NESTED_USERNS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
r = libc.unshare(0x10000000)
print("nested user namespace", "made" if r == 0 else os.strerror(ctypes.get_errno()))
"""


def test_namespaces_sandbox_refuses_a_nested_user_namespace(monkeypatch):
    # a user namespace the code makes gives it capabilities there: kernel surface that exploits favour
    if sandbox.isolation_mode() != "namespaces" or os.uname().machine not in sandbox._SECCOMP_ARCH:
        pytest.skip("needs namespaces and a seccomp table for this machine")
    limits = sandbox.Limits(timeout_s=5, memory_mb=256)
    r = sandbox.run_code(_NESTED_USERNS, limits)
    assert r.status == "passed" and "nested user namespace Operation not permitted" in r.stdout, r
    monkeypatch.setenv("ELASTIC_MOE_SANDBOX_SECCOMP", "off")
    r = sandbox.run_code(_NESTED_USERNS, limits)
    if "made" not in r.stdout:
        pytest.skip(f"this kernel refuses the nested namespace anyway: {r.stdout.strip()}")
