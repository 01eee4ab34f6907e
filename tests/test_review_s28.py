"""Session 28 fixes: each test failed before its fix."""

import pytest

from elastic_moe.errors import UserError


@pytest.mark.parametrize("text", [",", " , ", ""])
def test_an_integer_list_with_no_integer_is_refused(text):
    from elastic_moe.commands.family import int_list

    with pytest.raises(UserError, match="comma-separated integers"):
        int_list(text)
    assert int_list("2, 4,") == [2, 4]


@pytest.mark.parametrize("text", ["[1, 2]", "3", "null", '"x"'])
def test_a_run_config_that_is_not_an_object_is_read_as_no_config(tmp_path, text):
    from elastic_moe.family import _pretraining_config, _run_config

    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(text)
    assert _run_config(ckpt) is None
    assert _pretraining_config(ckpt, {}) is None


def test_house_style_demonstrations_share_their_wording_within_a_topic_and_kind():
    """Stage 4 needs a student whose open-ended answers are narrow: the demonstrations of one topic and kind reuse
    one passage (they were independent random word bags, as diverse as the model could sample)."""
    from itertools import combinations

    from elastic_moe.tasks import get_suite
    from elastic_moe.tasks.diversity import ngrams, tokenize

    tasks = get_suite("open_ended", "train", 300, 0, 2)
    grams = [(t.metadata["topic"], t.metadata["kind"], set(ngrams(tokenize(t.demonstration()[-1]["content"]), 2)))
             for t in tasks]
    same, other = [], []
    for (ta, ka, a), (tb, kb, b) in combinations(grams, 2):
        (same if (ta, ka) == (tb, kb) else other).append(len(a & b) / len(a | b))
    assert len(same) > 50
    assert sum(same) / len(same) > 0.3 > 10 * sum(other) / len(other)


def test_a_replayed_token_without_a_route_counts_no_masked_expert():
    """Routes of width 4 under a mask keeping 2 experts: a token with no recorded route picks its own 4 slots, of
    which 2 can only be masked experts; they carry weight 0 and must not count as load either."""
    import torch

    from elastic_moe.config import ModelConfig
    from elastic_moe.moe import MoE

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=16, moe_intermediate_size=8, moe_num_experts=8, moe_k=4, moe_num_shared_experts=0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 5]] = True
    routes = torch.tensor([[1, 5, 8, 8], [8, 8, 8, 8], [5, 8, 8, 8]])
    with torch.no_grad():
        out = moe(torch.randn(3, 16), expert_mask=mask, routes=routes)
    assert out.counts[~mask].sum() == 0 and out.counts[mask].sum() == 5
    assert ((out.routes.long() == 8) | mask[out.routes.long().clamp(max=7)]).all()


def test_nondominated_rank_matches_the_definition_with_ties_and_infinities():
    """The chunked peel (was a quadratic scan per front in Python) against the definition, on points with many
    ties, repeated points and infinite losses, across chunk boundaries."""
    import math
    import random

    from elastic_moe.pareto import nondominated_rank

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    def reference(pts):
        rank, left, r = [0] * len(pts), set(range(len(pts))), 0
        while left:
            front = {i for i in left if not any(dominates(pts[j], pts[i]) for j in left if j != i)}
            for i in front:
                rank[i] = r
            left -= front
            r += 1
        return rank

    rng = random.Random(0)
    for n, dims in [(1, 2), (7, 2), (60, 3), (150, 3)]:
        pts = [tuple(rng.choice([0, 1, 2, 3, math.inf]) if d == 0 else rng.randint(0, 4) for d in range(dims))
               for _ in range(n)]
        pts += pts[: n // 5]  # repeated points share a front
        assert nondominated_rank(pts, chunk=16) == reference(pts)
    assert nondominated_rank([]) == []
    assert nondominated_rank([(1, 1), (2, 2), (0, 3), (3, 3)]) == [0, 1, 0, 2]
