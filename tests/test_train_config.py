"""Pre-training configs: TOML round trips, one-line errors for bad values, the warm-up against the schedule,
settings changed on resume, and the thread count."""

import argparse
import math
import os

import pytest
import torch
from helpers import micro_config, write_micro_toml, write_synthetic_corpus

from elastic_moe import train as train_mod
from elastic_moe.errors import UserError
from elastic_moe.schedule import lr_at
from elastic_moe.tomlconfig import load_config, note_changed_settings, tomllib
from elastic_moe.train import TrainConfig, check_run_dir, dump_toml, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toml(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_config")
    corpus = write_synthetic_corpus(root / "corpus", docs=40, max_lines=20)
    text = micro_config({"model.num_hidden_layers": 2, "train.max_steps": 2, "train.batch_size": 4, "eval.max_batches": 1})
    return write_micro_toml(root / "micro.toml", text, corpus, root / "cache")


def test_config_toml_round_trips_characters_outside_the_bmp():
    # json.dumps writes U+1F600 as a surrogate pair, an escape TOML refuses: the run could not be resumed
    data = {"data": {"path": "/data/corpus \U0001f600 \u00e9\x7f\n\"q\""}}
    assert tomllib.loads(dump_toml(data)) == data


@pytest.mark.parametrize("text", ["[]", "null", "3"])
def test_a_run_config_json_that_is_not_an_object_is_a_one_line_error(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    cfg = TrainConfig()
    with pytest.raises(UserError, match="config.json is corrupt"):
        check_run_dir(tmp_path, cfg, print)
    with pytest.raises(UserError, match="config.json is corrupt"):
        note_changed_settings(tmp_path, cfg.to_dict(), print)


def test_an_integer_too_large_for_a_float_key_is_a_one_line_error():
    with pytest.raises(UserError, match="optim.lr"):
        load_config(TrainConfig, None, ["optim.lr=1" + "0" * 400])


def test_optimizer_settings_changed_on_resume_take_effect(toml, tmp_path, monkeypatch):
    made = []
    make = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda *a: made.append(make(*a)) or made[-1])
    run = tmp_path / "run"
    train(load_config(TrainConfig, toml, ["train.max_steps=1"]), run, log=lambda _: None)
    said = []
    train(load_config(TrainConfig, toml, ["optim.weight_decay=0.0", "optim.beta2=0.99", "optim.eps=1e-6"]), run,
          log=said.append)
    assert any("optim.weight_decay 0.1 -> 0.0" in line for line in said)
    groups = made[-1].param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 for g in groups)
    assert groups[0]["params"] and torch.is_tensor(next(iter(made[-1].state.values()))["exp_avg"])  # state kept


def test_load_optimizer_state_keeps_the_configured_settings():
    # every training loop (pretrain, SFT, GRPO, OPD) resumes its optimizer through this: moments from the
    # checkpoint, settings (lr, betas, eps, weight decay) as configured for the session that resumes
    from elastic_moe.checkpoint import load_optimizer_state

    w = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    w.grad = torch.ones(3)
    old.step()
    saved = old.state_dict()
    new = torch.optim.AdamW([w], lr=5e-4, betas=(0.8, 0.9), weight_decay=0.0)
    load_optimizer_state(new, saved)
    g = new.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (5e-4, (0.8, 0.9), 0.0)
    assert torch.equal(new.state[w]["exp_avg"], old.state[w]["exp_avg"]) and new.state[w]["step"] == 1


def test_a_thread_count_beyond_the_machine_is_refused(tmp_path):

    from elastic_moe.commands.arg_types import threads
    from elastic_moe.errors import UserError
    from elastic_moe.rl_train import RLConfig
    from elastic_moe.sft import SFTConfig
    from elastic_moe.train import TrainConfig

    too_many = 4 * (os.cpu_count() or 1) + 1
    for cfg in (TrainConfig(), SFTConfig(), RLConfig()):
        cfg.train.threads = too_many
        with pytest.raises(UserError, match=rf"train.threads = {too_many} must be in \[0, "):
            cfg.validate()
        cfg.train.threads = 2
        cfg.validate()
    with pytest.raises(argparse.ArgumentTypeError, match="must be in"):
        threads(str(too_many))
    assert threads("0") == 0


@pytest.mark.parametrize("overrides", [
    ["optim.warmup_steps=30", "optim.schedule_steps=20"],
    ["optim.warmup_steps=30", "optim.schedule_steps=20", "train.max_steps=100"],  # the horizon, not max_steps
])
def test_a_warmup_longer_than_the_schedule_is_a_one_line_error(overrides):
    # before: accepted, and the learning rate never reached optim.lr nor decayed (lr_at stays in its warm-up)
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, None, overrides)
    msg = str(e.value)
    assert "optim.warmup_steps = 30" in msg and "optim.schedule_steps = 20" in msg and "\n" not in msg
    # as long as the schedule (the last step reaches optim.lr) and shorter are fine
    load_config(TrainConfig, None, ["optim.warmup_steps=20", "optim.schedule_steps=20"])
    load_config(TrainConfig, None, ["optim.warmup_steps=0", "optim.schedule_steps=1"])


def test_a_run_shorter_than_its_warmup_says_so(tmp_path):
    # the schedule's length is train.max_steps (optim.schedule_steps unset), which a later session may raise: a
    # short run is not refused, but the lr that stays below optim.lr is said, not silent
    corpus = write_synthetic_corpus(tmp_path / "corpus", docs=30, max_lines=20)
    text = micro_config({"model.num_hidden_layers": 2, "train.max_steps": 2, "train.batch_size": 4,
                         "optim.warmup_steps": 5, "eval.max_batches": 1})
    toml = write_micro_toml(tmp_path / "micro.toml", text, corpus, tmp_path / "cache")
    said = []
    summary = train(load_config(TrainConfig, toml), tmp_path / "run", log=said.append)
    assert summary["step"] == 2
    notes = [line for line in said if "optim.warmup_steps = 5" in line]
    assert len(notes) == 1 and "2 steps" in notes[0] and "\n" not in notes[0], said
    # a run that reaches the end of its warm-up says nothing
    said.clear()
    train(load_config(TrainConfig, toml, ["train.max_steps=5"]), tmp_path / "run", log=said.append)
    assert not [line for line in said if "warmup_steps" in line], said


def test_embedding_std_with_a_zero_initializer_range_is_a_one_line_error():
    # before: accepted, then a ZeroDivisionError traceback from scale_init (embedding_std / initializer_range)
    # once the run had prepared its data; the packaged config sets init.embedding_std
    from elastic_moe.train import DEFAULT_CONFIG

    with pytest.raises(UserError, match=r"init.embedding_std .* model.initializer_range > 0"):
        load_config(TrainConfig, DEFAULT_CONFIG, ["model.initializer_range=0.0"])
    cfg = load_config(TrainConfig, None, ["model.initializer_range=0.0"])  # no rescaling asked for: fine
    assert cfg.init.embedding_std is None


def test_a_typo_inside_an_optional_list_of_tables_is_named():
    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import TrainConfig

    with pytest.raises(UserError, match=r"unknown config key\(s\) eval\.submodels\.lyers "):
        load_config(TrainConfig, None, ["eval.submodels=[{layers=2}, {lyers=3}]"])
    with pytest.raises(UserError, match=r"config key eval\.submodels: expected a list, got 3"):
        load_config(TrainConfig, None, ["eval.submodels=3"])


@pytest.mark.parametrize("value", ["1e-7", "0", "-1"])
def test_a_tokenizer_sample_below_one_byte_is_refused_at_config_load(value):
    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import DEFAULT_CONFIG, TrainConfig

    # 1e-7 passed "> 0" and then read no text ("empty corpus"); inf is refused by the loader already
    with pytest.raises(UserError, match=r"data.tokenizer_sample_mb = .* at least 1e-06"):
        load_config(TrainConfig, DEFAULT_CONFIG, [f"data.tokenizer_sample_mb={value}"])


def test_lr_warms_up_linearly_from_the_first_step_and_decays_by_cosine_to_the_floor():
    """Warm-up: step s (0-based) of a W-step warm-up trains at lr * (s + 1) / W, so the first step already moves
    the weights and the last warm-up step reaches lr; then a half cosine from lr down to min_ratio * lr at the end of
    the schedule, and min_ratio * lr after it."""
    lr, W, T, floor = 2.0, 4, 10, 0.1
    assert lr_at(0, lr, W, T, floor) == pytest.approx(0.5)
    assert lr_at(W - 1, lr, W, T, floor) == pytest.approx(lr)
    assert lr_at(W, lr, W, T, floor) == pytest.approx(lr)  # progress 0 of the cosine
    assert lr_at(7, lr, W, T, floor) == pytest.approx(lr * (floor + (1 - floor) * 0.5))  # its midpoint
    assert lr_at(T, lr, W, T, floor) == pytest.approx(lr * floor)
    assert lr_at(T + 5, lr, W, T, floor) == pytest.approx(lr * floor)
    # the last step of the schedule: 5/6 of the way down the cosine
    last = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert lr_at(T - 1, lr, W, T, floor) == pytest.approx(last)
    assert lr_at(0, lr, 0, T, floor) == pytest.approx(lr)  # no warm-up: the full lr at once
