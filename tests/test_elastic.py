"""Elastic sampling: sub-model ranges and their errors, per-sample and sandwich schemes, random and importance
policies for layers and experts, rank slices of a batch, and the balancing bias's targets."""


import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_model

from elastic_moe.config import ModelConfig
from elastic_moe.elastic import (
    FULL,
    DimRange,
    ElasticConfig,
    ElasticSampler,
    Importance,
    default_eval_specs,
    spec_name,
)
from elastic_moe.errors import UserError
from elastic_moe.model import ElasticMoE
from elastic_moe.spec import SubModelSpec
from elastic_moe.tomlconfig import from_dict


def cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, moe_num_experts=8, moe_k=2, moe_intermediate_size=16, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def elastic(**kw) -> ElasticConfig:
    return from_dict(ElasticConfig, kw)


def test_default_ranges():
    r = ElasticConfig().ranges(cfg())
    assert (r.depth, r.width, r.top_k) == ((2, 3), (4, 7), (1, 1))
    assert ElasticConfig(depth=DimRange(p_full=1.0)).ranges(cfg()).depth is None


@pytest.mark.parametrize("kw, words", [
    ({"width": {"min": 1}}, "width.min = 1 experts is fewer than the largest top-k 2"),
    ({"depth": {"max": 9}}, "depth range [2, 9] is impossible"),
    ({"top_k": {"min": 0}}, "top_k range [0, 1] is impossible"),
    ({"width": {"min": 5, "max": 4}}, "width range [5, 4] is impossible"),
])
def test_impossible_ranges(kw, words):
    with pytest.raises(UserError) as e:
        elastic(**kw).ranges(cfg())
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [{"scheme": "nope"}, {"p_full": 1.5}, {"layer_policy": "x"},
                                {"distill_weight": -0.5}, {"depth": {"p_full": -0.1}},
                                {"full_steps": 5, "scheme": "sandwich"}, {"full_steps": -1}])
def test_bad_settings(kw):
    with pytest.raises(UserError):
        elastic(**kw)


def test_rank_slices_equal_the_global_batch():
    s = ElasticSampler(ElasticConfig(), cfg(), seed=7)
    for step in range(3):
        whole = s.step_specs(step, 0, 8)
        halves = s.step_specs(step, 0, 4, rank=0, world_size=2) + s.step_specs(step, 0, 4, rank=1, world_size=2)
        assert whole == halves
    assert s.step_specs(0, 0, 8) != s.step_specs(1, 0, 8)  # a fresh draw every step
    assert s.step_specs(0, 0, 8) != s.step_specs(0, 1, 8)  # and every micro-step


def test_probabilities_and_ranges():
    s = ElasticSampler(elastic(expert_policy="importance", layer_policy="keep_last"), cfg(), seed=0)
    specs = [sp for step in range(100) for sp in s.step_specs(step, 0, 20)]
    full_depth = np.mean([sp.layers is None for sp in specs])
    assert abs(full_depth - 0.8) < 0.05
    assert abs(np.mean([sp == FULL for sp in specs]) - 0.8 ** 3) < 0.05
    assert {sp.layers for sp in specs} == {None, 2, 3}
    assert {sp.experts for sp in specs} == {None, 4, 5, 6, 7}
    assert {sp.top_k for sp in specs} == {None, 1}


def test_global_p_full_and_baseline():
    s = ElasticSampler(elastic(p_full=0.75, depth={"p_full": 0.0}, width={"p_full": 0.0}, top_k={"p_full": 0.0}),
                       cfg(), seed=0)
    specs = [sp for step in range(50) for sp in s.step_specs(step, 0, 20)]
    assert abs(np.mean([sp == FULL for sp in specs]) - 0.75) < 0.05
    base = ElasticSampler(elastic(depth={"p_full": 1.0}, width={"p_full": 1.0}, top_k={"p_full": 1.0}), cfg(), seed=0)
    assert not base.ranges.elastic
    assert base.step_specs(0, 0, 5) == [FULL] * 5


def test_full_steps_train_only_the_full_model_first():
    kw = dict(depth={"p_full": 0.0}, width={"p_full": 0.0}, top_k={"p_full": 0.0})
    warm, plain = (ElasticSampler(elastic(full_steps=n, **kw), cfg(), seed=0) for n in (3, 0))
    assert all(warm.step_specs(step, 0, 8) == [FULL] * 8 for step in range(3))
    assert all(warm.step_specs(step, 0, 8) == plain.step_specs(step, 0, 8) for step in range(3, 6))
    assert FULL not in warm.step_specs(3, 0, 8)


def test_random_policy_gives_explicit_subsets():
    s = ElasticSampler(elastic(depth={"p_full": 0.0}, width={"p_full": 0.0}), cfg(), seed=1)
    specs = s.step_specs(0, 0, 32)
    assert all(isinstance(sp.layers, tuple) and 2 <= len(sp.layers) <= 3 for sp in specs)
    assert all(len(sp.experts) == 3 and all(4 <= len(e) <= 7 for e in sp.experts) for sp in specs)
    assert len({sp.layers for sp in specs}) > 1


def test_sandwich_groups():
    s = ElasticSampler(elastic(scheme="sandwich", sandwich_random=2, expert_policy="importance",
                               layer_policy="keep_last"), cfg(), seed=0)
    specs = s.step_specs(3, 0, 4)
    assert s.groups == 4 and len(specs) == 16
    assert specs[:4] == [FULL] * 4
    assert specs[4:8] == [SubModelSpec(2, 4, 1)] * 4
    assert all(sp == specs[8] for sp in specs[8:12])


def test_importance_orders_nest_experts():
    torch.manual_seed(0)
    model = ElasticMoE(cfg())
    imp = Importance(model, elastic(expert_policy="importance", importance_decay=0.5))
    model.train()
    model(torch.randint(3, 64, (2, 16)))  # hooks accumulate routing mass
    assert all(float(imp.mass[i].sum()) == pytest.approx(32.0) for i in model.moe_layers)
    for i in model.moe_layers:
        imp.mass[i].copy_(torch.arange(8, dtype=torch.float64))  # expert 7 gets the most mass
    imp.reorder()
    for i in model.moe_layers:
        assert model.moe(i).expert_order.tolist() == list(range(7, -1, -1))
        assert float(imp.mass[i].sum()) == 0
    assert model.resolve(SubModelSpec(experts=3)).experts[1] == (5, 6, 7)
    state = imp.state_dict()
    imp2 = Importance(model, elastic(expert_policy="importance"))
    imp2.load_state_dict(state)
    assert torch.equal(imp2.score[1], imp.score[1])
    imp.remove_hooks()
    imp2.remove_hooks()


def test_routing_mass_of_narrow_rows_reaches_the_experts_they_drop():
    """The mass counts the router's preference over all experts: a narrow row's own mask would never credit the
    experts outside the current head of the order, which would then stay there."""
    torch.manual_seed(0)
    model = ElasticMoE(cfg()).train()
    imp = Importance(model, elastic(expert_policy="importance"))
    model(torch.randint(3, 64, (2, 16)), spec=SubModelSpec(experts=3))  # keeps experts 0, 1, 2 of the order
    for i in model.moe_layers:
        assert float(imp.mass[i].sum()) == pytest.approx(32.0)
        assert float(imp.mass[i][3:].sum()) > 1.0
    imp.remove_hooks()


def test_layer_policies():
    model = ElasticMoE(cfg())
    Importance(model, elastic(layer_policy="keep_last"))
    assert model.resolve(SubModelSpec(layers=2)).layers == (2, 3)
    imp = Importance(model, elastic(layer_policy="importance"))
    imp.reorder(forward_full=lambda x: model(x), batch=torch.randint(3, 64, (2, 16)))
    assert sorted(model.layer_order.tolist()) == [0, 1, 2, 3]
    assert model.training  # measured in eval mode, restored


def test_per_row_forward_with_sampled_specs():
    torch.manual_seed(0)
    model = ElasticMoE(cfg()).train()
    s = ElasticSampler(elastic(depth={"p_full": 0.3}, width={"p_full": 0.3}, top_k={"p_full": 0.3}), cfg(), seed=0)
    specs = s.step_specs(0, 0, 6)
    x = torch.randint(3, 64, (6, 8))
    out = model(x, s.resolve(model, specs))
    out.logits.sum().backward()
    for r in range(6):  # row r alone through its own sub-model gives the same logits
        with torch.no_grad():
            solo = model(x[r:r + 1], specs[r]).logits
        torch.testing.assert_close(out.logits[r:r + 1].detach(), solo, rtol=1e-4, atol=1e-5)


def test_names_and_default_eval_list():
    assert spec_name(FULL) == "full"
    assert spec_name(SubModelSpec(2, 4, 1)) == "L2-E4-k1"
    assert spec_name(SubModelSpec((0, 3), ((1, 2), (3, 4), (5, 6)))) == "L0.3-E2/2/2"
    s = ElasticSampler(ElasticConfig(), cfg(), seed=0)
    assert [spec_name(x) for x in default_eval_specs(s)] == ["full", "L2", "E4", "k1", "L2-E4-k1"]


def test_report_rows_of_a_per_layer_top_k_sub_model():
    """The pre-training report's sub-model table: a per-layer top-k is shown per layer and counted per layer."""
    from helpers import tiny_config

    from elastic_moe.spec import param_counts
    from elastic_moe.train import submodel_rows

    model = ElasticMoE(tiny_config())
    per_layer, flat = SubModelSpec(top_k=(2, 1, 1)), SubModelSpec(top_k=1)
    rows = submodel_rows(model, [SubModelSpec(), per_layer, flat], seq_len=16, losses={})
    assert [r["top_k"] for r in rows] == [2, "2.1.1", 1]
    assert rows[1]["active_params"] == param_counts(model.cfg, model.resolve(per_layer))[1]
    assert rows[2]["active_params"] < rows[1]["active_params"] < rows[0]["active_params"]


def test_router_balancing_targets_each_experts_fair_share_of_the_tokens_that_can_reach_it():
    """Rows of a narrower sub-model count towards the experts it keeps, and only theirs: aux-loss-free balancing
    neither raises the bias of the experts it masks out nor lowers that of the ones it keeps for that reason."""
    model = tiny_model().train()
    x = torch.randint(0, 101, (2, 16))
    half = model.resolve(SubModelSpec(experts=4))
    model(x, [SubModelSpec(), SubModelSpec(experts=4)])  # one full row, one row keeping 4 of 8 experts (k = 2)
    for i in model.moe_layers:
        moe = model.moe(i)
        kept = torch.zeros(8, dtype=torch.bool)
        kept[list(half.experts[i])] = True
        want = torch.full((8,), 16 * 2 / 8) + kept * (16 * 2 / 4)
        torch.testing.assert_close(moe.fair_load, want)
        assert float(moe.load.sum()) == float(moe.fair_load.sum()) == 2 * 16 * 2
    for i in model.moe_layers:
        model.moe(i).reset_load()
        model.moe(i).bias.zero_()
    model(x, SubModelSpec(experts=4))
    model.update_router_bias(0.01)
    for i in model.moe_layers:
        masked = [e for e in range(8) if e not in half.experts[i]]
        assert model.moe(i).bias[masked].abs().sum() == 0  # before: all raised (0 routed pairs < the mean)
        assert model.moe(i).fair_load.sum() == 0 and model.moe(i).load.sum() == 0
    model(x)  # no expert masked: the fair share is the mean load, the rule DeepSeek-V3 states
    for i in model.moe_layers:
        torch.testing.assert_close(model.moe(i).fair_load, model.moe(i).load.mean().expand(8))


def test_layer_importance_ranks_a_block_that_changes_nothing_last():
    """Block influence is 1 - cos(h_in, h_out): a block that leaves the residual stream as it was ranks last, and
    `layers=n` drops it (were it cos, `layers=n` would keep the least important layers)."""
    model = tiny_model()
    with torch.no_grad():  # layer 2 writes nothing into the residual stream: h_out == h_in, influence 0
        model.blocks[2].attn.o.weight.zero_()
        model.moe(2).w_down.zero_()
        model.moe(2).shared.down.weight.zero_()
    imp = Importance(model, from_dict(ElasticConfig, {"layer_policy": "importance"}))
    x = torch.randint(3, 101, (2, 16), generator=torch.Generator().manual_seed(2))
    bi = imp.block_influence(lambda t: model(t), x)
    assert bi[2].abs() < 1e-5 and (bi[[0, 1, 3]] > 1e-3).all()
    imp.reorder(forward_full=lambda t: model(t), batch=x)
    assert model.layer_order.tolist()[-1] == 2
    assert 2 not in model.resolve(SubModelSpec(layers=3)).layers


def test_expert_importance_score_is_decayed_score_plus_new_mass():
    """score = decay * score + mass, as documented: the new mass is not decayed."""
    model = ElasticMoE(tiny_config())
    imp = Importance(model, from_dict(ElasticConfig, {"expert_policy": "importance", "importance_decay": 0.5}))
    try:
        for i in model.moe_layers:
            imp.mass[i].copy_(torch.arange(8, dtype=torch.float64))
        imp.reorder()
        for i in model.moe_layers:
            torch.testing.assert_close(imp.score[i], torch.arange(8, dtype=torch.float64))
            imp.mass[i].copy_(torch.full((8,), 3.0, dtype=torch.float64))
        imp.reorder()
        for i in model.moe_layers:
            torch.testing.assert_close(imp.score[i], 0.5 * torch.arange(8, dtype=torch.float64) + 3.0)
    finally:
        imp.remove_hooks()


def test_evaluation_forwards_add_no_routing_mass():
    """The routing-mass hook counts training forwards only: evaluation forwards of sub-models (and the layer
    influence measurement) must not bias the expert importance order."""
    model = tiny_model()
    imp = Importance(model, from_dict(ElasticConfig, {"expert_policy": "importance"}))
    x = torch.randint(3, 101, (2, 8), generator=torch.Generator().manual_seed(3))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
        assert all(float(imp.mass[i].sum()) == 0 for i in model.moe_layers)
        model.train()
        with torch.no_grad():
            model(x)
        assert all(abs(float(imp.mass[i].sum()) - 16.0) < 1e-6 for i in model.moe_layers)
    finally:
        imp.remove_hooks()


def test_random_layer_and_expert_policies_keep_and_drop_every_layer_and_expert():
    """The random policies draw from every layer and every expert: each is kept by some sampled sub-models and
    dropped by others (drawing from L - 1 layers would never train the last layer in a narrower sub-model)."""
    cfg = tiny_config()
    ecfg = from_dict(ElasticConfig, {"depth": {"p_full": 0.0}, "width": {"p_full": 0.0}})
    specs = ElasticSampler(ecfg, cfg, seed=1).step_specs(0, 0, 64)
    L, E = cfg.num_hidden_layers, cfg.moe_num_experts
    for i in range(L):
        assert any(i in s.layers for s in specs) and any(i not in s.layers for s in specs), i
    for j in range(len(cfg.moe_layers)):
        for e in range(E):
            assert any(e in s.experts[j] for s in specs) and any(e not in s.experts[j] for s in specs), (j, e)


def test_importance_mass_saved_by_some_ranks_sums_to_the_same_total_on_another_number():
    """Resumed on another number of ranks, only rank 0 takes the saved ranks' summed mass (the next reorder
    all-reduces it); giving every rank the sum would multiply the mass by the new world size."""
    model = ElasticMoE(tiny_config())
    ecfg = from_dict(ElasticConfig, {"expert_policy": "importance"})
    saved = Importance(model, ecfg)
    state = saved.state_dict()
    saved.remove_hooks()
    by_rank = [{str(i): torch.arange(8, dtype=torch.float64) * (r + 1) for i in model.moe_layers} for r in range(2)]
    state["mass_by_rank"] = by_rank
    total = {i: sum(m[str(i)] for m in by_rank) for i in model.moe_layers}
    for world in (2, 3):
        got = {i: torch.zeros(8, dtype=torch.float64) for i in model.moe_layers}
        for rank in range(world):
            imp = Importance(model, ecfg)
            imp.load_state_dict(state, rank=rank, world_size=world)
            for i in model.moe_layers:
                got[i] += imp.mass[i]
            imp.remove_hooks()
        for i in model.moe_layers:
            torch.testing.assert_close(got[i], total[i])
