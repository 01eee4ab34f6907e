"""KL estimators and distillation KLs in elastic_moe.rl.kl against exact values on tiny vocabularies."""

import math

import pytest
import torch

from elastic_moe.rl.kl import (
    aggregate,
    chunked_reverse_kl,
    chunked_reverse_kl_and_logp,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_seq_mean,
    reverse_kl_from_logits,
    sampled_reverse_kl,
    topk_tail_reverse_kl,
    topk_tail_reverse_kl_from_logprobs,
)


def _exact_kl(logq_V, logp_V):
    return float((logq_V.exp() * (logq_V - logp_V)).sum())


def _two_dists(v=6, spread=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits_q = torch.randn(v, generator=g, dtype=torch.float64)
    logits_p = logits_q + spread * torch.randn(v, generator=g, dtype=torch.float64)
    return torch.log_softmax(logits_q, -1), torch.log_softmax(logits_p, -1)


def _sample(logq_V, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(logq_V.exp(), n, replacement=True, generator=g)


def test_k1_k3_unbiased_k2_low_bias():
    logq, logp = _two_dists()
    exact = _exact_kl(logq, logp)
    y = _sample(logq, 200_000)
    for est, unbiased in ((kl_k1, True), (kl_k3, True), (kl_k2, False)):
        x = est(logp[y], logq[y])
        mean, se = float(x.mean()), float(x.std() / math.sqrt(x.numel()))
        if unbiased:
            assert abs(mean - exact) < 4 * se, (est.__name__, mean, exact, se)
        else:
            assert abs(mean - exact) < 0.1 * exact, (mean, exact)
    # k3's variance is lower than k1's for nearby distributions, the reason to prefer it.
    assert kl_k3(logp[y], logq[y]).std() < kl_k1(logp[y], logq[y]).std()


def test_k3_and_k2_nonnegative_and_dispatch():
    lr = torch.linspace(-30, 30, 10_001, dtype=torch.float64)
    zero = torch.zeros_like(lr)
    assert (kl_k3(lr, zero) >= 0).all()
    assert (kl_k2(lr, zero) >= 0).all()
    assert kl_k3(torch.tensor([1e-9]), torch.tensor([0.0])).item() >= 0
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert torch.equal(kl_estimate(lr, zero, kind), fn(lr, zero))
    with pytest.raises(ValueError):
        kl_estimate(lr, zero, "k4")


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, m).item() == pytest.approx(7 / 3)
    assert masked_mean(x, m, dim=-1).tolist() == pytest.approx([1.5, 4.0, 0.0])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    # Sequence mean leaves out the empty third row: (1.5 + 4) / 2.
    assert masked_seq_mean(x, m).item() == pytest.approx(2.75)
    assert aggregate(x, m, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate(x, m, "token-mean", num_tokens=7).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        aggregate(x, m, "sum")


def _hidden_and_heads(n=37, h_s=16, h_t=12, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h_s, generator=g)
    ws = torch.randn(v, h_s, generator=g) / 3
    ht = torch.randn(n, h_t, generator=g)
    wt = torch.randn(v, h_t, generator=g) / 3
    return hs, ws, ht, wt


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_chunked_reverse_kl_matches_closed_form_and_grad(chunk):
    hs, ws, ht, wt = _hidden_and_heads()
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ht1 = ht.clone().requires_grad_()
    kl = chunked_reverse_kl(hs1, ws1, ht1, wt, chunk_size=chunk)
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = reverse_kl_from_logits(hs2 @ ws2.T, (ht @ wt.T).detach())
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(kl.shape, generator=torch.Generator().manual_seed(3))
    (kl * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-4, atol=1e-6)
    assert ht1.grad is None  # the teacher is a constant


def test_chunked_reverse_kl_leading_shape_and_only_head_grad():
    hs, ws, ht, wt = _hidden_and_heads(n=12)
    ws = ws.requires_grad_()
    kl_BT = chunked_reverse_kl(hs.reshape(3, 4, -1), ws, ht.reshape(3, 4, -1), wt, chunk_size=5)
    assert kl_BT.shape == (3, 4)
    assert (kl_BT >= -1e-6).all()
    kl_BT.sum().backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all()
    same = chunked_reverse_kl(hs, ws.detach(), hs, ws.detach())
    assert same.abs().max() < 1e-6
    with pytest.raises(ValueError):
        chunked_reverse_kl(hs, ws, ht[:5], wt)


def test_chunked_reverse_kl_and_logp_gives_the_students_token_logp_from_the_same_pass():
    hs, ws, ht, wt = _hidden_and_heads(n=12)
    ws = ws.requires_grad_()
    ids = torch.randint(0, ws.shape[0], (3, 4), generator=torch.Generator().manual_seed(1))
    kl_BT, logp_BT = chunked_reverse_kl_and_logp(hs.reshape(3, 4, -1), ws, ht.reshape(3, 4, -1), wt, ids, 5)
    ref = torch.log_softmax(hs @ ws.detach().T, -1).gather(1, ids.reshape(-1, 1)).reshape(3, 4)
    torch.testing.assert_close(logp_BT, ref, rtol=1e-5, atol=1e-6)
    assert not logp_BT.requires_grad
    torch.testing.assert_close(kl_BT, chunked_reverse_kl(hs.reshape(3, 4, -1), ws, ht.reshape(3, 4, -1), wt, 5))
    assert chunked_reverse_kl_and_logp(hs, ws, ht, wt, None)[1] is None
    with pytest.raises(ValueError, match="token_ids shape"):
        chunked_reverse_kl_and_logp(hs, ws, ht, wt, ids)


def test_topk_tail_equals_exact_at_full_k_and_bounds_below():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(20, 10, generator=g).requires_grad_()
    t = torch.randn(20, 10, generator=g)
    exact = reverse_kl_from_logits(s, t)
    full = topk_tail_reverse_kl(s, t, k=10)
    torch.testing.assert_close(full, exact, rtol=1e-5, atol=1e-6)
    full.sum().backward()
    assert torch.isfinite(s.grad).all()
    for k in (1, 3, 9):
        part = topk_tail_reverse_kl(s, t, k=k)
        assert (part <= exact + 1e-5).all()  # merging outcomes never increases KL
        assert (part >= -1e-6).all()
    # From log-probs with the tail computed as 1 - sum: close to the exact-tail version.
    ls, lt = torch.log_softmax(s.detach(), -1), torch.log_softmax(t, -1)
    idx = ls.topk(4, -1).indices
    torch.testing.assert_close(
        topk_tail_reverse_kl_from_logprobs(ls.gather(-1, idx), lt.gather(-1, idx)),
        topk_tail_reverse_kl(s.detach(), t, k=4),
        rtol=1e-4,
        atol=1e-5,
    )


def test_topk_tail_from_logprobs_empty_tail_has_finite_grad():
    # A peaked student whose top-1 holds all the float32 mass: empty tail, no NaN in value or gradient.
    s = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, 2.0]]).requires_grad_()
    t = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    idx = ls.detach().topk(1, -1).indices
    kl = topk_tail_reverse_kl_from_logprobs(ls.gather(-1, idx), lt.gather(-1, idx))
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all()
    assert kl[0].item() == pytest.approx(-lt[0, 0].item(), rel=1e-5)


def test_sampled_reverse_kl_converges():
    logs, logt = _two_dists(v=8, spread=0.8, seed=5)
    exact = float(reverse_kl_from_logits(logs[None], logt[None]))
    assert exact == pytest.approx(_exact_kl(logs, logt), rel=1e-5)
    y = _sample(logs, 200_000, seed=7)
    x = sampled_reverse_kl(logs[y], logt[y])
    se = float(x.std() / math.sqrt(x.numel()))
    assert abs(float(x.mean()) - exact) < 4 * se
