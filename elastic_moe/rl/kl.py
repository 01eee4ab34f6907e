"""KL divergences for RL and distillation, as functions of tensors.

Shape legend (suffixes on names): B batch, T time (response tokens), N tokens (any flattening of B*T),
V vocabulary, H hidden size, K top-k.

Sampled-token estimators (Schulman, "Approximating KL Divergence"): tokens y ~ q, log-ratio lr = log p(y) - log q(y),

    k1 = -lr                  unbiased for KL(q||p), high variance, can be negative
    k2 = lr**2 / 2            biased (low bias when p ~ q), always >= 0
    k3 = exp(lr) - 1 - lr     unbiased for KL(q||p), always >= 0

Full-vocabulary reverse KL for distillation: KL(s||t) = sum_v p_s(v) (log p_s(v) - log p_t(v)), student s, teacher t.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]
Agg = Literal["token-mean", "seq-mean-token-mean"]


# ---------------------------------------------------------------------------------------------------------------
# Masked reductions


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` is true (mask broadcasts to x). 0 where the mask is empty.

    dim=None reduces everything to a scalar; an int reduces that dimension only.
    """
    m = mask.to(x.dtype)
    xm = torch.where(mask.bool(), x, 0.0)  # not x * m: an inf or NaN off the mask would give NaN
    num = xm.sum() if dim is None else xm.sum(dim)
    den = m.expand_as(x).sum() if dim is None else m.expand_as(x).sum(dim)
    return num / den.clamp(min=1)


def masked_seq_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Mean over sequences of each sequence's token mean. Sequences with no valid token are left out."""
    per_seq_B = masked_mean(x_BT, mask_BT, dim=-1)
    has_tokens_B = mask_BT.expand_as(x_BT).any(-1)
    return masked_mean(per_seq_B, has_tokens_B)


def aggregate(x_BT: Tensor, mask_BT: Tensor, mode: Agg = "token-mean", num_tokens: float | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    "token-mean" (DAPO): sum over valid tokens / number of valid tokens, so long answers weigh more.
    `num_tokens` overrides that denominator, e.g. the global token count of a batch split into micro-batches
    or data-parallel ranks, so that summing the micro-batch losses gives the true token-mean.
    "seq-mean-token-mean" (GRPO paper): mean over sequences of each sequence's token mean.
    """
    if mode == "token-mean":
        if num_tokens is None:
            return masked_mean(x_BT, mask_BT)
        return (x_BT * mask_BT.to(x_BT.dtype)).sum() / max(float(num_tokens), 1.0)
    if mode == "seq-mean-token-mean":
        if num_tokens is not None:
            raise ValueError("num_tokens only applies to mode='token-mean'")
        return masked_seq_mean(x_BT, mask_BT)
    raise ValueError(f"unknown aggregation {mode!r} (known: token-mean, seq-mean-token-mean)")


# ---------------------------------------------------------------------------------------------------------------
# Sampled-token estimators


def kl_k1(logp: Tensor, logq: Tensor) -> Tensor:
    """k1 = log q - log p per sampled token (tokens drawn from q); E_q[k1] = KL(q||p)."""
    return logq - logp


def kl_k2(logp: Tensor, logq: Tensor) -> Tensor:
    """k2 = (log p - log q)^2 / 2 per sampled token (tokens drawn from q); >= 0, low bias for KL(q||p) when p ~ q."""
    return 0.5 * (logp - logq) ** 2


def kl_k3(logp: Tensor, logq: Tensor) -> Tensor:
    """k3 = exp(lr) - 1 - lr with lr = log p - log q (tokens drawn from q); >= 0, E_q[k3] = KL(q||p)."""
    lr = logp - logq
    # expm1 keeps precision when lr ~ 0, where exp(lr) - 1 would cancel.
    return torch.expm1(lr) - lr


def kl_estimate(logp: Tensor, logq: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimate of KL(q||p) from log-probs of tokens sampled from q; kind picks k1, k2 or k3."""
    if kind == "k1":
        return kl_k1(logp, logq)
    if kind == "k2":
        return kl_k2(logp, logq)
    if kind == "k3":
        return kl_k3(logp, logq)
    raise ValueError(f"unknown KL estimator {kind!r} (known: k1, k2, k3)")


def sampled_reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """log pi_s(y) - log pi_t(y) per token y sampled from the student: the k1 estimate of KL(pi_s||pi_t).

    On-policy distillation uses its negative as a per-token reward.
    """
    return student_logp - teacher_logp


# ---------------------------------------------------------------------------------------------------------------
# Exact full-vocabulary reverse KL


def reverse_kl_from_logits(student_logits_NV: Tensor, teacher_logits_NV: Tensor) -> Tensor:
    """KL(softmax(student) || softmax(teacher)) per row, [N, V] x [N, V] -> [N], in float32.

    Materialises [N, V]; autograd flows into both inputs (detach the teacher yourself). Reference for the
    chunked version and fine for small N * V.
    """
    logp_s_NV = torch.log_softmax(student_logits_NV.float(), dim=-1)
    logp_t_NV = torch.log_softmax(teacher_logits_NV.float(), dim=-1)
    return (logp_s_NV.exp() * (logp_s_NV - logp_t_NV)).sum(-1)


def _kl_chunk(h_s_CH: Tensor, W_s_VH: Tensor, h_t_CH: Tensor, W_t_VH: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Student log-probs and probs [C, V], log-ratio log p_s - log p_t [C, V] and KL [C] for a chunk, float32."""
    logp_s_CV = torch.log_softmax((h_s_CH @ W_s_VH.T).float(), dim=-1)
    logp_t_CV = torch.log_softmax((h_t_CH @ W_t_VH.T).float(), dim=-1)
    p_s_CV = logp_s_CV.exp()
    d_CV = logp_s_CV - logp_t_CV
    return logp_s_CV, p_s_CV, d_CV, (p_s_CV * d_CV).sum(-1)


class _ChunkedReverseKL(torch.autograd.Function):
    """Forward and backward both loop over row chunks, recomputing logits, so peak memory is [chunk, V]."""

    @staticmethod
    def forward(ctx, h_s_NH, W_s_VH, h_t_NH, W_t_VH, chunk_size, ids_N):  # type: ignore[override]
        n = h_s_NH.shape[0]
        kl_N = torch.empty(n, dtype=torch.float32, device=h_s_NH.device)
        # The student's log-prob of ids_N (when given) comes from the same chunks: no second [N, V] pass.
        logp_N = torch.zeros(n if ids_N is not None else 0, dtype=torch.float32, device=h_s_NH.device)
        for i in range(0, n, chunk_size):
            j = min(i + chunk_size, n)
            logp_s_CV, _, _, kl_N[i:j] = _kl_chunk(h_s_NH[i:j], W_s_VH, h_t_NH[i:j], W_t_VH)
            if ids_N is not None:
                logp_N[i:j] = logp_s_CV.gather(1, ids_N[i:j, None])[:, 0]
        ctx.save_for_backward(h_s_NH, W_s_VH, h_t_NH, W_t_VH)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(logp_N)
        return kl_N, logp_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_N, _g_logp_N):  # type: ignore[override]
        h_s_NH, W_s_VH, h_t_NH, W_t_VH = ctx.saved_tensors
        want_h, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h_NH = torch.zeros_like(h_s_NH) if want_h else None
        grad_W_VH = torch.zeros(W_s_VH.shape, dtype=torch.float32, device=W_s_VH.device) if want_W else None
        n = h_s_NH.shape[0]
        for i in range(0, n, ctx.chunk_size):
            j = min(i + ctx.chunk_size, n)
            _, p_CV, d_CV, kl_C = _kl_chunk(h_s_NH[i:j], W_s_VH, h_t_NH[i:j], W_t_VH)
            # d KL / d z_v = p_v * (d_v - KL) for student logits z (softmax Jacobian applied to p * d).
            grad_z_CV = g_N[i:j, None].float() * p_CV * (d_CV - kl_C[:, None])
            if want_h:
                grad_h_NH[i:j] = grad_z_CV.to(W_s_VH.dtype) @ W_s_VH
            if want_W:
                grad_W_VH += grad_z_CV.T @ h_s_NH[i:j].float()
        if want_W:
            grad_W_VH = grad_W_VH.to(W_s_VH.dtype)
        return grad_h_NH, grad_W_VH, None, None, None, None


def chunked_reverse_kl(
    student_hidden: Tensor,
    student_head_VH: Tensor,
    teacher_hidden: Tensor,
    teacher_head_VH: Tensor,
    chunk_size: int = 1024,
) -> Tensor:
    """Exact per-token KL(pi_student || pi_teacher) over the full vocabulary, never holding more than [chunk, V].

    student_hidden, teacher_hidden: [..., H_s], [..., H_t] final hidden states (after the final norm), same
    leading shape; *_head_VH: LM head weights [V, H] (logits = hidden @ head.T, same V for both).
    Returns [...] in float32. Gradients flow to the student hidden states and head only; the teacher is a
    constant. Backward recomputes each chunk's logits instead of storing them.
    """
    return chunked_reverse_kl_and_logp(student_hidden, student_head_VH, teacher_hidden, teacher_head_VH, None,
                                       chunk_size)[0]


def chunked_reverse_kl_and_logp(
    student_hidden: Tensor,
    student_head_VH: Tensor,
    teacher_hidden: Tensor,
    teacher_head_VH: Tensor,
    token_ids: Tensor | None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor | None]:
    """chunked_reverse_kl, plus the student's log-prob of token_ids ([...], integer) taken from the same chunks.

    The log-probs carry no gradient (for metrics such as the rollout/trainer mismatch); None when token_ids is.
    """
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"student/teacher token shapes differ: {tuple(lead)} vs {tuple(teacher_hidden.shape[:-1])}")
    if student_head_VH.shape[0] != teacher_head_VH.shape[0]:
        raise ValueError(
            f"student/teacher vocab sizes differ: {student_head_VH.shape[0]} vs {teacher_head_VH.shape[0]}"
        )
    if token_ids is not None and token_ids.shape != lead:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} differs from the tokens' {tuple(lead)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h_s_NH = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t_NH = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    ids_N = None if token_ids is None else token_ids.reshape(-1).long()
    kl_N, logp_N = _ChunkedReverseKL.apply(h_s_NH, student_head_VH, h_t_NH, teacher_head_VH.detach(), chunk_size,
                                           ids_N)
    return kl_N.reshape(lead), (None if ids_N is None else logp_N.reshape(lead))


# ---------------------------------------------------------------------------------------------------------------
# Top-k + tail-bucket reverse KL


def topk_tail_reverse_kl_from_logprobs(
    student_logp_NK: Tensor,
    teacher_logp_NK: Tensor,
    student_tail_logp_N: Tensor | None = None,
    teacher_tail_logp_N: Tensor | None = None,
) -> Tensor:
    """Reverse KL over K+1 buckets: K tokens (student's top-k) plus one bucket lumping the rest of the vocabulary.

    *_logp_NK: log-probs of the same K tokens under each model. *_tail_logp_N: log of the mass outside those
    K tokens; when None it is log(1 - sum exp(logp_NK)) (less precise when the top-k mass is ~1, e.g. when a
    teacher server returns only top-k log-probs). Returns [N] float32; a bound KL_buckets <= KL_full (data
    processing), equal when K = V.
    """
    s_NK, t_NK = student_logp_NK.float(), teacher_logp_NK.float()
    s_tail_N = _log1m_sum_exp(s_NK) if student_tail_logp_N is None else student_tail_logp_N.float()
    t_tail_N = _log1m_sum_exp(t_NK) if teacher_tail_logp_N is None else teacher_tail_logp_N.float()
    head_N = (s_NK.exp() * (s_NK - t_NK)).sum(-1)
    # An empty tail has p_s = 0: its term is 0 whatever the teacher's tail.
    tail_N = torch.where(s_tail_N > _FLOOR / 2, s_tail_N.exp() * (s_tail_N - t_tail_N), torch.zeros_like(s_tail_N))
    return head_N + tail_N


def topk_tail_reverse_kl(student_logits_NV: Tensor, teacher_logits_NV: Tensor, k: int) -> Tensor:
    """Top-k + tail reverse KL from full logits [N, V]: buckets are the student's top-k tokens plus the rest.

    Returns [N] float32; autograd flows into both logits (detach the teacher yourself). Equals the exact
    reverse KL when k = V.
    """
    logp_s_NV = torch.log_softmax(student_logits_NV.float(), dim=-1)
    logp_t_NV = torch.log_softmax(teacher_logits_NV.float(), dim=-1)
    idx_NK = logp_s_NV.detach().topk(k, dim=-1).indices
    in_topk_NV = torch.zeros_like(logp_s_NV, dtype=torch.bool).scatter_(-1, idx_NK, True)
    return topk_tail_reverse_kl_from_logprobs(
        logp_s_NV.gather(-1, idx_NK),
        logp_t_NV.gather(-1, idx_NK),
        _masked_logsumexp(logp_s_NV, in_topk_NV),
        _masked_logsumexp(logp_t_NV, in_topk_NV),
    )


# Log-mass of an empty bucket. Finite (not -inf) so that 0 * (a - b) and its gradient stay finite.
_FLOOR = -1e30


def _masked_logsumexp(logp_NV: Tensor, drop_NV: Tensor) -> Tensor:
    """log sum_v exp(logp) over entries where drop is false; _FLOOR where all are dropped."""
    return torch.logsumexp(logp_NV.masked_fill(drop_NV, _FLOOR), dim=-1).clamp(min=_FLOOR)


def _log1m_sum_exp(logp_NK: Tensor) -> Tensor:
    """log(1 - sum_k exp(logp_k)), floored at _FLOOR when the K entries hold all the mass."""
    rest_N = 1.0 - torch.logsumexp(logp_NK, dim=-1).exp()
    ok_N = rest_N > 0
    # Double where: log() never sees a value <= 0, so the gradient stays finite where the tail is empty.
    return torch.where(ok_N, torch.where(ok_N, rest_N, 1.0).log(), _FLOOR)
