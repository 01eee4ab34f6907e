"""GRPO advantages and PPO-family losses in elastic_moe.rl.grpo, checked by hand on small examples."""

import math

import pytest
import torch

from elastic_moe.rl.grpo import (
    decoupled_ppo_loss,
    group_advantages,
    grpo_loss,
    importance_weight,
    zero_variance_groups,
)
from elastic_moe.rl.kl import kl_k3


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    adv = group_advantages(r, 4, eps=0.0 + 1e-12)
    # Group 1: mean 0.25, unbiased std 0.5. Group 2: mean 0.5, std sqrt(1/3). Group 3: zero variance -> 0.
    s = math.sqrt(1 / 3)
    expected = [1.5, -0.5, -0.5, -0.5, 0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    no_std = group_advantages(r, 4, scale_by_std=False)
    assert no_std.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0])
    assert group_advantages(r.reshape(3, 4), 4).shape == (3, 4)
    with pytest.raises(ValueError):
        group_advantages(r, 5)
    with pytest.raises(ValueError):
        group_advantages(r, 1)


def test_zero_variance_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert zero_variance_groups(r, 3).tolist() == [True, True, True, False, False, False, True, True, True]


def _logp_leaf(values):
    return torch.tensor(values, dtype=torch.float32).log().requires_grad_()


def test_ppo_clipping_both_sides():
    # old_logp = 0, so ratio = exp(logp) = the values below.
    ratios = [[1.5, 1.1, 0.5], [0.5, 0.9, 1.5]]
    logp = _logp_leaf(ratios)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, stats = grpo_loss(logp, adv, mask, old, clip_low=0.2, clip_high=0.28)
    # Row 0 (A=+1): 1.5 clipped to 1.28; 1.1 and 0.5 unclipped. Row 1 (A=-1): 0.5 clipped to 0.8; others not.
    per_token = [-1.28, -1.1, -0.5, 0.8, 0.9, 1.5]
    assert loss.item() == pytest.approx(sum(per_token) / 6, rel=1e-6)
    loss.backward()
    # d/dlogp of -r*A/6 is -A*r/6; zero where the clipped branch wins.
    expected_grad = [[0.0, -1.1 / 6, -0.5 / 6], [0.0, 0.9 / 6, 1.5 / 6]]
    torch.testing.assert_close(logp.grad, torch.tensor(expected_grad), rtol=1e-5, atol=1e-7)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["clip_frac_high"] == pytest.approx(1 / 6)
    assert stats["clip_frac_low"] == pytest.approx(1 / 6)
    assert stats["ratio_mean"] == pytest.approx(sum(sum(r) for r in ratios) / 6, rel=1e-6)
    assert stats["n_tokens"] == 6


def test_on_policy_default_and_stats():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    entropy = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    loss, stats = grpo_loss(logp, adv, mask, entropy_BT=entropy)
    assert loss.item() == pytest.approx((-2 - 2 + 1) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 3, -2 / 3], [1 / 3, 0.0]]))
    assert stats["approx_kl"] == 0 and stats["clip_frac"] == 0 and stats["ratio_mean"] == 1
    assert stats["entropy"] == pytest.approx(2.0)


def test_truncated_importance_weight():
    old = torch.tensor([[math.log(3.0), math.log(0.5), 0.0]])
    rollout = torch.zeros(1, 3)
    assert importance_weight(old, rollout, 2.0)[0].tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert importance_weight(old, rollout, 2.0, "mask")[0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert importance_weight(old, rollout, None)[0].tolist() == pytest.approx([3.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        importance_weight(old, rollout, 2.0, "clip")

    old_p = old.clone().requires_grad_()
    logp = old.clone().requires_grad_()  # ratio 1: unclipped, gradient -A * w / n
    loss, stats = grpo_loss(logp, torch.tensor([1.0]), torch.ones(1, 3), old_p, rollout_logp_BT=rollout, tis_cap=2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -0.5, -1.0]]) / 3)
    assert old_p.grad is None  # the weight and old log-probs are detached
    assert stats["tis_weight_mean"] == pytest.approx(3.5 / 3)
    assert stats["tis_clip_frac"] == pytest.approx(1 / 3)


def test_kl_penalty_against_reference():
    logp = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -0.3]])
    adv = torch.tensor([0.0])  # isolate the penalty
    mask = torch.ones(1, 3)
    for kind in ("k1", "k2", "k3"):
        loss, stats = grpo_loss(logp, adv, mask, ref_logp_BT=ref, kl_coef=0.1, kl_kind=kind)
        assert stats["kl_ref"] > 0 or kind == "k1"
        assert loss.item() == pytest.approx(0.1 * stats["kl_ref"], rel=1e-6)
    loss, stats = grpo_loss(logp, adv, mask, ref_logp_BT=ref, kl_coef=0.1, kl_kind="k3")
    assert stats["kl_ref"] == pytest.approx(kl_k3(ref, logp.detach()).mean().item())
    logp.grad = None
    loss.backward()
    # d/dlogp of k3(ref, logp) = 1 - exp(ref - logp); zero where logp == ref.
    torch.testing.assert_close(logp.grad, 0.1 * (1 - (ref - logp.detach()).exp()) / 3)
    assert logp.grad[0, 2] == 0
    # kl_coef 0 reports the KL without adding it.
    loss0, stats0 = grpo_loss(logp, adv, mask, ref_logp_BT=ref)
    assert loss0.item() == 0 and stats0["kl_ref"] > 0


def _batch(seed=0, b=4, t=5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logp = (old + 0.3 * torch.randn(b, t, generator=g)).requires_grad_()
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return logp, old, adv, mask


def test_dropped_samples_get_zero_weight():
    logp, old, adv, mask = _batch()
    truncated = torch.tensor([False, True, False, False])
    loss, stats = grpo_loss(logp, adv, mask, old, truncated_B=truncated)
    loss.backward()
    assert (logp.grad[1] == 0).all()
    keep = [0, 2, 3]
    logp2 = logp.detach()[keep].clone().requires_grad_()
    loss2, _ = grpo_loss(logp2, adv[keep], mask[keep], old[keep])
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-6)
    assert stats["n_tokens"] == mask[keep].sum().item()
    # Same through sample_mask_B (e.g. ~zero_variance_groups), combined with truncation.
    loss3, _ = grpo_loss(logp, adv, mask, old, truncated_B=truncated, sample_mask_B=torch.tensor([1, 1, 1, 0]))
    loss4, _ = grpo_loss(logp2[:2], adv[[0, 2]], mask[[0, 2]], old[[0, 2]])
    assert loss3.item() == pytest.approx(loss4.item(), rel=1e-6)


def test_aggregation_modes():
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    tok, _ = grpo_loss(logp, adv, mask, agg="token-mean")
    seq, _ = grpo_loss(logp, adv, mask, agg="seq-mean-token-mean")
    assert tok.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)
    assert seq.item() == pytest.approx(-(2 + 4) / 2)
    glob, _ = grpo_loss(logp, adv, mask, num_tokens=8)
    assert glob.item() == pytest.approx(-10 / 8)


def test_decoupled_reduces_to_ppo_when_behavior_is_proximal():
    logp, prox, adv, mask = _batch(seed=1)
    loss_d, stats_d = decoupled_ppo_loss(logp, prox, prox, adv, mask, behavior_weight_cap=5.0)
    grad_d = torch.autograd.grad(loss_d, logp)[0]
    loss_p, stats_p = grpo_loss(logp, adv, mask, prox)
    grad_p = torch.autograd.grad(loss_p, logp)[0]
    assert loss_d.item() == pytest.approx(loss_p.item(), rel=1e-6)
    torch.testing.assert_close(grad_d, grad_p)
    assert stats_d["tis_weight_mean"] == pytest.approx(1.0)
    for k in stats_p:
        assert stats_d[k] == pytest.approx(stats_p[k], rel=1e-6)


def test_decoupled_weights_by_proximal_over_behavior():
    logp, prox, adv, mask = _batch(seed=2)
    g = torch.Generator().manual_seed(9)
    behav = prox + 0.5 * torch.randn(prox.shape, generator=g)
    loss, _ = decoupled_ppo_loss(logp, prox, behav, adv, mask, clip_low=0.2, clip_high=0.28)
    r = (logp - prox).exp()
    a = adv[:, None]
    obj = torch.minimum(r * a, r.clamp(0.8, 1.28) * a) * (prox - behav).exp()
    expected = -(obj * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The AReaL cap masks tokens whose weight exceeds it.
    capped, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, behavior_weight_cap=1.2)
    w = (prox - behav).exp()
    w = torch.where(w <= 1.2, w, 0.0)
    obj_c = torch.minimum(r * a, r.clamp(0.8, 1.28) * a) * w
    assert capped.item() == pytest.approx((-(obj_c * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert 0 < stats["tis_clip_frac"] < 1
