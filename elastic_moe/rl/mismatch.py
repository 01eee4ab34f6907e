"""Training-inference mismatch metrics, logged every RL step.

The rollout engine and the trainer score the same sampled tokens with the same weight version; any gap in
log-probs (kernels, precision, batch-dependent reductions) or in MoE routing is mismatch that makes
"on-policy" RL silently off-policy.

Shape legend (suffixes on names): N tokens (logp tensors may have any shape, the mask matching it),
L MoE layers, k experts per token (routes hold expert indices; unused slots may hold a padding value).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from elastic_moe.rl.kl import kl_k1, kl_k3, masked_mean


def route_set_flips(rollout_routes_LNk: Tensor, trainer_routes_LNk: Tensor) -> Tensor:
    """Bool [L, N]: True where the two selected expert sets differ (order-independent).

    Each entry compares as a set: order is ignored and repeats count once, so a padding value (e.g.
    num_experts for an unused slot) acts as one "no expert" element.
    """
    if rollout_routes_LNk.shape != trainer_routes_LNk.shape:
        raise ValueError(f"route shapes differ: {tuple(rollout_routes_LNk.shape)} vs {tuple(trainer_routes_LNk.shape)}")
    return (_canonical_sets(rollout_routes_LNk) != _canonical_sets(trainer_routes_LNk)).any(-1)


def _canonical_sets(routes_LNk: Tensor) -> Tensor:
    """Sorted entries with repeats replaced by a sentinel, so equal sets give equal rows."""
    s = routes_LNk.long().sort(-1).values
    repeat = torch.zeros_like(s, dtype=torch.bool)
    repeat[..., 1:] = s[..., 1:] == s[..., :-1]
    return s.masked_fill(repeat, torch.iinfo(torch.long).max).sort(-1).values


def mismatch_metrics(
    rollout_logp: Tensor,
    trainer_logp: Tensor,
    mask: Tensor,
    rollout_routes_LNk: Tensor | None = None,
    trainer_routes_LNk: Tensor | None = None,
    route_mask_N: Tensor | None = None,
    tau: float = 2.0,
) -> dict[str, float]:
    """Mismatch between rollout (q) and trainer (p) on the sampled tokens, as a flat dict of floats.

    rollout_logp, trainer_logp, mask: same shape (e.g. [B, T]); the mask marks response tokens.
    Keys, means over masked tokens with dlogp = trainer_logp - rollout_logp:
        k3              K3 estimate of KL(rollout||trainer): exp(dlogp) - 1 - dlogp
        k1              K1 estimate of the same: -dlogp
        abs_dlogp       |dlogp|
        max_abs_dlogp   max |dlogp|
        extreme_frac    fraction with max(p/q, q/p) > tau, i.e. |dlogp| > ln tau (tau = 2: |dlogp| > ln 2)
        n_tokens        number of masked tokens
    With routes [L, N, k] from both sides (route_mask_N marks the tokens to count; None = all N):
        router_flip_rate          fraction of (layer, token) pairs whose expert set differs
        router_flip_rate_layer{i} the same for layer i
        token_any_flip_frac       fraction of tokens with a differing set in at least one layer
    """
    if rollout_logp.shape != trainer_logp.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(rollout_logp.shape)} vs {tuple(trainer_logp.shape)}")
    if tau <= 1.0:
        raise ValueError(f"tau must be > 1, got {tau}")
    m = mask.bool()
    q, p = rollout_logp.detach().float(), trainer_logp.detach().float()
    abs_d = (p - q).abs()
    out = {
        "k3": masked_mean(kl_k3(p, q), m),
        "k1": masked_mean(kl_k1(p, q), m),
        "abs_dlogp": masked_mean(abs_d, m),
        "max_abs_dlogp": abs_d.masked_fill(~m, 0.0).amax() if abs_d.numel() else abs_d.new_zeros(()),
        "extreme_frac": masked_mean((abs_d > math.log(tau)).float(), m),
        "n_tokens": m.sum().float(),
    }
    if (rollout_routes_LNk is None) != (trainer_routes_LNk is None):
        raise ValueError("pass both rollout and trainer routes, or neither")
    if rollout_routes_LNk is not None:
        flips_LN = route_set_flips(rollout_routes_LNk, trainer_routes_LNk).float()
        rm_N = torch.ones(flips_LN.shape[1], dtype=torch.bool, device=flips_LN.device)
        if route_mask_N is not None:
            rm_N = route_mask_N.bool().reshape(-1)
        per_layer_L = masked_mean(flips_LN, rm_N[None, :], dim=-1)
        out["router_flip_rate"] = per_layer_L.mean() if per_layer_L.numel() else per_layer_L.new_zeros(())
        for i, rate in enumerate(per_layer_L):
            out[f"router_flip_rate_layer{i}"] = rate
        out["token_any_flip_frac"] = masked_mean(flips_LN.amax(0) if flips_LN.shape[0] else flips_LN.sum(0), rm_N)
    # One device-to-host copy for all metrics instead of one sync per key.
    values = torch.stack([v.reshape(()) for v in out.values()]).cpu().tolist()
    return dict(zip(out, values))
