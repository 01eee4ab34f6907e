"""Session-27 review of the RL side: rollout seeds that depend on the run's seed, the GRPO token count with several
PPO epochs, a stage reused after its inputs changed, reward-pool start-up failures, cgroup mount roots."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers import policy_checkpoint, tiny_model

from elastic_moe.errors import UserError
from elastic_moe.grpo_trainer import FunctionScorer, GRPOConfig, GRPOTrainer
from elastic_moe.rollout import RolloutEngine, RolloutParams

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 33, 42, 9], [7, 8], [11, 12, 13, 14, 15, 16], [3, 4, 5]]


# ------------------------------------------------------------------------------------------ rollout seeds


def test_two_run_seeds_sample_differently_at_the_same_step_and_seed_0_as_before():
    from elastic_moe.rl_train import rollout_seed, rollout_step

    assert [rollout_seed(0, s) for s in range(5)] == list(range(5))  # committed seed-0 results still reproduce
    assert len({rollout_seed(seed, s) for seed in range(4) for s in range(50)}) == 200
    model = tiny_model()
    eng = RolloutEngine(model)
    params = RolloutParams(group_size=4, max_new_tokens=8)

    def tokens(seed: int, step: int):
        batch, _ = rollout_step(eng, model, 0, [PROMPTS[0]], ["task"], step, 1, seed, params, -1)
        return [s.tokens for s in batch.samples]

    eng.load_weights(model.state_dict(), 0)
    before = [s.tokens for s in eng.rollout([PROMPTS[0]], params, seed=3, eos_id=-1).samples]  # what seed=step gave
    assert tokens(0, 3) == before
    assert tokens(1, 3) != tokens(0, 3)  # one task: the same prompt at step 3, so only the sampling seed differs
    assert tokens(1, 3) == tokens(1, 3)  # and a pure function of (seed, step): resume repeats it


def test_every_rl_loop_seeds_its_rollouts_with_the_run_seed(tmp_path, monkeypatch):
    """rl (train_rl), the GRPO stage (run_grpo) and the OPD stage (train_opd) all sample step s of a run seeded k
    with rollout_seed(k, s)."""
    from elastic_moe.opd import OPDStageConfig, train_opd
    from elastic_moe.posttrain import GRPOStageConfig, run_grpo
    from elastic_moe.rl_train import RLConfig, RLLoopConfig, RLTaskConfig, rollout_seed, train_rl
    from elastic_moe.tasks import get_suite

    seeds: list[int] = []
    real = RolloutEngine.rollout

    def rollout(self, prompts, params, seed=0, eos_id=None, decode=None):
        seeds.append(seed)
        return real(self, prompts, params, seed, eos_id, decode)

    monkeypatch.setattr(RolloutEngine, "rollout", rollout)
    init = policy_checkpoint(tmp_path)
    cfg = RLConfig(init=str(init), task=RLTaskConfig(train_size=4, test_size=0),
                   rollout=RolloutParams(group_size=2, max_new_tokens=4),
                   train=RLLoopConfig(max_steps=2, prompts_per_step=2, seed=5, threads=1, eval_every=0, save_every=0,
                                      progress=False, tensorboard=False))
    train_rl(cfg, tmp_path / "rl", log=lambda _: None, scorer=FunctionScorer(lambda t, x: 1.0))
    assert seeds == [rollout_seed(5, 0), rollout_seed(5, 1)]
    tasks = get_suite("open_ended", "train", 4, seed=0)
    seeds.clear()
    g = GRPOStageConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, seed=3)
    run_grpo(init, tasks, g, tmp_path / "g", log=lambda _: None)
    assert seeds == [rollout_seed(3, 0)]
    seeds.clear()
    opd = OPDStageConfig(steps=1, prompts_per_step=2, max_new_tokens=4, seed=2)
    train_opd(opd, init, {"open_ended": str(init)}, tasks, tmp_path / "opd", log=lambda _: None)
    assert seeds == [rollout_seed(2, 0)]


# --------------------------------------------------------------------------------------- GRPO token count


@pytest.mark.parametrize("epochs, minibatches", [(2, 1), (3, 2)])
def test_loss_n_tokens_is_the_tokens_trained_on_whatever_the_ppo_epochs(epochs, minibatches):
    model = tiny_model().train()
    trainer = GRPOTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                          GRPOConfig(mask_truncated=False, ppo_epochs=epochs, minibatches=minibatches))
    batch = RolloutEngine(model).rollout(PROMPTS, RolloutParams(group_size=4, max_new_tokens=6), seed=0, eos_id=-1)
    m = trainer.step(batch, [float(s.tokens[0] % 2) + 0.1 * j for j, s in enumerate(batch.samples)])
    assert m["updates"] == epochs * minibatches and m["train/tokens"] == 16 * 6
    assert m["loss/n_tokens"] == m["train/tokens"]


# ------------------------------------------------------------------------------------------------ lineage


def test_a_finished_stage_with_a_new_or_removed_input_is_refused(tmp_path):
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.lineage import run_stage

    student = save_checkpoint(tmp_path / "student", tiny_model())
    teacher = save_checkpoint(tmp_path / "teacher", tiny_model(seed=1))
    made = []

    def train(stage_dir):
        made.append(stage_dir)
        return save_checkpoint(stage_dir / "checkpoints" / "step_00000001", tiny_model(seed=2))

    out, cfg = tmp_path / "pipe", {"lr": 0.1}
    inputs = {"student": student, "teacher_code": teacher}
    first = run_stage(out, "opd", inputs, cfg, train, print)
    assert run_stage(out, "opd", dict(inputs), cfg, train, print) == first and len(made) == 1  # same inputs: reused
    with pytest.raises(UserError, match=r"^stage opd in .* other settings \(input teacher_reasoning is new\): use"):
        run_stage(out, "opd", {**inputs, "teacher_reasoning": teacher}, cfg, train, print)
    with pytest.raises(UserError, match=r"\(input teacher_code is gone\)"):
        run_stage(out, "opd", {"student": student}, cfg, train, print)
    assert len(made) == 1


# -------------------------------------------------------------------------------------------- reward pool


def test_a_worker_that_fails_to_start_leaves_no_earlier_worker_running(monkeypatch):
    from elastic_moe import reward_pool

    started = []
    real = reward_pool._ProcessBackend.start

    def start(self):
        if started:
            raise OSError("no more processes")
        started.append(real(self))
        return started[-1]

    monkeypatch.setattr(reward_pool._ProcessBackend, "start", start)
    with pytest.raises(OSError, match="no more processes"):
        reward_pool.RewardPool(num_workers=3)
    proc, conn, tmp = started[0]
    assert proc.poll() is not None and conn.closed and not os.path.exists(tmp)


def test_a_worker_process_that_cannot_be_started_leaves_no_folder(monkeypatch):
    import tempfile

    from elastic_moe import reward_pool

    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        made.append(real_mkdtemp(*a, **kw))
        return made[-1]

    def popen(*a, **kw):
        raise OSError("fork failed")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(OSError, match="fork failed"):
        reward_pool.RewardPool(num_workers=1)
    assert made and not any(os.path.exists(p) for p in made)


# ------------------------------------------------------------------------------------------- memory cgroup


def test_own_cgroup_dir_strips_the_mount_root_by_path_components():
    from elastic_moe.memory_cgroup import _own_cgroup_dir

    mount = ("/sys/fs/cgroup/memory", "/a")
    assert _own_cgroup_dir(mount, "/a/b") == "/sys/fs/cgroup/memory/b"
    assert _own_cgroup_dir(("/m", "/a/"), "/a/b/c") == "/m/b/c"
    assert _own_cgroup_dir(("/m", "/"), "/ab/c") == "/m/ab/c"
    with pytest.raises(OSError, match="outside the mounted part /a"):
        _own_cgroup_dir(mount, "/ab/c")  # was /sys/fs/cgroup/memory/b/c: a cgroup of someone else


# ------------------------------------------------------------------------------------------------ async RL


def test_a_stop_during_a_trainer_step_hands_out_no_more_rollouts_or_verifications(tmp_path, monkeypatch):
    """A signal while the trainer works: the controller waits for that step (its checkpoint is kept), but hands no
    further job to the rollout and reward workers: the stop drops their results, and would have to wait out each
    slow verification it started (a Python thread cannot be interrupted)."""
    import time
    import types

    from elastic_moe.async_rl import local, workers
    from elastic_moe.async_rl.controller import Controller, RunConfig
    from elastic_moe.async_rl.toy import TokenShareReward, ToyConfig, toy_model, toy_prompts
    from elastic_moe.async_rl.workers import RolloutSettings

    toy = ToyConfig(hidden_size=32, vocab_size=48, prompt_len=6)
    real_submit, real_step, handed_out, signalled = local.LocalHandle.submit, workers.TrainerWorker.step, [], []

    def submit(self, method, *args):
        if method in ("rollout", "score"):
            handed_out.append(time.monotonic())
        return real_submit(self, method, *args)

    def step(self, groups, save_to=None, meta=None):
        if groups[0].gid == 2:  # step 2: SIGINT arrives while the trainer is at it
            ctl.stop.signum = 2
            signalled.append(time.monotonic())
            time.sleep(1.5)
        return real_step(self, groups, save_to, meta)

    monkeypatch.setattr(local.LocalHandle, "submit", submit)
    monkeypatch.setattr(workers.TrainerWorker, "step", step)
    ctl = Controller(RunConfig(steps=6, groups_per_step=2, eta=1, lr=1e-3, rollout_workers=2, reward_workers=2),
                     toy_model(toy), toy_prompts(toy, 12, 0), TokenShareReward(toy.vocab_size, 0.1),
                     RolloutSettings(group_size=4, max_new_tokens=12, chunk_tokens=4), GRPOConfig(mask_truncated=False),
                     eos_id=2, out_dir=tmp_path)
    ctl.stop = types.SimpleNamespace(signum=None)
    s = ctl.run()
    assert s["stopped_by"] == 2 and s["step"] == 2 and s["interrupted"]
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()
    assert not [round(t - signalled[0], 2) for t in handed_out if t > signalled[0] + 0.1]
