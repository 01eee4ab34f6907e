"""Review of the asynchronous RL command, its controller, and the quickstart: defects found and fixed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from elastic_moe.async_rl.controller import Controller, RunConfig
from elastic_moe.async_rl.toy import TokenShareReward, ToyConfig, toy_model, toy_prompts
from elastic_moe.async_rl.workers import RolloutSettings
from elastic_moe.errors import UserError
from elastic_moe.grpo_trainer import GRPOConfig

TOY = ToyConfig(hidden_size=32, vocab_size=48, prompt_len=6)

pytestmark = pytest.mark.usefixtures("one_thread")


def controller(out=None, **kw) -> Controller:
    run = dict(steps=2, groups_per_step=2, eta=0, lr=1e-3, rollout_workers=1, reward_workers=1)
    run.update(kw)
    return Controller(RunConfig(**run), toy_model(TOY), toy_prompts(TOY, 12, 0), TokenShareReward(TOY.vocab_size),
                      RolloutSettings(group_size=2, max_new_tokens=4, chunk_tokens=2), GRPOConfig(mask_truncated=False),
                      eos_id=2, out_dir=out)


def test_a_resume_with_another_groups_per_step_or_seed_is_refused_by_the_command(tmp_path, capsys):
    """Group g is trained at step g // groups_per_step, in an order seeded by run.seed: resumed with another
    groups_per_step the run trained groups 4 and 5 a second time (and with another seed, other prompts)."""
    from elastic_moe.cli import main

    out = tmp_path / "run"
    assert main(["async-rl", "--out", str(out), "--set", "run.steps=2", "--set", "run.tensorboard=false"]) == 0
    saved = {p: (out / p).read_bytes() for p in ("config.json", "config.toml", "metrics.jsonl")}
    capsys.readouterr()
    for change, words in (("run.groups_per_step=2", "run.groups_per_step 4 -> 2"), ("run.seed=1", "run.seed 0 -> 1")):
        assert main(["async-rl", "--out", str(out), "--set", "run.steps=3", "--set", change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("elastic-moe async-rl: error: ") and words in err and "\n" not in err, err
        assert {p: (out / p).read_bytes() for p in saved} == saved  # nothing rewritten
    assert main(["async-rl", "--out", str(out), "--set", "run.steps=3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_gids"] == list(range(12))


def test_a_resume_with_another_groups_per_step_is_refused_by_the_controller(tmp_path):
    controller(out=tmp_path, steps=2, groups_per_step=2).run()
    with pytest.raises(UserError, match=r"run.groups_per_step 2 -> 1"):
        controller(out=tmp_path, steps=4, groups_per_step=1).run()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("async-rl-")]
    resumed = controller(out=tmp_path, steps=3, groups_per_step=2).run()
    assert resumed["start_step"] == 2 and resumed["trained_gids"] == [4, 5]


@pytest.mark.parametrize("vocab", [3, 4])
def test_a_toy_vocabulary_without_room_for_prompt_tokens_is_refused_in_one_line(tmp_path, capsys, vocab):
    from elastic_moe.cli import main

    assert main(["async-rl", "--out", str(tmp_path / "run"), "--set", f"toy.vocab_size={vocab}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elastic-moe async-rl: error: ") and "toy.vocab_size" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_the_reward_pool_is_closed_when_the_command_stops_before_training(tmp_path, capsys, monkeypatch):
    """A refusal after the pool was started (here: a damaged config.json) left its worker processes running."""
    from helpers import policy_checkpoint

    from elastic_moe import reward_pool
    from elastic_moe.cli import main

    pools = []

    class Pool:
        def __init__(self, *args, **kwargs):
            self.closed = False
            pools.append(self)

        def close(self, wait: bool = True) -> None:
            self.closed = True

    monkeypatch.setattr(reward_pool, "RewardPool", Pool)
    init = policy_checkpoint(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(b"\xff{")
    sets = [f"init={init}", "task.train_size=2", "task.reward_pool_workers=1"]
    assert main(["async-rl", "--out", str(out), *[a for x in sets for a in ("--set", x)]]) == 2
    assert "config.json is corrupt" in capsys.readouterr().err
    assert all(p.closed for p in pools)


def test_quickstart_finds_its_post_training_report_however_out_is_spelled(tmp_path, capsys, monkeypatch):
    """The posttrain marker kept the report's path as --out was spelled: run again with --out spelled another way
    (or from another folder), the finished quickstart crashed in `relative_to`."""
    from helpers import tiny_model

    from elastic_moe import posttrain
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.cli import main
    from elastic_moe.commands import quickstart

    out = tmp_path / "qs"
    save_checkpoint(out / "pretrain" / "checkpoints" / "step_00000001", tiny_model())
    monkeypatch.setattr(quickstart, "_cli", lambda *argv: None)  # pre-training, family, extraction: stand-ins

    def pipeline(init, out_dir):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps({"scores": {"sft": {"code": 12.5}},
                                                         "order": {"stages": ["sft"], "domains": ["code"]}}))
        (out_dir / "report.md").write_text("# post-training\n")
        return out_dir / "report.md"

    monkeypatch.setattr(posttrain, "run_quickstart_posttrain", pipeline)
    monkeypatch.chdir(tmp_path)
    for spelled, cwd in (("qs", tmp_path), (str(out), tmp_path), ("..", out / "pretrain")):
        monkeypatch.chdir(cwd)
        assert main(["quickstart", "--out", spelled]) == 0, capsys.readouterr().err
        report = (out / "report.md").read_text()
        assert "[posttrain/report.md](posttrain/report.md)" in report and "| code | 12.5 |" in report


@pytest.mark.slow  # a Ray cluster takes half a minute to start here
def test_ray_the_weight_store_actor_goes_with_the_run(ray_cluster):
    """The workers' actors were killed at the end of a run, the weight store's was not: it stayed alive, holding the
    last weights in the object store, in every later run of the same process."""
    from ray.exceptions import RayActorError

    ctl = controller(steps=1, backend="ray", rollout_cpus=0.25, reward_cpus=0.25, trainer_cpus=0.5)
    assert ctl.run()["trained_gids"] == [0, 1]
    with pytest.raises(RayActorError):
        ray_cluster.get(ctl.weights.actor.version.remote(), timeout=60)
