"""GRPO policy loss: group-relative advantages, token-level clipped PPO, truncated importance sampling, decoupled PPO.

Shape legend (suffixes on names): B sequences (B = num_groups * G), G samples per prompt (group size),
T response tokens (right-padded; mask_BT marks real ones).

Three policies can appear in one step:
    rollout / behavior  pi_behav   the inference engine that sampled the tokens (maybe stale weights, other kernels)
    old / proximal      pi_old     the trainer's recompute of the sampled tokens before this update
    current             pi_theta   the trainer now (logp_BT carries the gradient)
PPO clips ratio = pi_theta / pi_old; the gap between pi_old and pi_behav is corrected by a detached importance
weight pi_old / pi_behav, capped (truncated IS, "TIS"; AReaL's decoupled PPO is the same form with pi_old the
proximal policy and pi_behav the stale behavior policy).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from elastic_moe.rl.kl import Agg, KLKind, aggregate, kl_estimate, kl_k3, masked_mean

CapMode = Literal["truncate", "mask"]


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO advantages (R - mean_group) / (std_group + eps), or R - mean_group when scale_by_std is False.

    rewards: [B] (or any shape with B = num_groups * group_size elements), consecutive `group_size` entries
    being the samples of one prompt. std is the unbiased (Bessel-corrected) one, as in TRL and verl.
    Returns float32 advantages of rewards' shape.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r_NG = rewards.float().reshape(-1, group_size)
    adv_NG = r_NG - r_NG.mean(-1, keepdim=True)
    if scale_by_std:
        adv_NG = adv_NG / (r_NG.std(-1, keepdim=True) + eps)
    return adv_NG.reshape(rewards.shape)


def zero_variance_groups(rewards: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """Bool of rewards' shape: True for samples whose whole group has equal rewards (zero advantage: drop them)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r_NG = rewards.float().reshape(-1, group_size)
    same_N = ((r_NG - r_NG[:, :1]).abs() <= atol).all(-1)
    return same_N[:, None].expand_as(r_NG).reshape(rewards.shape)


def importance_weight(
    old_logp: Tensor, rollout_logp: Tensor, cap: float | None = 2.0, mode: CapMode = "truncate"
) -> Tensor:
    """Detached per-token weight pi_old / pi_rollout = exp(old_logp - rollout_logp), of their shape.

    mode "truncate": min(w, cap) (TIS). mode "mask": w where w <= cap, else 0 (AReaL's behavior-weight cap).
    cap None: uncapped.
    """
    # Clamp only guards exp() from inf (inf * 0 = nan downstream); a weight of e^20 is already meaningless.
    w = (old_logp.detach().float() - rollout_logp.detach().float()).clamp(max=20.0).exp()
    if cap is None:
        return w
    if mode == "truncate":
        return w.clamp(max=cap)
    if mode == "mask":
        return torch.where(w <= cap, w, torch.zeros_like(w))
    raise ValueError(f"unknown importance-weight cap mode {mode!r} (known: truncate, mask)")


def grpo_loss(
    logp_BT: Tensor,
    advantages: Tensor,
    mask_BT: Tensor,
    old_logp_BT: Tensor | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    rollout_logp_BT: Tensor | None = None,
    tis_cap: float | None = 2.0,
    tis_mode: CapMode = "truncate",
    ref_logp_BT: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "k3",
    truncated_B: Tensor | None = None,
    sample_mask_B: Tensor | None = None,
    agg: Agg = "token-mean",
    num_tokens: float | None = None,
    entropy_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Token-level clipped PPO loss (DAPO-style asymmetric clip) with optional TIS and reference-KL penalty.

    logp_BT: current log-probs of the sampled tokens (with grad). advantages: [B] per sequence or [B, T] per
    token. mask_BT: real response tokens. old_logp_BT: pi_old log-probs (None: on-policy, logp_BT.detach()).
    Per token, with ratio r = exp(logp - old_logp):
        pg = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) * w
    where w = importance_weight(old_logp, rollout_logp, tis_cap, tis_mode) if rollout_logp_BT is given, else 1.
    With ref_logp_BT, adds kl_coef * kl_estimate(ref_logp, logp, kl_kind), an estimate of KL(pi_theta||pi_ref) on
    the sampled tokens. As a loss its expected gradient depends on the kind: k2's is that of KL(pi_theta||pi_ref),
    k3's that of the forward KL(pi_ref||pi_theta) (as in GRPO and veRL's low_var_kl), and k1's is zero.
    truncated_B (True = hit max tokens without EOS) and sample_mask_B (False = drop, e.g. zero-variance groups)
    zero whole samples. The per-token loss is reduced by `aggregate(agg, num_tokens)`.
    Returns (scalar loss, stats of floats over the kept tokens): pg_loss, clip_frac, clip_frac_low,
    clip_frac_high, ratio_mean, approx_kl (k3 estimate of KL(pi_old||pi_theta)), n_tokens, plus tis_weight_mean
    and tis_clip_frac with rollout log-probs, kl_ref with ref log-probs, entropy with entropy_BT.
    """
    mask = mask_BT.bool()
    if truncated_B is not None:
        mask = mask & ~truncated_B.bool()[:, None]
    if sample_mask_B is not None:
        mask = mask & sample_mask_B.bool()[:, None]
    adv = advantages.float()
    adv_BT = adv[:, None] if adv.dim() == 1 else adv
    old = logp_BT.detach() if old_logp_BT is None else old_logp_BT.detach()

    log_ratio_BT = logp_BT.float() - old.float()
    ratio_BT = log_ratio_BT.exp()
    clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_BT = -torch.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)
    # Tokens where the clipped branch wins: their gradient is zero.
    clip_high_BT = (adv_BT > 0) & (ratio_BT > 1.0 + clip_high)
    clip_low_BT = (adv_BT < 0) & (ratio_BT < 1.0 - clip_low)

    stats: dict[str, Tensor] = {}
    if rollout_logp_BT is not None:
        w_BT = importance_weight(old, rollout_logp_BT, tis_cap, tis_mode)
        pg_BT = pg_BT * w_BT
        stats["tis_weight_mean"] = masked_mean(w_BT, mask)
        raw_BT = (old.float() - rollout_logp_BT.float()).exp()
        capped_BT = torch.zeros_like(mask) if tis_cap is None else raw_BT > tis_cap
        stats["tis_clip_frac"] = masked_mean(capped_BT.float(), mask)
    loss_BT = pg_BT
    if ref_logp_BT is not None:
        kl_BT = kl_estimate(ref_logp_BT.float(), logp_BT.float(), kl_kind)
        stats["kl_ref"] = masked_mean(kl_BT.detach(), mask)
        if kl_coef:
            loss_BT = loss_BT + kl_coef * kl_BT
    loss = aggregate(loss_BT, mask, agg, num_tokens)

    with torch.no_grad():
        stats["pg_loss"] = masked_mean(pg_BT.detach(), mask)
        stats["clip_frac"] = masked_mean((clip_high_BT | clip_low_BT).float(), mask)
        stats["clip_frac_low"] = masked_mean(clip_low_BT.float(), mask)
        stats["clip_frac_high"] = masked_mean(clip_high_BT.float(), mask)
        stats["ratio_mean"] = masked_mean(ratio_BT, mask)
        stats["approx_kl"] = masked_mean(kl_k3(logp_BT.float(), old.float()), mask)
        stats["n_tokens"] = mask.sum().float()
        if entropy_BT is not None:
            stats["entropy"] = masked_mean(entropy_BT.float(), mask)
    return loss, {k: float(v.detach()) for k, v in stats.items()}


def decoupled_ppo_loss(
    logp_BT: Tensor,
    proximal_logp_BT: Tensor,
    behavior_logp_BT: Tensor,
    advantages: Tensor,
    mask_BT: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    behavior_weight_cap: float | None = None,
    cap_mode: CapMode = "mask",
    **kwargs,
) -> tuple[Tensor, dict[str, float]]:
    """Decoupled PPO (AReaL) for asynchronous RL on stale samples.

    Tokens come from the behavior policy (rollout, possibly several versions old); the trust region is
    around the proximal policy (trainer recompute with the weights before this update):
        loss_t = -(pi_prox / pi_behav) * min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A),  r = pi_theta / pi_prox
    The detached weight pi_prox / pi_behav is uncapped by default; behavior_weight_cap with cap_mode "mask"
    zeroes tokens above the cap (AReaL), "truncate" caps them. When behavior == proximal the weight is 1 and
    this is standard PPO. Other keyword arguments and the return value are those of `grpo_loss`
    (the tis_* stats then describe the behavior weight).
    """
    return grpo_loss(
        logp_BT,
        advantages,
        mask_BT,
        proximal_logp_BT,
        clip_low=clip_low,
        clip_high=clip_high,
        rollout_logp_BT=behavior_logp_BT,
        tis_cap=behavior_weight_cap,
        tis_mode=cap_mode,
        **kwargs,
    )
