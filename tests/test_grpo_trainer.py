"""GRPO trainer: one step on a scored rollout batch (advantages, dropped groups, masks, clipping, TIS, KL, mismatch
metrics, R3), bad inputs (failed / raising / hanging rewards, non-finite losses), and the `rl` command end to end
with checkpoints and resume."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers import policy_checkpoint, sigterm_when_logged, tiny_model

from elastic_moe import ops
from elastic_moe.errors import UserError
from elastic_moe.grpo_trainer import FunctionScorer, GRPOConfig, GRPOTrainer
from elastic_moe.rl_train import prompt_indices
from elastic_moe.rollout import RolloutBatch, RolloutEngine, RolloutParams

PROMPTS = [[5, 17, 33, 42, 9], [7, 8], [11, 12, 13, 14, 15, 16], [3, 4, 5]]
G = 4


def _setup(cfg: GRPOConfig | None = None, rollout_numerics=ops.FP32, lr=1e-2, max_new=6, ref=None):
    model = tiny_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    trainer = GRPOTrainer(model, opt, cfg or GRPOConfig(), temperature=1.0, ref_model=ref)
    eng = RolloutEngine(model, rollout_numerics)
    batch = eng.rollout(PROMPTS, RolloutParams(group_size=G, max_new_tokens=max_new), seed=0, eos_id=-1)
    return model, trainer, eng, batch


def _varied_rewards(batch):
    return [float(s.tokens[0] % 2) + 0.1 * j for j, s in enumerate(batch.samples)]


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_step_updates_and_reports_mismatch():
    cfg = GRPOConfig(mask_truncated=False)  # every sample hits max_new_tokens here
    model, trainer, eng, batch = _setup(cfg, ops.Numerics("bf16", kernel="split"))
    before = _params(model)
    m = trainer.step(batch, _varied_rewards(batch))
    assert m["skipped"] == 0 and m["updates"] == 1 and trainer.version == 1
    assert m["samples/trained"] == 16 and m["train/tokens"] == 16 * 6
    for key in ("mismatch/k3", "mismatch/k1", "mismatch/abs_dlogp", "mismatch/extreme_frac",
                "mismatch/router_flip_rate", "mismatch/token_any_flip_frac", "loss/clip_frac", "loss/tis_weight_mean",
                "loss/entropy", "grad_norm", "staleness/mean_lag"):
        assert key in m, key
    for i in model.moe_layers:
        assert f"mismatch/router_flip_rate/layer{i}" in m
    assert m["mismatch/k3"] > 0 and m["staleness/max_lag"] == 0
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    # the engine's copy is untouched until a weight sync
    assert torch.equal(eng.model.embed.weight, before["embed.weight"])
    eng.load_weights(model.state_dict(), trainer.version)
    assert torch.equal(eng.model.embed.weight, model.embed.weight)


def test_unified_numerics_have_no_mismatch_and_r3_changes_nothing_then():
    model, trainer, eng, batch = _setup(GRPOConfig(mask_truncated=False, r3=True))
    m = trainer.step(batch, _varied_rewards(batch))
    assert m["mismatch/k3"] < 1e-8 and m["mismatch/router_flip_rate"] == 0 and m["mismatch/extreme_frac"] == 0
    assert abs(m["loss/ratio_mean"] - 1) < 1e-6 and m["loss/tis_weight_mean"] == pytest.approx(1, abs=1e-4)


def test_grpo_raises_a_dense_reward():
    """The whole loop learns: reward = share of even token ids in the sample, 10 steps of rollout -> step -> sync."""
    model, trainer, eng, _ = _setup(GRPOConfig(mask_truncated=False), lr=3e-3)
    means = []
    for step in range(10):
        eng.load_weights(model.state_dict(), trainer.version)
        b = eng.rollout(PROMPTS, RolloutParams(group_size=8, max_new_tokens=6), seed=step, eos_id=-1)
        rewards = [sum(t % 2 == 0 for t in s.tokens) / 6 for s in b.samples]
        means.append(sum(rewards) / len(rewards))
        assert trainer.step(b, rewards)["skipped"] == 0
    assert sum(means[-3:]) / 3 > sum(means[:3]) / 3 + 0.15, means


def test_zero_variance_and_failed_groups_are_dropped():
    model, trainer, eng, batch = _setup(GRPOConfig(mask_truncated=False))
    before = _params(model)
    m = trainer.step(batch, [1.0] * len(batch.samples))
    assert m["skipped"] == 1 and m["groups/zero_variance_frac"] == 1 and trainer.version == 0
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    rewards = _varied_rewards(batch)
    rewards[1] = None  # an infrastructure failure in group 0: the whole group goes, never scored 0
    rewards[4:8] = [0.5] * 4  # group 1: no signal
    m = trainer.step(batch, rewards)
    assert m["reward/infra_failures"] == 1 and m["groups/dropped_infra"] == 1
    assert m["groups/zero_variance_frac"] == 0.25 and m["samples/trained"] == 8 and m["skipped"] == 0


def test_truncated_samples_are_masked():
    model, trainer, eng, batch = _setup(GRPOConfig(mask_truncated=True))
    assert all(s.truncated for s in batch.samples)
    m = trainer.step(batch, _varied_rewards(batch))
    assert m["samples/truncated_frac"] == 1 and m["skipped"] == 1 and m["samples/trained"] == 0


def test_nonfinite_loss_skips_the_update():
    model, trainer, eng, batch = _setup(GRPOConfig(mask_truncated=False))
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    before = _params(model)
    m = trainer.step(batch, _varied_rewards(batch))
    assert m["skipped"] == 1 and m["nonfinite_skip"] == 1 and trainer.nonfinite_skips == 1 and trainer.version == 0
    for k, v in model.named_parameters():
        assert torch.equal(before[k], v) or k == "norm.weight"
    assert all(p.grad is None for p in model.parameters())


def test_recompute_path_with_epochs_minibatches_kl_and_micro_batches():
    cfg = GRPOConfig(mask_truncated=False, ppo_epochs=2, minibatches=2, micro_batch=3, kl_coef=0.1, kl_kind="k2")
    ref = tiny_model().eval()
    model, trainer, eng, batch = _setup(cfg, ops.Numerics("fp8"), ref=ref)
    m = trainer.step(batch, _varied_rewards(batch))
    assert m["updates"] == 4 and trainer.version == 1
    assert "mismatch/k3" in m and "loss/kl_ref" in m and m["loss/kl_ref"] >= 0


def test_a_kl_penalty_without_a_reference_policy_is_refused():
    model = tiny_model()
    with pytest.raises(UserError, match="kl_coef > 0 needs a reference policy"):
        GRPOTrainer(model, torch.optim.AdamW(model.parameters()), GRPOConfig(kl_coef=0.1))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_step_metrics_are_token_means_whatever_the_micro_batch(agg):
    """Micro-batching splits the work, not the statistics: mismatch and loss metrics are means over the batch's
    tokens (and max_abs_dlogp its maximum), not means of per-micro-batch values."""
    got = []
    for micro in (0, 3):
        cfg = GRPOConfig(mask_truncated=False, micro_batch=micro, agg=agg, kl_coef=0.1)
        _, trainer, _, batch = _setup(cfg, ops.Numerics("fp8"), lr=0.0, ref=tiny_model(seed=3).eval())
        got.append(trainer.step(batch, _varied_rewards(batch)))
    whole, split = got
    assert whole["mismatch/k3"] > 0 and whole["loss/clip_frac"] >= 0
    for k in ("mismatch/k3", "mismatch/k1", "mismatch/max_abs_dlogp", "mismatch/router_flip_rate", "loss/pg_loss",
              "loss/kl_ref", "loss/entropy", "loss/tis_weight_mean", "loss/n_tokens"):
        assert split[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-7), k


def test_stale_samples_are_reported_apart_from_engine_mismatch():
    model, trainer, eng, batch = _setup(GRPOConfig(mask_truncated=False), lr=1e-3)
    trainer.step(batch, _varied_rewards(batch))
    m = trainer.step(batch, _varied_rewards(batch))  # the same (now one version old) samples again
    assert m["staleness/mean_lag"] == 1 and "offpolicy/k3" in m and "mismatch/k3" not in m
    assert m["offpolicy/k3"] > 0


def test_function_scorer_survives_raising_and_hanging_rewards():
    def fn(task, text):
        if task == "raise":
            raise ValueError("boom")
        if task == "hang":
            time.sleep(30)
        if task == "nan":
            return float("nan")
        return 1.0

    sc = FunctionScorer(fn, timeout_s=2.0)  # a quick call must not time out on a loaded machine
    t0 = time.monotonic()
    rewards, correct, info = sc.score(["ok", "raise", "hang", "nan", "ok"], ["a"] * 5)
    assert time.monotonic() - t0 < 15  # the hanging call is abandoned at its timeout, not waited for (30 s)
    assert rewards == [1.0, None, None, None, 1.0] and correct == [True, False, False, False, True]
    assert info == {"reward/errors": 2, "reward/timeouts": 1}


def test_prompt_order_is_a_function_of_the_step():
    a = [prompt_indices(s, 3, 7, 0) for s in range(5)]
    assert a == [prompt_indices(s, 3, 7, 0) for s in range(5)]
    assert sorted(sum(a[:2], []) + a[2][:1]) == list(range(7))  # the first epoch covers every task once


@pytest.mark.slow
def test_rl_command_ci_sample_end_to_end_and_resume(tmp_path, monkeypatch):
    """`elastic-moe rl` from an SFT-style checkpoint: metrics, checkpoints, a verifier that fails on some samples
    (counted, the run goes on), and resume by running the same command again."""

    from elastic_moe import cli
    from elastic_moe.metrics import read_metrics

    init = policy_checkpoint(tmp_path)
    out = tmp_path / "rl"
    args = ["rl", "--out", str(out), "--init", str(init), "--max-steps", "2",
            "--set", "train.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "rollout.max_new_tokens=8",
            "--set", "task.train_size=8", "--set", "task.test_size=4", "--set", "train.eval_every=0",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "train.save_every=1",
            "--set", "train.threads=1", "--numerics", "mismatch", "--set", "numerics.rollout_precision=bf16"]
    # SIGTERM while step 1 is logged: a checkpoint there, the report so far, exit 143; the same command goes on
    signal_at = sigterm_when_logged(monkeypatch, 1)
    assert cli.main(args) == 143
    assert "**Stopped at step 1 of 2**" in (out / "report.md").read_text()
    signal_at.clear()
    assert cli.main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and "Stopped" not in (out / "report.md").read_text()
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert "mismatch/k3" in rows[1] or rows[1]["skipped"] == 1
    assert (out / "checkpoints" / "step_00000002" / "trainer.pt").is_file() and (out / "report.md").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["numerics"]["mode"] == "mismatch" and cfg["grpo"]["r3"] is True
    args[args.index("--max-steps") + 1] = "3"
    assert cli.main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def _rl_config(init, **train):
    from elastic_moe.rl_train import RLConfig, RLLoopConfig, RLTaskConfig

    t = dict(max_steps=6, prompts_per_step=2, threads=1, eval_every=0, save_every=0, progress=False,
             tensorboard=False, max_bad_steps=1)
    t.update(train)
    return RLConfig(init=str(init), task=RLTaskConfig(train_size=6, test_size=0),
                    rollout=RolloutParams(group_size=2, max_new_tokens=4), train=RLLoopConfig(**t))


def test_failing_rewards_stop_the_run_cleanly_with_a_checkpoint(tmp_path):

    from elastic_moe.errors import UserError
    from elastic_moe.metrics import read_metrics
    from elastic_moe.rl_train import train_rl

    def broken(task, text):
        raise RuntimeError("verifier bug")

    init = policy_checkpoint(tmp_path)
    with pytest.raises(UserError, match="every verification failed"):
        train_rl(_rl_config(init), tmp_path / "rl", log=lambda _: None, scorer=FunctionScorer(broken))
    rows = read_metrics(tmp_path / "rl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["reward/errors"] == 4 and rows[-1]["skipped"] == 1
    assert (tmp_path / "rl" / "checkpoints" / "step_00000002").is_dir()  # the untouched weights, resumable


def test_nonfinite_weights_stop_the_run_without_saving_them(tmp_path):

    from elastic_moe.checkpoint import load_checkpoint, save_checkpoint
    from elastic_moe.errors import UserError
    from elastic_moe.rl_train import train_rl

    init = policy_checkpoint(tmp_path)
    model, _ = load_checkpoint(init)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    bad = save_checkpoint(tmp_path / "bad", model, tokenizer_dir=init / "tokenizer")
    with pytest.raises(UserError, match="non-finite"):
        train_rl(_rl_config(bad), tmp_path / "rl", log=lambda _: None, scorer=FunctionScorer(lambda t, x: 1.0))
    assert not (tmp_path / "rl" / "checkpoints").exists()


def test_a_run_whose_steps_never_update_the_model_says_so(tmp_path):
    from elastic_moe.rl_train import train_rl

    said: list[str] = []
    summary = train_rl(_rl_config(policy_checkpoint(tmp_path), max_steps=2), tmp_path / "rl", log=said.append,
                       scorer=FunctionScorer(lambda t, x: 1.0))  # equal rewards in every group: no signal
    assert summary["updated_steps"] == 0 and said[-1].startswith("warning: no step updated the model")
    assert "steps that updated the model: 0 of 2 (**no step updated" in (tmp_path / "rl" / "report.md").read_text()
    assert (tmp_path / "rl" / "curve.png").is_file()


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


@pytest.mark.parametrize("epochs, minibatches", [(2, 1), (3, 2)])
def test_loss_n_tokens_is_the_tokens_trained_on_whatever_the_ppo_epochs(epochs, minibatches):
    model = tiny_model().train()
    trainer = GRPOTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                          GRPOConfig(mask_truncated=False, ppo_epochs=epochs, minibatches=minibatches))
    batch = RolloutEngine(model).rollout(PROMPTS, RolloutParams(group_size=4, max_new_tokens=6), seed=0, eos_id=-1)
    m = trainer.step(batch, [float(s.tokens[0] % 2) + 0.1 * j for j, s in enumerate(batch.samples)])
    assert m["updates"] == epochs * minibatches and m["train/tokens"] == 16 * 6
    assert m["loss/n_tokens"] == m["train/tokens"]


def _sgd_step(cfg: GRPOConfig, rewards_of, numerics=ops.FP32, lr=1e-2, ref=None, batch_of=None):
    """One GRPO step of a fresh tiny policy (plain SGD, no gradient clipping) on its own rollout batch."""
    model = tiny_model().train()
    trainer = GRPOTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), cfg, temperature=1.0, ref_model=ref,
                          grad_clip=0.0)
    batch = RolloutEngine(model, numerics).rollout(PROMPTS, RolloutParams(group_size=G, max_new_tokens=6), seed=0,
                                                   eos_id=-1)
    if batch_of is not None:
        batch = batch_of(batch)
    m = trainer.step(batch, rewards_of(batch))
    return m, _params(model)


def _close(a: dict, b: dict, **tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


def test_a_dropped_group_does_not_shift_the_advantages_of_the_groups_after_it():
    """Catches `adv_B = adv[:len(idx)]` (advantages not gathered at the kept samples): dropping group 0 (zero
    variance) must give the same update as a batch that never held it."""
    def rewards(b):
        r = _varied_rewards(b)
        r[:G] = [1.0] * G  # group 0: no signal, dropped
        return r

    cfg = GRPOConfig(mask_truncated=False)
    m_full, after_full = _sgd_step(cfg, rewards, lr=1.0)
    # the same step on the batch without group 0 (the same rewards for the other samples)
    m_sub, after_sub = _sgd_step(
        cfg, lambda b: [float(s.tokens[0] % 2) + 0.1 * (j + G) for j, s in enumerate(b.samples)], lr=1.0,
        batch_of=lambda b: RolloutBatch(b.samples[G:], G, b.version, b.groups[1:]))
    assert m_full["samples/trained"] == m_sub["samples/trained"] == 3 * G
    _close(after_full, after_sub, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_changes_neither_the_gradient_nor_the_update(agg):
    """Catches normalising each micro-batch's token-mean loss by its own token count instead of the minibatch's
    (`num_tokens=sub.mask_BT.sum()`): the existing micro-batch test runs at lr 0 and compares only metrics."""
    got = [_sgd_step(GRPOConfig(mask_truncated=False, micro_batch=micro, agg=agg), _varied_rewards) for micro in (0, 3)]
    (whole, p_whole), (split, p_split) = got
    assert whole["grad_norm"] > 0
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    _close(p_whole, p_split, rtol=1e-5, atol=1e-6)


def test_the_reference_policy_routes_with_its_own_router_under_r3():
    """Catches passing the R3 replay flag to the reference forward: with unified numerics R3 leaves the policy's
    log-probs unchanged, so the reported KL to the reference must not depend on grpo.r3."""
    ref = tiny_model(seed=3).eval()
    kl = [_sgd_step(GRPOConfig(mask_truncated=False, kl_coef=0.1, r3=r3), _varied_rewards, lr=0.0,
                    ref=ref)[0]["loss/kl_ref"]
          for r3 in (False, True)]
    assert kl[0] > 0
    assert kl[1] == pytest.approx(kl[0], rel=1e-5)


def test_without_std_scaling_the_gradient_scales_with_the_rewards():
    """Catches ignoring grpo.scale_by_std (group_advantages(r0, G) without it): scaling every reward by 2 doubles
    the gradient when advantages are only centred, and leaves it unchanged when they are divided by the std."""
    def norm(scale_by_std, c):
        cfg = GRPOConfig(mask_truncated=False, scale_by_std=scale_by_std)
        return _sgd_step(cfg, lambda b: [c * r for r in _varied_rewards(b)], lr=0.0)[0]["grad_norm"]

    assert norm(False, 2.0) == pytest.approx(2 * norm(False, 1.0), rel=1e-4)
    assert norm(True, 2.0) == pytest.approx(norm(True, 1.0), rel=1e-4)


def test_zero_variance_groups_are_trained_when_dropping_is_off():
    """Catches ignoring grpo.drop_zero_variance: with it off, a group of equal rewards stays in the batch (its tokens
    count in the token-mean denominator)."""
    def rewards(b):
        r = _varied_rewards(b)
        r[G:2 * G] = [0.5] * G
        return r

    on, _ = _sgd_step(GRPOConfig(mask_truncated=False), rewards, lr=0.0)
    off, _ = _sgd_step(GRPOConfig(mask_truncated=False, drop_zero_variance=False), rewards, lr=0.0)
    assert on["samples/trained"] == 3 * G and on["loss/n_tokens"] == 3 * G * 6
    assert off["samples/trained"] == 4 * G and off["loss/n_tokens"] == 4 * G * 6


def test_tis_mode_mask_zeroes_the_weights_above_the_cap():
    """Catches ignoring grpo.tis_mode (always truncating): per token, truncate gives min(w, cap) and mask gives 0 above
    the cap, so the mean weights differ by exactly clip_frac * cap."""
    ms = {mode: _sgd_step(GRPOConfig(mask_truncated=False, tis_cap=1.0, tis_mode=mode), _varied_rewards,
                          ops.Numerics("fp8"), lr=0.0)[0] for mode in ("truncate", "mask")}
    frac = ms["truncate"]["loss/tis_clip_frac"]
    assert 0 < frac < 1 and ms["mask"]["loss/tis_clip_frac"] == pytest.approx(frac)
    assert ms["mask"]["loss/tis_weight_mean"] == pytest.approx(ms["truncate"]["loss/tis_weight_mean"] - frac * 1.0,
                                                               abs=1e-5)


def test_tis_cap_0_turns_importance_sampling_off():
    """Catches passing the rollout log-probs whatever grpo.tis_cap: cap 0 means 'off' (GRPOConfig), not 'weights
    capped at 0', which zeroes every gradient."""
    m, _ = _sgd_step(GRPOConfig(mask_truncated=False, tis_cap=0.0), _varied_rewards, ops.Numerics("fp8"), lr=0.0)
    assert "loss/tis_weight_mean" not in m
    assert m["grad_norm"] > 0
