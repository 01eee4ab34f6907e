"""Review s26: metrics on a fresh start, atomic folder replacement interrupted, config error messages."""

import json
import os

import pytest

from elastic_moe import atomic
from elastic_moe.errors import Interrupted, UserError
from elastic_moe.metrics import MetricsSink, read_metrics


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


def test_a_typo_inside_an_optional_list_of_tables_is_named():
    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import TrainConfig

    with pytest.raises(UserError, match=r"unknown config key\(s\) eval\.submodels\.lyers "):
        load_config(TrainConfig, None, ["eval.submodels=[{layers=2}, {lyers=3}]"])
    with pytest.raises(UserError, match=r"config key eval\.submodels: expected a list, got 3"):
        load_config(TrainConfig, None, ["eval.submodels=3"])


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
