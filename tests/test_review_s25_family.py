"""Review of the sub-model family: spec edge cases, parameter counts, frontiers, medians, search and the cache."""

import pytest
import torch
from helpers import FAST, tiny_model

from elastic_moe import family, measure
from elastic_moe.errors import UserError
from elastic_moe.family import FamilyInputs, Space, run_family
from elastic_moe.hf import extract
from elastic_moe.measure import MeasureConfig, quantile
from elastic_moe.pareto import pareto_front
from elastic_moe.spec import SubModelSpec, param_counts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kw", [
    dict(layers="3"), dict(layers=3.0), dict(layers=True), dict(layers=(1.0, 2)), dict(layers=({"a": 1},)),
    dict(experts=1.0), dict(experts=(1, 2, 3)), dict(experts=((0, "a"), (1,), (2,))), dict(experts=False),
    dict(top_k=1.5), dict(top_k=(1.0, 2, 2)), dict(top_k="2"), dict(top_k=(True, 2, 2)),
])
def test_specs_of_wrong_types_are_a_one_line_user_error(kw):
    model = tiny_model()
    with pytest.raises(UserError) as e:
        model.resolve(SubModelSpec(**kw))
    assert "\n" not in str(e.value) and "sub-model spec" in str(e.value)


@pytest.mark.parametrize("d", [{"layers": "3"}, {"layers": 2.5}, {"top_k": [1.5, 2, 2]}, {"layer": 2}, [2],
                               {"experts": [[0, 1], [2], "ab"]}])
def test_spec_dicts_from_json_with_wrong_types_or_keys_are_refused(d):
    model = tiny_model()
    with pytest.raises(UserError):
        model.resolve(SubModelSpec.from_dict(d))
    ok = SubModelSpec.from_dict({"layers": [1, 3], "experts": None, "top_k": [1, 2, 2]})
    assert model.resolve(ok).top_k == {1: 1, 3: 2}


def test_param_counts_equal_a_direct_count_of_the_standalone_model_with_biases():
    for kw in (dict(use_bias=True), dict(use_bias=True, tie_word_embeddings=False), {}):
        model = tiny_model(**kw)
        for spec in (None, SubModelSpec(layers=2, experts=4, top_k=1), SubModelSpec(layers=(0,))):
            rs = model.resolve(spec)
            sub = extract(model, rs)
            # the selection bias is a buffer here and a parameter in transformers' model: counted
            direct = sub.num_params() + sum(sub.moe(i).bias.numel() for i in sub.moe_layers)
            assert param_counts(model.cfg, rs)[0] == direct, (kw, spec)


def test_quantile_median_of_an_even_count_is_the_middle():
    assert quantile([1.0, 2.0], 0.5) == 1.5  # was the smaller one: with --repeats 2 the "median" was the min
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0], 0.0) == 1.0 and quantile([1.0, 2.0, 3.0], 1.0) == 3.0


def test_pareto_front_skips_rows_without_a_finite_accuracy_and_keeps_exact_ties():
    rows = [{"c": 1.0, "loss": 3.0, "accuracy": float("nan")}, {"c": 2.0, "loss": 2.0, "accuracy": 0.5},
            {"c": 2.0, "loss": 2.0, "accuracy": 0.5}, {"c": 3.0, "loss": 1.0}, {"c": 4.0, "loss": 1.0, "accuracy": 0.6}]
    assert pareto_front(rows, "c", "accuracy") == [1, 2, 4]
    # two sub-models of the same cost and the same loss: neither dominates the other
    assert pareto_front(rows, "c") == [0, 1, 2, 3]


def _inputs(model, n_batches=2):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(3, model.cfg.vocab_size, (2, 8), generator=g),
                torch.randint(3, model.cfg.vocab_size, (2, 8), generator=g)) for _ in range(n_batches)]
    return FamilyInputs(model, "weights-sha", batches, "data")


def test_cached_losses_are_keyed_by_the_inference_code(tmp_path, monkeypatch):
    model = tiny_model()
    inp = _inputs(model)
    space, mc = Space(layers=[1], experts=[8], top_k=[2]), MeasureConfig(**dict(FAST, eval_batches=1))
    monkeypatch.setattr(family, "plot_family", lambda *a: [])
    monkeypatch.setattr(measure, "inference_code_version", lambda: "a")
    run_family(inp, tmp_path, space, mc, progress=False, log=lambda _: None)
    again = run_family(inp, tmp_path, space, mc, progress=False, log=lambda _: None)
    assert again.meta["cache"] == {"hits": 2, "new": 0}
    # a fixed forward changes the loss as much as the latency: nothing measured with the old code is reused
    monkeypatch.setattr(measure, "inference_code_version", lambda: "b")
    fixed = run_family(inp, tmp_path, space, mc, progress=False, log=lambda _: None)
    assert fixed.meta["cache"] == {"hits": 0, "new": 2}


def test_halving_ranks_sub_models_with_a_non_finite_loss_last(monkeypatch):
    model = tiny_model()
    cands = family.enumerate_space(model, Space(layers=[1, 2, 3, 4], experts=[8], top_k=[2]))
    smallest = min(cands, key=lambda c: param_counts(model.cfg, c.rs)[0])
    losses = {c.key: (float("nan") if c is smallest else 3.0 - 0.1 * len(c.rs.layers)) for c in cands}
    kept = family.survivors(model.cfg, cands, losses, 2)
    assert smallest not in kept and len(kept) == 2
    assert [len(c.rs.layers) for c in kept] == [3, 4]


def test_per_layer_top_k_over_many_moe_layers_is_refused_not_enumerated():
    # 13 MoE layers and top-k 1, 2: 8192 mixes (27 layers, as ERNIE-4.5-21B has: 134 million, which hung)
    model = tiny_model(num_hidden_layers=13, moe_layer_start_index=0)
    with pytest.raises(UserError, match="top-k mixes"):
        family.enumerate_space(model, Space(layers=[13], experts=[8], top_k=[1, 2], per_layer_top_k=True))
    assert len(family.enumerate_space(model, Space(layers=[13], experts=[8], top_k=[1, 2]))) == 2
