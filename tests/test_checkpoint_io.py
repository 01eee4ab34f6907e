"""Checkpoints and run folders under failure: pruning, atomic folders, run locks, full disks, unwritable or corrupt
checkpoints, metrics rows on a fresh start or a resume, and resuming under another launcher or fewer devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import micro_config, tiny_model, write_micro_toml, write_synthetic_corpus

from elastic_moe import atomic, distributed
from elastic_moe.atomic import atomic_dir, atomic_write_bytes, run_lock
from elastic_moe.checkpoint import find_checkpoint, save_checkpoint
from elastic_moe.distributed import fsdp2_runs_on_cpu
from elastic_moe.errors import Interrupted, UserError
from elastic_moe.metrics import MetricsSink, read_metrics, recent_mean
from elastic_moe.runloop import prune_checkpoints

ROOT = Path(__file__).resolve().parents[1]
MICRO = micro_config({"model.num_hidden_layers": 3, "data.heldout_frac": 0.1, "train.batch_size": 4,
                      "train.save_every": 3, "eval.every": 3, "optim.schedule_steps": 6})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint_io")
    corpus = write_synthetic_corpus(root / "corpus", docs=60, max_lines=30)
    return write_micro_toml(root / "micro.toml", MICRO, corpus, root / "cache")


def run_cmd(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def pretrain(toml: Path, out: Path, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return run_cmd([*launch, "-m", "elastic_moe.cli", "pretrain", str(toml), "--out", str(out), *args])


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    # a damaged step folder (no config.json) numbered past the latest checkpoint is not resumable: it must not count
    # as one of the kept checkpoints, or rotation deletes the good ones and leaves only the damaged one
    ck = tmp_path / "checkpoints"
    for step in (3, 4):
        save_checkpoint(ck / f"step_{step:08d}", tiny_model(), meta={"step": step})
    (ck / "step_00000009").mkdir()
    (ck / "step_00000009" / "model.safetensors").write_bytes(b"torn")
    prune_checkpoints(tmp_path, keep=1)
    assert (ck / "step_00000004" / "config.json").is_file()
    assert find_checkpoint(tmp_path) == ck / "step_00000004"
    assert not (ck / "step_00000003").exists()


def test_atomic_dir_does_not_replace_a_folder_that_appeared_while_writing(tmp_path):
    # two processes building the same cache folder: the one finishing second keeps the first one's result rather
    # than replacing it under a reader (force=False refuses an existing folder, also when it appears meanwhile)
    dest = tmp_path / "cache"
    with pytest.raises(FileExistsError):
        with atomic_dir(dest) as tmp:
            (tmp / "meta.json").write_text("mine")
            dest.mkdir()
            (dest / "meta.json").write_text("theirs")
    assert (dest / "meta.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary left
    with atomic_dir(tmp_path / "empty") as tmp:  # an empty folder is still taken over
        (tmp_path / "empty").mkdir()
        (tmp / "f").write_text("x")
    assert (tmp_path / "empty" / "f").read_text() == "x"


def test_run_lock_taken_on_a_file_its_holder_removed_is_retried(tmp_path, monkeypatch):
    # the holder removes .lock on exit: a process that opened the old file just before gets the lock on a file no
    # one else sees, while a third process locks the new .lock - two writers on one folder
    import fcntl

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("")
    real_flock, third = fcntl.flock, []

    def flock(fd, op):
        if not third:  # between our open and our flock: the holder exits and a third process takes a new lock
            os.unlink(folder / ".lock")
            f = open(folder / ".lock", "a+")
            real_flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.write("4242\n")
            f.flush()
            third.append(f)
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    try:
        with pytest.raises(UserError, match=r"in use by another process \(pid 4242\)"):
            with run_lock(folder):
                pass
        assert (folder / ".lock").read_text() == "4242\n"  # the third process's lock file is left alone
    finally:
        third[0].close()


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_under_fsdp(setup, tmp_path):
    # torch's own optimizer state (parameters numbered) is what a single process and DDP save; FSDP2 loads states
    # keyed by parameter name and failed on it with a KeyError traceback
    if not fsdp2_runs_on_cpu():
        pytest.skip(f"torch {torch.__version__} cannot run FSDP2 on a CPU")
    fsdp = ["--set", "train.parallel='fsdp'"]
    ref = pretrain(setup, tmp_path / "ref", "--max-steps", "6")
    assert ref.returncode == 0, ref.stderr
    first = pretrain(setup, tmp_path / "run", "--max-steps", "3", *fsdp)
    assert first.returncode == 0, first.stderr
    second = pretrain(setup, tmp_path / "run", "--max-steps", "6", "--set", "train.batch_size=2", *fsdp, ranks=2)
    assert second.returncode == 0, second.stderr[-3000:]
    # 1 x 4 sequences before, 2 x 2 now: the note must not say the global batch changed
    assert "the global batch stays at 4 sequences per step" in second.stdout + second.stderr
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in b] == list(range(1, 7))
    torch.testing.assert_close([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_format_version_or_without_a_weights_checksum_is_refused(tmp_path):
    import json

    from elastic_moe.checkpoint import load_checkpoint

    ck = save_checkpoint(tmp_path / "ck", tiny_model())
    meta = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**meta, "format": "elastic-moe/2"}))
    with pytest.raises(UserError, match=r"format elastic-moe/2, .*reads elastic-moe/1") as e:
        load_checkpoint(ck)
    assert "\n" not in str(e.value)
    # the weights' checksum is what makes a flipped byte an error: a config.json without it is damaged
    (ck / "config.json").write_text(json.dumps({**meta, "sha256": {}}))
    with pytest.raises(UserError, match="config.json is corrupt"):
        load_checkpoint(ck)


def test_world_size_set_without_a_launcher_is_a_one_line_error(monkeypatch):

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(UserError, match="WORLD_SIZE=2 .*torchrun") as e:
        distributed.setup("cpu")
    assert "\n" not in str(e.value)


@pytest.fixture
def file_size_limit():
    """Writes past `limit(n)` bytes fail (EFBIG) as they would on a full disk; the limit is lifted afterwards."""
    import resource
    import signal

    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, old_limit[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error_naming_it(tmp_path, file_size_limit):
    from elastic_moe.checkpoint import load_checkpoint

    model = tiny_model()
    good = save_checkpoint(tmp_path / "ck", model, meta={"step": 1})
    size = (good / "model.safetensors").stat().st_size
    big = {"trainer.npy": lambda p: p.write_bytes(bytes(2 * size))}
    for limit, extra in ((size // 2, None), (size + 4096, big)):
        file_size_limit(limit)
        with pytest.raises(OSError) as e:
            save_checkpoint(tmp_path / "ck", model, meta={"step": 2}, extra=extra)
        file_size_limit(1 << 40)
        assert e.value.filename == str(tmp_path / "ck") and "\n" not in e.value.strerror, e.value
        assert load_checkpoint(tmp_path / "ck")[1]["step"] == 1  # the previous one is intact
        assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left


def test_a_full_disk_under_metrics_and_atomic_writes_names_the_file(tmp_path, file_size_limit):
    from elastic_moe.atomic import atomic_write_bytes
    from elastic_moe.metrics import MetricsSink

    (tmp_path / "x.json").write_text("old")
    sink = MetricsSink(tmp_path, tensorboard=False)
    file_size_limit(1000)
    try:
        with pytest.raises(OSError) as e:
            atomic_write_bytes(tmp_path / "x.json", b"y" * 5000)
        assert e.value.filename == str(tmp_path / "x.json")
        with pytest.raises(OSError) as e:
            sink.log({"step": 1, "note": "z" * 5000})
        assert e.value.filename == str(tmp_path / "metrics.jsonl")
    finally:
        file_size_limit(1 << 40)
        sink.close()
    assert (tmp_path / "x.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "x.json"]


def test_a_trainer_state_that_cannot_be_written_is_a_one_line_error_naming_the_checkpoint(tmp_path, file_size_limit):
    # torch.save reports a short write as "RuntimeError: [enforce fail at inline_container.cc...]"
    from elastic_moe.checkpoint import load_checkpoint, torch_state

    model = tiny_model()
    good = save_checkpoint(tmp_path / "ck", model, meta={"step": 1})
    size = (good / "model.safetensors").stat().st_size
    file_size_limit(size + 4096)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path / "ck", model, meta={"step": 2},
                        extra={"trainer.pt": torch_state({"m": torch.zeros(size // 2)})})
    file_size_limit(1 << 40)
    assert e.value.filename == str(tmp_path / "ck") and "torch.save failed" in e.value.strerror, e.value
    assert "\n" not in e.value.strerror
    assert load_checkpoint(tmp_path / "ck")[1]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_an_output_that_is_part_of_an_input_is_refused_even_with_force(tmp_path, capsys):
    from elastic_moe import cli

    ckpt = save_checkpoint(tmp_path / "ck", tiny_model(), meta={"step": 1})
    (ckpt / "tokenizer").mkdir()
    (ckpt / "tokenizer" / "keep.txt").write_text("mine")
    assert cli.main(["export", str(ckpt), str(ckpt / "tokenizer"), "--force"]) == 2
    assert "is part of the input" in capsys.readouterr().err
    assert (ckpt / "tokenizer" / "keep.txt").read_text() == "mine"
    assert cli.main(["export", str(ckpt), str(ckpt / "hf")]) == 0  # a new folder inside it takes nothing away


def test_a_corrupt_latest_checkpoint_names_the_earlier_one_to_resume_from(setup, tmp_path):
    out = tmp_path / "run"
    first = pretrain(setup, out, "--max-steps", "6", "--set", "train.keep_checkpoints=2")
    assert first.returncode == 0, first.stderr
    latest = out / "checkpoints" / "step_00000006"
    with open(latest / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    again = pretrain(setup, out, "--max-steps", "9")
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert "checksum mismatch" in last and f"to resume from the one before (step_00000003), remove {latest}" in last
    assert latest.is_dir() and (out / "checkpoints" / "step_00000003").is_dir()  # nothing removed for the user


def test_a_fresh_start_keeps_no_row_of_an_aborted_run(tmp_path):
    # RL logs a step-0 evaluation row before its first step: a run killed before its first checkpoint starts over
    # at step 0 and logs that row again, which must not leave two step-0 rows
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/accuracy": 0.5}) + "\n"
                                                    for s in (0, 1)))
    sink = MetricsSink(tmp_path, resume_step=0, tensorboard=False)
    sink.log({"step": 0, "eval/accuracy": 0.25})
    sink.close()
    assert read_metrics(tmp_path) == [{"step": 0, "eval/accuracy": 0.25}]


def test_a_resume_keeps_the_step_0_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2)))
    MetricsSink(tmp_path, resume_step=1, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_atomic_dir_interrupted_while_replacing_keeps_the_old_folder(tmp_path, monkeypatch):
    # with force, the old folder is moved aside before the new one is moved in: a signal (or an error) between the
    # two must put it back, not leave PATH missing and the old one hidden under a name a later run deletes
    dest = tmp_path / "step_00000010"
    dest.mkdir()
    (dest / "weights").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            raise Interrupted("a second signal", 2)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(Interrupted), atomic.atomic_dir(dest, force=True) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert (dest / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_resuming_on_fewer_gpus_sets_only_their_rng_states(monkeypatch):
    # a checkpoint from an 8-GPU node holds 8 CUDA generator states; torch's set_rng_state_all indexes
    # default_generators with each (lazily: "CUDA call failed lazily at initialization") on a 1-GPU machine
    import torch

    from elastic_moe import runloop

    state = runloop.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: got.append(list(states)))
    runloop.set_rng_state(state)
    assert len(got) == 1 and len(got[0]) == 1


@pytest.mark.usefixtures("one_thread")
def test_final_loss_is_the_mean_of_the_last_steps():
    """recent_mean: the mean of the last n finite values (the end of the run), not of its first steps."""
    rows = [{"step": s, "loss": float(s)} for s in range(1, 31)] + [{"step": 31, "loss": float("nan")}]
    assert recent_mean(rows, n=5) == (pytest.approx(28.0), 5)
    assert recent_mean(rows[:3], n=5) == (pytest.approx(2.0), 3)


def test_atomic_write_syncs_the_data_before_renaming_it_into_place(tmp_path, monkeypatch):
    """The temporary file's data is fsynced before the rename: a rename is durable only for data flushed before
    it, so a power cut could otherwise leave an empty file under the final name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    i = next(i for i, e in enumerate(events) if e[0] == "replace")
    assert ("fsync", events[i][1]) in events[:i], events


def test_a_forced_replacement_leaves_no_copy_of_the_old_folder_behind(tmp_path):
    """atomic_dir(force=True) over an existing folder removes the old copy once the new one is in place: nothing
    but the new folder is left in the parent (no `.NAME.old.PID` doubling the disk use of every save)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "f").write_text("old")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_old_folder_of_a_live_process_is_not_removed(tmp_path):
    """A `.NAME.old.PID` folder whose process is still alive may be the only copy that process holds (it is in the
    middle of its own replacement): another write into NAME leaves it alone."""
    out = tmp_path / "out"
    out.mkdir()
    live = tmp_path / f".out.old.{os.getppid()}"
    live.mkdir()
    (live / "f").write_text("the only copy")
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
    assert (live / "f").read_text() == "the only copy" and (out / "f").read_text() == "new"
