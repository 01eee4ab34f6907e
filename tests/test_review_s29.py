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
import os, socket, sys, threading
from elastic_moe import sandbox
lib = sandbox._Libc()
lib.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
sandbox._install_seccomp(lib)
def attempt(name, fn):
    try:
        fn()
        print(name, "allowed")
    except OSError as e:
        print(name, "refused", e.errno)
attempt("socket", lambda: socket.socket().close())
attempt("fork", os.fork)
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("signal parent", lambda: os.kill(os.getppid(), 0))
attempt("pidfd", lambda: os.pidfd_open(os.getpid()))
attempt("signal self", lambda: os.kill(os.getpid(), 0))
attempt("own group", lambda: os.kill(0, 0))
ran = []
t = threading.Thread(target=lambda: ran.append(1))
attempt("thread", t.start)
t.join()
print("thread ran" if ran else "thread did not run")
"""


@pytest.mark.skipif(os.uname().machine not in sandbox._SECCOMP_ARCH, reason="no seccomp table for this machine")
def test_seccomp_filter_refuses_process_creation_sockets_and_signals_without_the_audit_hook():
    out = subprocess.run([sys.executable, "-c", _FILTER_PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = set(out.stdout.splitlines())
    eperm = errno.EPERM
    for name in ("socket", "fork", "exec", "signal parent", "pidfd"):
        assert f"{name} refused {eperm}" in lines, out.stdout
    for name in ("signal self", "own group", "thread"):
        assert f"{name} allowed" in lines, out.stdout
    assert "thread ran" in lines


def test_seccomp_program_layout():
    prog = sandbox.seccomp_program("x86_64", 1234)
    assert prog is not None and len(prog) % 8 == 0 and len(prog) // 8 < 4096  # BPF_MAXINSNS
    assert sandbox.seccomp_program("riscv64", 1234) is None
    # every jump lands inside the program
    for i in range(len(prog) // 8):
        code, jt, jf, _ = struct.unpack("<HBBI", prog[8 * i:8 * i + 8])
        if code & 0x07 == 0x05:  # BPF_JMP
            assert i + 1 + max(jt, jf) < len(prog) // 8


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
