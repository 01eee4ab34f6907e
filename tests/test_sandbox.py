"""Hostile code in the sandbox: each attack is contained, never "passed", and leaves the host as it was.

Every program below exits 0 only if its attack worked, so "not passed" means "contained".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import eventually

from elastic_moe import sandbox
from elastic_moe.sandbox import Limits, run_code

REPO = Path(__file__).resolve().parents[1]
FAST = Limits(timeout_s=2, memory_mb=256, max_procs=16, file_size_mb=1, max_output_bytes=200_000)
SHORT = Limits(timeout_s=1, memory_mb=256, max_procs=16, file_size_mb=1, max_output_bytes=200_000)  # runs to the end
MODES = ["auto", "fallback"]  # auto is "namespaces" wherever the machine allows it


def _procs_of_sandbox_uids() -> list[int]:
    """PIDs on the host owned by the uids the sandbox drops to."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                status = Path(f"/proc/{d}/status").read_text()
            except OSError:
                continue
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            if sandbox.SANDBOX_UID_BASE <= uid < sandbox.SANDBOX_UID_BASE + sandbox.PID_LIMIT:
                found.append(int(d))
    return found


def _sandbox_procs() -> list[int]:
    """PIDs running the sandbox's child entry point (`sandbox.py --child`), whatever their uid."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--child" in argv and any(a.endswith(b"sandbox.py") for a in argv):
                found.append(int(d))
    return found


def test_isolation_mode_reported():
    mode = sandbox.isolation_mode()
    assert mode in ("namespaces", "fallback")
    if mode == "fallback":
        assert sandbox.isolation_reason()


@pytest.mark.parametrize("mode", MODES)
def test_ordinary_code_passes_and_fails(mode):
    r = run_code("import math\nprint(math.factorial(5))", FAST, mode)
    assert r.status == "passed" and r.stdout == "120\n" and r.returncode == 0
    r = run_code("assert 1 + 1 == 3, 'bad sum'", FAST, mode)
    assert r.status == "failed" and "bad sum" in r.stderr_tail and "AssertionError" in r.reason
    r = run_code("import sys; sys.exit(4)", FAST, mode)
    assert r.status == "failed" and r.returncode == 4


@pytest.mark.parametrize("mode", MODES)
def test_working_dir_is_empty_and_writable(mode):
    code = "import os\nassert os.listdir('.') == [], os.listdir('.')\nopen('x.txt', 'w').write('hi')\nprint(open('x.txt').read())"
    r = run_code(code, FAST, mode)
    assert r.status == "passed", r.stderr_tail
    assert r.stdout == "hi\n"


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode):
    t0 = time.monotonic()
    r = run_code("while True:\n    pass", SHORT, mode)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < SHORT.timeout_s + 2


def test_cpu_limit_fires_before_wall_clock():
    r = run_code("while True:\n    pass", Limits(timeout_s=60, cpu_s=1))  # 1 CPU-second even at load 30
    assert r.status == "timeout" and r.reason == "CPU-time limit of 1 s", r.reason


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_is_reported_as_a_limit_only_when_one_fired(mode):
    r = run_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", FAST, mode)
    assert r.status == "killed" and r.returncode == -9 and "not a sandbox limit" in r.reason
    # ignoring SIGXCPU runs on to the hard CPU limit, where the kernel sends SIGKILL: that one is our limit
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    r = run_code(code, Limits(timeout_s=60, cpu_s=1), mode)  # 2 CPU-seconds: 6 s of wall at load 5 on 2 cores
    assert r.status == "timeout" and r.reason == "CPU-time limit of 1 s" and r.returncode == -9


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_contained(mode):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_code(code, SHORT, mode)
    assert r.status != "passed"
    assert eventually(lambda: _procs_of_sandbox_uids() == [] and _sandbox_procs() == []), \
        (_procs_of_sandbox_uids(), _sandbox_procs())


@pytest.mark.parametrize("mode", MODES)
def test_escaping_fork_is_killed(mode):
    # a child that leaves the process group with setsid and lives on must not survive the run
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('parent done')\n"
    r = run_code(code, FAST, mode)
    assert eventually(lambda: _procs_of_sandbox_uids() == []), _procs_of_sandbox_uids()
    assert r.status in ("passed", "failed")  # fork is refused in the fallback; allowed but contained in namespaces


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb_is_killed(mode):
    r = run_code("x = bytearray(4 * 1024**3)\nprint(len(x))", FAST, mode)
    assert r.status == "killed" and "memory" in r.reason
    r = run_code("x = []\nwhile True:\n    x.append(' ' * 10**6)", FAST, mode)
    assert r.status in ("killed", "crashed")


# each piece stays under the per-process limits (256 MB address space, 16 MB per file); together they are far above
# the 300 MB of the run's memory cgroup
SPLIT = Limits(timeout_s=20, memory_mb=256, file_size_mb=16, total_memory_mb=300)
FORKED_MEMORY = """
import os, sys, time
kids = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        held = b"\\1" * (200 << 20)
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
sys.exit(any(os.waitpid(pid, 0)[1] for pid in kids))
"""
MEMFD_MEMORY = """
import os
chunk = b"\\1" * (15 << 20)
files = [os.memfd_create(str(i)) for i in range(40)]
for fd in files:
    os.write(fd, chunk)
"""


def _memory_cgroup_only() -> str:
    from elastic_moe import memory_cgroup

    if memory_cgroup.parent() is None:
        pytest.skip(f"no memory cgroups here: {memory_cgroup.reason()}")
    return memory_cgroup.parent()[0]


def _runs_cgroups(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(f"emoe-sandbox-{os.getpid()}-")]


def test_forked_children_share_one_memory_limit():
    _namespaces_only()  # the fallback refuses fork
    folder = _memory_cgroup_only()
    r = run_code(FORKED_MEMORY, SPLIT)
    assert r.status == "killed" and "memory limit of 300 MB for the whole sandbox" in r.reason, r
    assert _runs_cgroups(folder) == []


@pytest.mark.parametrize("mode", MODES)
def test_memfd_files_count_against_the_memory_limit(mode):
    folder = _memory_cgroup_only()
    r = run_code(MEMFD_MEMORY, SPLIT, mode)
    assert r.status == "killed" and "for the whole sandbox" in r.reason, r
    assert _runs_cgroups(folder) == []
    assert run_code("print(sum(range(10)))", SPLIT, mode).stdout == "45\n"  # the next run gets a fresh cgroup
    # total_memory_mb=0 opts out: the per-process limits alone let the files through
    assert run_code(MEMFD_MEMORY, dataclasses.replace(SPLIT, total_memory_mb=0), mode).passed


def test_cgroups_left_by_a_dead_caller_are_removed():
    from elastic_moe import memory_cgroup

    folder = _memory_cgroup_only()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = Path(folder) / f"{memory_cgroup.PREFIX}{int(dead.stdout)}-0"
    stale.mkdir()
    mine = memory_cgroup.create(64 << 20)  # a live caller's cgroup is left alone
    try:
        memory_cgroup._remove_stale(folder)
        assert not stale.exists() and os.path.isdir(mine.path)
    finally:
        mine.remove()
    assert not os.path.exists(mine.path)


def test_cgroup_failures_are_errors_and_leave_nothing(monkeypatch):
    folder = _memory_cgroup_only()
    with pytest.raises(sandbox.SandboxError, match="could not start under its memory limit of 2 MB"):
        run_code("print(1)", Limits(total_memory_mb=2))
    with pytest.raises(ValueError, match="total_memory_mb = -1 must be >= 0"):
        run_code("print(1)", Limits(total_memory_mb=-1))
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent-folder")
    with pytest.raises(sandbox.SandboxError, match="cannot prepare the sandbox"):
        run_code("print(1)")
    assert _runs_cgroups(folder) == []


def test_a_named_cgroup_folder_must_be_usable(tmp_path):
    """ELASTIC_MOE_SANDBOX_CGROUP naming a plain folder fails every run with its reason (no silent run without a
    limit), and the isolation mode is still decided by namespaces alone."""
    _namespaces_only()
    _memory_cgroup_only()
    driver = ("from elastic_moe import sandbox\n"
              "print(sandbox.isolation_mode())\n"
              "for _ in range(2):\n"
              "    try:\n"
              "        sandbox.run_code('print(1)')\n"
              "    except sandbox.SandboxError as e:\n"
              "        print(e)\n")
    run = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO), "ELASTIC_MOE_SANDBOX_CGROUP": str(tmp_path)})
    lines = run.stdout.splitlines()
    assert lines[0] == "namespaces", run.stdout + run.stderr
    assert len(lines) == 3 and all("not a memory cgroup hierarchy" in line for line in lines[1:]), lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
def test_huge_output_is_cut(mode):
    r = run_code("while True:\n    print('x' * 10000)", FAST, mode)
    assert r.status == "killed" and "output" in r.reason
    assert len(r.stdout) <= 65536


@pytest.mark.parametrize("mode", MODES)
def test_cannot_write_outside_workdir(mode, tmp_path):
    tmp_path.chmod(0o777)
    targets = [tmp_path / "pwned.txt", REPO / "pwned.txt", Path("/pwned.txt")]
    for target in targets:
        r = run_code(f"open({str(target)!r}, 'w').write('pwned')", FAST, mode)
        assert r.status == "failed", (target, r)
        assert not target.exists()


@pytest.mark.parametrize("mode", MODES)
def test_file_size_limit(mode):
    r = run_code("open('big', 'wb').write(b'x' * (4 << 20))", FAST, mode)
    assert r.status == "failed" and "File too large" in r.stderr_tail


@pytest.mark.parametrize("mode", MODES)
def test_cannot_read_secrets_or_project_files(mode, monkeypatch):
    monkeypatch.setenv("EMOE_TEST_SECRET", "hunter2")
    r = run_code("import os\nprint(os.environ['EMOE_TEST_SECRET'])", FAST, mode)
    assert r.status == "failed" and "hunter2" not in r.stdout
    for path in [REPO / "pyproject.toml", Path(__file__), f"/proc/{os.getpid()}/environ", "/etc/shadow"]:
        r = run_code(f"print(open({str(path)!r}).read())", FAST, mode)
        assert r.status == "failed", (path, r.stdout[:200])
    r = run_code(f"import os\nprint(os.listdir({str(REPO)!r}))", FAST, mode)
    assert r.status == "failed"


@pytest.mark.parametrize("mode", MODES)
def test_no_network_even_to_loopback(mode):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hello')\n"
        r = run_code(code, FAST, mode)
        assert r.status == "failed", r
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_network_namespace_alone_blocks_loopback():
    _namespaces_only()
    # sockets can be created (no audit hook in this mode), yet nothing is reachable
    r = run_code("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))", FAST)
    assert r.status == "failed" and "unreachable" in r.stderr_tail.lower()


# Exits 0 only if one of the mounts could be changed; prints what it tried.
MOUNT_ATTACK = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def tried(name, ret):
    print(name, "ok" if ret == 0 else os.strerror(ctypes.get_errno()), flush=True)
    if ret == 0:
        sys.exit(0)
tried("remount /usr rw", libc.mount(None, b"/usr", None, ctypes.c_ulong(32 | 4096), None))
tried("remount / rw", libc.mount(None, b"/", None, ctypes.c_ulong(32), None))
tried("umount /usr", libc.umount2(b"/usr", 2))
print("nested user+mount namespace", libc.unshare(0x10000000 | 0x00020000), flush=True)
tried("nested remount /usr rw", libc.mount(None, b"/usr", None, ctypes.c_ulong(32 | 4096), None))
tried("nested umount /usr", libc.umount2(b"/usr", 2))
try:
    open("/usr/planted.py", "w")
    sys.exit(0)
except OSError as e:
    print("write /usr", e.strerror)
sys.exit(1)
"""


def _namespaces_only():
    if sandbox.isolation_mode() != "namespaces":
        pytest.skip("no namespaces on this machine: the fallback (audit hook) is tested above")


def test_worker_cannot_remount_or_unmount_its_root():
    _namespaces_only()
    r = run_code(MOUNT_ATTACK, FAST)
    assert r.status == "failed" and "write /usr Read-only file system" in r.stdout, r


def test_worker_of_a_non_root_caller_holds_no_capabilities():
    """Not root, the sandbox owns its user namespace; the worker must still be unable to touch the mounts.

    Run as `nobody` through setpriv, with a copy of sandbox.py (stdlib only) and the system Python: the
    project's Python may sit where `nobody` cannot read it."""
    _namespaces_only()
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists() or not Path(python).exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to start a non-root caller")
    pkg = Path(tempfile.mkdtemp(prefix="emoe-test-nobody-", dir="/tmp"))  # pytest's folders are 0700: nobody
    try:                                                                    # could not enter them
        os.chmod(pkg, 0o755)
        (pkg / "sandbox.py").write_text((REPO / "elastic_moe" / "sandbox.py").read_text())
        (pkg / "attack.py").write_text(MOUNT_ATTACK)
        driver = ("import sys; sys.path.insert(0, '.'); import sandbox; r = sandbox.run_code(open('attack.py').read());"
                  "print(sandbox.isolation_mode(), r.status); print(r.stdout)")
        run = subprocess.run(
            ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", driver],
            cwd=pkg, capture_output=True, text=True, timeout=60,
        )
    finally:
        shutil.rmtree(pkg, ignore_errors=True)
    if run.returncode != 0 and "namespaces" not in run.stdout:
        pytest.skip(f"the non-root caller could not run the sandbox here: {run.stderr.strip()[-200:]}")
    first, *rest = run.stdout.splitlines()
    if first != "namespaces failed":
        assert not first.startswith("namespaces"), run.stdout  # namespaces, yet the attack did not fail
        pytest.skip(f"no user namespaces for a non-root caller here: {first}")
    assert "remount /usr rw Operation not permitted" in rest and "write /usr Read-only file system" in rest, rest


def test_root_caller_without_setpcap_still_gets_namespaces(tmp_path):
    """A root service may lack CAP_SETPCAP (a restricted capability bounding set): it cannot empty the worker's
    bounding set, but the uid drop and no_new_privs still leave the worker with nothing; namespaces must stay."""
    _namespaces_only()
    if os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists():
        pytest.skip("needs root and setpriv")
    (tmp_path / "attack.py").write_text(MOUNT_ATTACK)
    driver = ("import sys; from elastic_moe import sandbox; r = sandbox.run_code(open(sys.argv[1]).read());"
              "print(sandbox.isolation_mode(), r.status); print(r.stdout)")
    run = subprocess.run(
        ["/usr/bin/setpriv", "--bounding-set=-setpcap", "--inh-caps=-setpcap", sys.executable, "-c", driver,
         str(tmp_path / "attack.py")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if not run.stdout:
        pytest.skip(f"setpriv could not drop CAP_SETPCAP here: {run.stderr.strip()[-200:]}")
    first, *rest = run.stdout.splitlines()
    assert first == "namespaces failed", run.stdout + run.stderr[-300:]
    assert "remount /usr rw Operation not permitted" in rest and "write /usr Read-only file system" in rest, rest


@pytest.mark.parametrize("mode", MODES)
def test_cannot_signal_the_parent_or_other_processes(mode):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    try:
        code = (
            f"import os, signal\n"
            f"os.kill({victim.pid}, signal.SIGKILL)\n"
            f"os.kill({os.getpid()}, signal.SIGUSR1)\n"
        )
        r = run_code(code, FAST, mode)
        assert r.status != "passed"
        r = run_code("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('survived')", FAST, mode)
        assert r.status != "passed"
        time.sleep(0.1)
        assert victim.poll() is None and got == []
    finally:
        signal.signal(signal.SIGUSR1, old)
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("mode", MODES)
def test_deep_recursion_is_contained(mode):
    code = "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n"
    r = run_code(code, SHORT, mode)
    assert r.status in ("failed", "killed", "crashed", "timeout")
    r = run_code("def f(n):\n    return f(n + 1)\nf(0)", FAST, mode)
    assert r.status == "failed" and "RecursionError" in r.stderr_tail


def test_still_works_after_hostile_runs():
    r = run_code("print(sum(range(10)))", FAST)
    assert r.status == "passed" and r.stdout == "45\n"
    assert eventually(lambda: _procs_of_sandbox_uids() == []), _procs_of_sandbox_uids()


def test_cli_prints_one_json_line(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("print('hello from the sandbox')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-m", "elastic_moe.cli", "sandbox", str(f), "--timeout", "3", "--memory-mb", "256"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["status"] == "passed" and result["stdout"] == "hello from the sandbox\n"
    f.write_text("while True: pass\n")
    p = subprocess.run(
        [sys.executable, "-m", "elastic_moe.cli", "sandbox", str(f), "--timeout", "1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert p.returncode == 1 and json.loads(p.stdout)["status"] == "timeout"
    p = subprocess.run([sys.executable, "-m", "elastic_moe.cli", "sandbox", str(tmp_path / "missing.py")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "no such file" in p.stderr


def test_fallback_cannot_write_outside_its_folder_through_a_directory_fd():
    target = f"/dev/shm/emoe-s26-{os.getpid()}"
    code = (f"import os\nfd = os.open('/dev', os.O_RDONLY)\n"
            f"os.close(os.open({target[5:]!r}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n")
    try:
        r = sandbox.run_code(code, FAST, "fallback")
        assert r.status == "failed" and "not allowed" in r.stderr_tail, r
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)
    r = sandbox.run_code("import json, fractions, os\nprint(len(os.listdir('/usr')) > 0)", FAST, "fallback")
    assert r.status == "passed" and r.stdout == "True\n"  # reading and imports still work


@pytest.mark.parametrize("field, value", [("disk_mb", 0), ("timeout_s", math.nan), ("timeout_s", 0),
                                          ("memory_mb", 0), ("max_output_bytes", -1), ("cpu_s", 0),
                                          ("total_memory_mb", -1)])
def test_bad_limits_are_refused_naming_the_field(field, value):
    # disk_mb=0 mounted an unlimited /sandbox tmpfs ("size=0m"); a NaN timeout raised "cannot convert float NaN"
    with pytest.raises(ValueError, match=field) as e:
        sandbox.run_code("print(1)", sandbox.Limits(**{field: value}))
    assert "\n" not in str(e.value)
