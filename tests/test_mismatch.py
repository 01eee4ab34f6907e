"""Training-inference mismatch metrics in elastic_moe.rl.mismatch on hand-made cases."""

import math

import pytest
import torch

from elastic_moe.rl.mismatch import mismatch_metrics, route_set_flips

E = 8  # experts; E is also the padding value for unused slots


def _routes(seed=0, layers=3, n=4, k=2):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)]) for _ in range(layers)])


def test_identical_inputs_give_zeros():
    logp = -torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 5)
    routes = _routes()
    m = mismatch_metrics(logp, logp.clone(), mask, routes, routes.flip(-1))  # slot order is irrelevant
    expected_keys = {"k3", "k1", "abs_dlogp", "max_abs_dlogp", "extreme_frac", "n_tokens"}
    expected_keys |= {"router_flip_rate", "token_any_flip_frac"} | {f"router_flip_rate_layer{i}" for i in range(3)}
    assert set(m) == expected_keys
    assert all(isinstance(v, float) for v in m.values())
    assert m.pop("n_tokens") == 15
    assert all(v == 0.0 for v in m.values()), m
    assert set(mismatch_metrics(logp, logp, mask)) == {
        "k3",
        "k1",
        "abs_dlogp",
        "max_abs_dlogp",
        "extreme_frac",
        "n_tokens",
    }


def test_logprob_metrics_by_hand():
    rollout = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    d = [math.log(3.0), -0.5, 0.0, 9.0]  # the last token is masked out
    trainer = torch.tensor([d])
    mask = torch.tensor([[1, 1, 1, 0]])
    m = mismatch_metrics(rollout, trainer, mask)
    k3 = [math.exp(x) - 1 - x for x in d[:3]]
    assert m["k3"] == pytest.approx(sum(k3) / 3)
    assert m["k1"] == pytest.approx(-sum(d[:3]) / 3)
    assert m["abs_dlogp"] == pytest.approx((math.log(3.0) + 0.5) / 3)
    assert m["max_abs_dlogp"] == pytest.approx(math.log(3.0))
    assert m["extreme_frac"] == pytest.approx(1 / 3)  # only ln 3 > ln 2
    assert mismatch_metrics(rollout, trainer, mask, tau=1.5)["extreme_frac"] == pytest.approx(2 / 3)
    assert m["n_tokens"] == 3
    with pytest.raises(ValueError):
        mismatch_metrics(rollout, trainer, mask, tau=1.0)


def test_one_flipped_route_gives_exact_rates():
    rollout = _routes(layers=3, n=4, k=2)
    trainer = rollout.flip(-1).clone()
    a, b = rollout[1, 2].tolist()
    trainer[1, 2] = torch.tensor([a, next(e for e in range(E) if e not in (a, b))])
    logp = torch.zeros(4)
    m = mismatch_metrics(logp, logp, torch.ones(4), rollout, trainer)
    assert m["router_flip_rate_layer0"] == 0 and m["router_flip_rate_layer2"] == 0
    assert m["router_flip_rate_layer1"] == pytest.approx(0.25)
    assert m["router_flip_rate"] == pytest.approx(1 / 12)
    assert m["token_any_flip_frac"] == pytest.approx(0.25)
    # Leaving the flipped token out of the route mask leaves no flip.
    masked = mismatch_metrics(logp, logp, torch.ones(4), rollout, trainer, route_mask_N=torch.tensor([1, 1, 0, 1]))
    assert masked["router_flip_rate"] == 0 and masked["token_any_flip_frac"] == 0
    # A second flip in another layer of the same token changes layer rates, not the any-flip fraction.
    trainer[2, 2] = torch.tensor([E, E])
    m2 = mismatch_metrics(logp, logp, torch.ones(4), rollout, trainer)
    assert m2["router_flip_rate"] == pytest.approx(2 / 12)
    assert m2["token_any_flip_frac"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mismatch_metrics(logp, logp, torch.ones(4), rollout, None)


def test_route_sets_with_padding():
    r = torch.tensor([[[3, E], [1, 2], [4, E], [5, 6]]])
    t = torch.tensor([[[E, 3], [2, 1], [4, 7], [6, E]]])
    assert route_set_flips(r, t).tolist() == [[False, False, True, True]]
    # Two unused slots compare as one "no expert" element; the set {3} stays {3}.
    r3 = torch.tensor([[[3, E, E]]])
    t3 = torch.tensor([[[E, 3, E]]])
    assert route_set_flips(r3, t3).tolist() == [[False]]
    with pytest.raises(ValueError):
        route_set_flips(r, t[:, :2])


@pytest.mark.usefixtures("one_thread")
def test_k3_of_the_masked_tokens_ignores_what_lies_off_the_mask():
    # before: masked means multiplied by the mask, so an overflowing K3 (inf) or NaN on a token off the mask (another
    # row's stale sample, padding) made the metric NaN: 0 * inf
    from elastic_moe.rl.mismatch import mismatch_metrics

    q = torch.tensor([[-1.0, -2.0, -150.0], [-1.0, 0.0, 0.0]])
    p = torch.tensor([[-1.1, -2.0, -1.0], [-1.2, float("nan"), float("-inf")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    m = mismatch_metrics(q, p, mask)
    d = torch.tensor([-0.1, 0.0, -0.2])
    assert m["k3"] == pytest.approx(float((torch.expm1(d) - d).mean()), rel=1e-5)
    assert m["k1"] == pytest.approx(0.1, rel=1e-5) and m["n_tokens"] == 3
