"""Write files and folders so that a crash never leaves a half-written result behind.

Everything is first written next to its destination under a temporary name, flushed, and then moved into place
with `os.replace`, which is atomic on POSIX within one file system.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under `root` to disk. A rename is durable only for data flushed before it: without
    this, a power cut just after a folder is put in place (and its predecessor pruned) can leave it with empty
    files."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _temp(make, path: Path):
    """A temporary file or folder next to `path`; an error names `path`, not the temporary name."""
    try:
        return make(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise type(e)(e.errno, f"cannot write here ({e.strerror})", str(path)) from None


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only be read by setting it)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: str | Path) -> None:
    """Give a file that its writer made private (mkstemp, safetensors: 0600) the mode a plain new file gets."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError that names no file (a full disk on write) is raised again naming `path`: the CLI prints it as a
    one-line error."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp(tempfile.mkstemp, path)
    try:
        with naming(path):
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the result the mode any new file gets
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    """What `atomic_write_json` wrote. Anything else (bytes that are not JSON, another type) is a one-line UserError
    naming the file: such a file was edited or damaged outside this program."""
    from elastic_moe.errors import UserError

    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); remove it to make it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is corrupt (not a JSON object); remove it to make it again")
    return obj


def atomic_savefig(fig, path: str | Path, **kwargs) -> None:
    """A matplotlib figure rendered in memory, then written like any other output (never a torn image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def write_figure(path: str | Path, draw, ncols: int, figsize: tuple[float, float]) -> bool:
    """A row of `ncols` gridded panels drawn by `draw(axes)` and written with `atomic_savefig`. False (nothing
    written) when matplotlib is missing or drawing fails: a report is then written without its figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, ncols, figsize=figsize, dpi=110, squeeze=False)
        try:
            draw(list(axes[0]))
            for ax in axes[0]:
                ax.grid(alpha=0.3)
            fig.tight_layout()
            atomic_savefig(fig, path)
        finally:
            plt.close(fig)
        return True
    except Exception:  # noqa: BLE001 - the figure is an extra; its absence is visible in the report
        return False


def refuse_occupied(path: str | Path, force: bool = False, inputs: tuple = ()) -> None:
    """The check `atomic_dir` makes on entry, for commands that must make it before any work: a file, or a
    non-empty folder without `force`, raises FileExistsError. So does a folder that is one of the command's
    `inputs` or holds one, or an existing part of one, force or not: replacing it would destroy what is being read."""
    path = Path(path)
    for src in (Path(i) for i in inputs if i is not None):
        same = src.resolve() == path.resolve()
        if same or path.resolve() in src.resolve().parents:
            raise FileExistsError(f"{path} {'is' if same else 'holds'} the input {src}; write to another folder")
        if path.exists() and src.resolve() in path.resolve().parents:
            raise FileExistsError(f"{path} is part of the input {src}; write to another folder")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{path} exists and is not empty (use --force to replace it)")


def refuse_inside_corpus(out: str | Path, corpus: str | Path | None, flag: str = "--out") -> None:
    """An output folder inside the corpus: its files would be read back as text by the next run on that corpus."""
    from elastic_moe.errors import UserError

    if not corpus:
        return
    c, o = Path(corpus).resolve(), Path(out).resolve()
    if o == c or c in o.parents:
        raise UserError(f"{out} is inside the corpus {corpus}: its files would be read as training text; use "
                        f"another {flag}")


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path`, on any error it is removed.

    An existing non-empty `path` is refused unless `force` (also one that another process fills meanwhile: then
    FileExistsError on exit); with `force` the old folder is only removed after the new one is complete, so a
    failure never loses it.
    """
    path = Path(path)
    refuse_occupied(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_old(path)
    tmp = Path(_temp(tempfile.mkdtemp, path))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: a model folder others (a server) may read
        yield tmp
        _fsync_tree(tmp)
        old = path.parent / f".{path.name}.old.{os.getpid()}" if force and path.exists() else None
        try:
            if old is not None:
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException as e:
            if old is not None and old.exists() and not path.exists():  # put the old folder back (a signal too)
                os.replace(old, path)
            if not isinstance(e, OSError) or e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # without force, a folder another process filled meanwhile is kept, not replaced
            raise FileExistsError(e.errno, "exists and is not empty (written meanwhile by another process)",
                                  str(path)) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_old(path: Path) -> None:
    """A replaced folder that a killed process left next to `path` (`.NAME.old.PID`). Only once `path` is back in
    place: until then the old folder is the only copy."""
    if not path.exists():
        return
    for old in path.parent.glob(f".{path.name}.old.*"):
        pid = old.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """Hold FOLDER/.lock while a command writes into FOLDER: a second command on the same folder at the same time
    (which would interleave checkpoints and metrics) is refused in one line. The lock goes with the process, even
    on SIGKILL; the file, and a folder that this call made and that stayed empty, are removed on exit."""
    from elastic_moe.errors import UserError

    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder))
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise UserError(f"{folder} is in use by another process{f' (pid {holder})' if holder else ''}: wait "
                            "for it to finish, or use another folder") from None
        # the previous holder removes the file on exit: a lock taken on the file it removed guards nothing
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        f.close()
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a refused run leaves nothing behind
