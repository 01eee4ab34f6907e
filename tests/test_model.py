"""Elastic forward invariants: spec validation, per-sequence sub-models, router replay, load balancing."""


import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from elastic_moe import ops
from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.hf import export_hf
from elastic_moe.model import lm_head_cross_entropy
from elastic_moe.moe import MoE, top_k_by_rank
from elastic_moe.spec import SubModelSpec


@pytest.mark.parametrize("spec,msg", [
    (SubModelSpec(top_k=9), "top_k=9 exceeds"),
    (SubModelSpec(experts=2, top_k=3), "top_k=3 exceeds the 2 experts"),
    (SubModelSpec(layers=()), "no layers"),
    (SubModelSpec(layers=0), "between 1 and 4"),
    (SubModelSpec(layers=(0, 7)), "out of range"),
    (SubModelSpec(layers=(2, 1)), "increasing"),
    (SubModelSpec(experts=((0, 1), (2, 9), (3, 4))), "expert index [9] out of range"),
    (SubModelSpec(experts=((0, 1), (2, 3))), "the model has 3"),
    (SubModelSpec(experts=0), "between 1 and 8"),
    (SubModelSpec(top_k=0), ">= 1"),
    # a value for a layer the spec drops is as impossible: refused, not silently ignored
    (SubModelSpec(layers=(0,), top_k=0), "top_k=0 must be >= 1"),
    (SubModelSpec(layers=(0,), experts=2, top_k=3), "top_k=3 exceeds the 2 experts kept in layer 1"),
    (SubModelSpec(layers=(0, 3), top_k=(9, 2, 2)), "top_k=9 exceeds the 8 experts kept in layer 1"),
    (SubModelSpec(layers=(0, 3), top_k=(0, 2, 2)), "top_k=0 must be >= 1"),
])
def test_impossible_specs_raise(spec, msg):
    model = tiny_model()
    with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        model(torch.tensor([[3, 4, 5]]), spec)


def test_unexportable_spec_is_a_clear_error(tmp_path):
    model = tiny_model(moe_layer_start_index=0, moe_layer_interval=2)  # MoE at layers 1 and 3
    with pytest.raises(UserError, match="cannot be expressed"):
        export_hf(model, tmp_path / "x", SubModelSpec(layers=(1, 2, 3)))
    with pytest.raises(UserError, match="per-layer top-k"):
        export_hf(model, tmp_path / "y", SubModelSpec(top_k=(1, 2)))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_per_row_specs_equal_separate_forwards():
    model = tiny_model()
    x = torch.randint(3, 101, (4, 9), generator=torch.Generator().manual_seed(0))
    specs = [SubModelSpec(), SubModelSpec(layers=(0, 2)), SubModelSpec(experts=4, top_k=1),
             SubModelSpec(layers=(1, 3), experts=((0, 1, 2), (3, 4, 5), (5, 6, 7)), top_k=(1, 2, 3))]
    with torch.no_grad():
        batched = model(x, specs).logits
        for r, s in enumerate(specs):
            alone = model(x[r:r + 1], s).logits
            assert torch.allclose(batched[r:r + 1], alone, atol=1e-4), s  # GEMMs of 36 vs 9 rows


def test_per_row_specs_one_backward_reaches_every_kept_parameter():
    model = tiny_model().train()
    x = torch.randint(3, 101, (2, 9))
    loss, _ = model.loss(x, x, [SubModelSpec(), SubModelSpec(layers=(0, 1), experts=3)])
    loss.backward()
    assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0  # layer 3 runs for row 0 only
    assert model.moe(1).router.grad.abs().sum() > 0


def test_replay_of_own_routes_is_exact_and_other_routes_train_the_router():
    model = tiny_model()
    x = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        own = model(x, return_routes=True)
        replay = model(x, routes=own.routes)
    assert torch.equal(own.logits, replay.logits)
    assert all(r.dtype == torch.uint8 for r in own.routes.values())
    # other experts: logits change, and the router still receives gradients
    other = {i: ((r.long() + 3) % 8).to(torch.uint8) for i, r in own.routes.items()}
    model.train()
    out = model(x, routes=other)
    assert not torch.allclose(out.logits, own.logits)
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    for i in model.moe_layers:
        assert model.moe(i).router.grad.abs().sum() > 0
    # the experts used are the replayed ones
    with torch.no_grad():
        again = model(x, routes=other, return_routes=True)
    for i in other:
        assert torch.equal(again.routes[i].sort(-1).values, other[i].sort(-1).values)


def test_expert_backends_agree_forward_and_backward():
    model = tiny_model().train()
    x = torch.randint(3, 101, (2, 16))
    grads = []
    with pytest.raises(UserError, match="expert backend 'gemm': expected auto, grouped_mm or loop"):
        model.set_expert_backend("gemm")
    if not ops.grouped_mm_available("cpu"):  # torch < 2.9: only the loop, and a clear error for the other
        with pytest.raises(UserError, match="has no torch._grouped_mm kernel for cpu"):
            model.set_expert_backend("grouped_mm")
        pytest.skip(f"torch {torch.__version__} has no CPU torch._grouped_mm")
    for backend in ("loop", "grouped_mm"):
        model.zero_grad()
        model.set_expert_backend(backend)
        loss, _ = model.loss(x, x)
        loss.backward()
        grads.append((loss.item(), model.moe(1).w_gate_up.grad.clone()))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


def test_bias_update_balances_load_and_stats_are_exposed():
    model = tiny_model().train()
    with torch.no_grad():
        model.moe(1).router[0] += 3.0  # expert 0 over-loaded
    x = torch.randint(3, 101, (4, 32))
    with torch.no_grad():
        model(x)
    stats = model.load_stats()
    assert stats["load/layer1/max_over_mean"] > 1.5 and "load/layer1/unused" in stats
    bias_before = model.moe(1).bias.clone()
    model.update_router_bias(0.01)
    assert model.moe(1).bias[0] < bias_before[0]
    assert model.moe(1).load.sum() == 0


def test_aux_loss_is_returned_and_differentiable():
    model = tiny_model().train()
    out = model(torch.randint(3, 101, (2, 8)), want_aux=True)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.moe(1).router.grad.abs().sum() > 0


def test_kv_cache_decode_equals_full_forward():
    model = tiny_model()
    from elastic_moe.model import KVCache

    x = torch.randint(3, 101, (2, 10))
    cache = KVCache(model.cfg, 2, 16)
    with torch.no_grad():
        full = model(x).logits
        a = model(x[:, :6], cache=cache).logits
        steps = [model(x[:, t:t + 1], cache=cache).logits for t in range(6, 10)]
    assert torch.allclose(torch.cat([a, *steps], 1), full, atol=1e-4)


def test_token_out_of_vocabulary_is_an_error():
    with pytest.raises(UserError, match="outside the vocabulary"):
        tiny_model()(torch.tensor([[5, 1000]]))


def test_measured_layer_order_is_used_even_when_it_is_the_identity():
    model = tiny_model()
    assert model.resolve(SubModelSpec(layers=2)).layers == (0, 3)  # nothing measured: evenly spaced
    model.set_layer_order([0, 1, 2, 3])
    assert model.resolve(SubModelSpec(layers=2)).layers == (0, 1)
    model.set_layer_order([3, 1, 0, 2])
    assert model.resolve(SubModelSpec(layers=3)).layers == (0, 1, 3)


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 32, 48), (65, 48)])
def test_inference_linear_for_few_rows_matches_f_linear(shape):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(96, 48, generator=g), torch.randn(96, generator=g)
    with torch.no_grad():
        y = ops.linear(x, w, b)
    assert y.shape == (*shape[:-1], 96) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_compiled_single_row_linear_over_a_large_weight_matches_f_linear():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 64, generator=g), torch.randn(2048, 64, generator=g)
    with torch.no_grad():
        y = torch.compile(lambda a, b: ops.linear(a, b), dynamic=False)(x, w)
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_scale_init_rescales_the_residual_writers_and_embeddings_only():
    cfg = dict(moe_num_shared_experts=1)
    base, scaled = tiny_model(**cfg), tiny_model(**cfg)
    scaled.scale_init(residual_scaled=True, embedding_std=0.05)
    factor = (2 * base.cfg.num_hidden_layers) ** -0.5
    writers = ("attn.o.weight", "mlp.down.weight", "mlp.w_down", "mlp.shared.down.weight")
    b, s = dict(base.named_parameters()), dict(scaled.named_parameters())
    assert sum(name.endswith(writers) for name in b) == 2 * base.cfg.num_hidden_layers + len(base.moe_layers)
    for name, p in b.items():
        if name.endswith(writers):
            want = p * factor
        elif name == "embed.weight":
            want = p * (0.05 / base.cfg.initializer_range)
        else:
            want = p
        torch.testing.assert_close(s[name], want, rtol=1e-6, atol=0, msg=name)


def test_bf16_cast_keeps_router_bias_and_load_in_float32():
    model = tiny_model()
    moe = model.moe(model.moe_layers[0])
    moe.bias.copy_(torch.linspace(-0.3, 0.3, moe.bias.numel()) + 1e-4)  # values bf16 cannot hold
    router, bias = moe.router.detach().clone(), moe.bias.clone()
    model.to(torch.bfloat16).train()
    assert moe.w_down.dtype == torch.bfloat16
    assert (moe.router.dtype, moe.bias.dtype, moe.load.dtype, moe.fair_load.dtype) == (torch.float32,) * 4
    assert torch.equal(moe.router, router) and torch.equal(moe.bias, bias)  # not rounded on the way
    assert isinstance(moe.router, torch.nn.Parameter)
    x = torch.randint(3, model.cfg.vocab_size, (2, 12))
    model(x).logits.float().sum().backward()
    assert moe.router.grad.dtype == torch.float32 and moe.router.grad.abs().sum() > 0
    assert moe.load.sum() == 2 * 12 * model.cfg.moe_k
    E = model.cfg.moe_num_experts
    moe.bias.fill_(0.6)  # in bf16 the spacing here is 4e-3: a 1e-3 step would be lost
    moe.load.copy_(torch.arange(E))
    moe.fair_load.fill_((E - 1) / 2)
    moe.update_bias(1e-3)
    expected = 0.6 + 1e-3 * torch.sign((E - 1) / 2 - torch.arange(E).float())
    assert torch.allclose(moe.bias, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("tie", [True, False])
def test_training_flops_count_each_matmul_a_token_goes_through(tie):
    """6 x (weights a token multiplies by: attention, dense MLP, router, k of E experts, shared experts, LM head;
    not the embedding lookup) + attention scores, within the norms' and biases' share (< 1%)."""
    model = tiny_model(tie_word_embeddings=tie)
    cfg, S = model.cfg, 16
    n = cfg.vocab_size * cfg.hidden_size  # the LM head, tied or not
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in ("embed.weight", "lm_head.weight"):
            continue
        n += p.numel() * (cfg.moe_k / cfg.moe_num_experts if name.endswith(("w_gate_up", "w_down")) else 1)
    attn = 12 * cfg.num_hidden_layers * S * cfg.num_attention_heads * cfg.dim_head
    assert model.flops_per_token(S) == pytest.approx(6 * n + attn, rel=0.01)


def test_a_bf16_cast_keeps_the_rope_frequencies_in_float32():
    model = tiny_model(max_position_embeddings=4096)
    pos = torch.arange(0, 4096, 7)[None]
    cos, sin = (t.clone() for t in model.rotary.cos_sin(pos))
    model.rotary._cache = None
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    cos16, sin16 = model.rotary.cos_sin(pos)
    assert torch.equal(cos16, cos) and torch.equal(sin16, sin)  # rounded frequencies: cos off by up to 1.47


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("d", [{"layers": "3"}, {"layers": 2.5}, {"top_k": [1.5, 2, 2]}, {"layer": 2}, [2],
                               {"experts": [[0, 1], [2], "ab"]}])
def test_spec_dicts_from_json_with_wrong_types_or_keys_are_refused(d):
    model = tiny_model()
    with pytest.raises(UserError):
        model.resolve(SubModelSpec.from_dict(d))
    ok = SubModelSpec.from_dict({"layers": [1, 3], "experts": None, "top_k": [1, 2, 2]})
    assert model.resolve(ok).top_k == {1: 1, 3: 2}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kw", [dict(layers="2,3"), dict(experts="4,5"), dict(layers=""), dict(experts=" ")])
def test_spec_parse_refuses_several_values_for_a_count(kw):
    # before: "2,3" kept 2 silently, and an empty string raised IndexError
    name = "--" + next(iter(kw))
    with pytest.raises(UserError, match=f"{name} takes one integer, got {kw[name[2:]]!r}"):
        SubModelSpec.parse(**kw)


def test_a_replayed_token_without_a_route_counts_no_masked_expert():
    """Routes of width 4 under a mask keeping 2 experts: a token with no recorded route picks its own 4 slots, of
    which 2 can only be masked experts; they carry weight 0 and must not count as load either."""
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


def test_load_stats_count_only_the_experts_the_sub_model_keeps():
    """`unused` counts the kept experts that got no token, not the experts a narrow sub-model masks out."""
    model = tiny_model().train()
    x = torch.randint(3, 101, (4, 16), generator=torch.Generator().manual_seed(0))
    spec = SubModelSpec(experts=4)
    with torch.no_grad():
        model(x, spec)
    rs, stats = model.resolve(spec), model.load_stats()
    for i in model.moe_layers:
        load = model.moe(i).load
        kept = list(rs.experts[i])
        masked = [e for e in range(8) if e not in kept]
        assert load[masked].sum() == 0
        assert stats[f"load/layer{i}/unused"] == int((load[kept] == 0).sum())  # the 4 masked ones are not "unused"


def test_aux_loss_fractions_are_over_the_routed_pairs_only():
    """The Switch loss divides the per-expert counts by the routed (token, slot) pairs, not by all K slots. With a
    uniform router E * sum_e frac_e * (1/E) = sum_e frac_e must be exactly 1, whatever k each token uses."""
    cfg = ModelConfig(hidden_size=16, moe_intermediate_size=8, moe_num_experts=8, moe_k=2, moe_num_shared_experts=0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        moe.router.zero_()  # uniform router probabilities
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    slots = torch.tensor([[True, True], [True, False]] * 3)  # half the tokens use k = 1
    out = moe(x, top_k=slots, want_aux=True)
    assert abs(out.aux_loss.item() - 1.0) < 1e-6
    # a non-uniform router: the loss equals the formula over the routed pairs
    torch.nn.init.normal_(moe.router, std=1.0)
    out = moe(x, top_k=slots, want_aux=True)
    probs = torch.softmax(x @ moe.router.t(), -1)
    frac = out.counts.float() / slots.sum()
    torch.testing.assert_close(out.aux_loss, 8 * (frac * probs.mean(0)).sum())


def test_top_k_by_rank_equals_topk_on_cpu_and_breaks_ties_to_the_lower_id():
    """top_k_by_rank (the compiled-decode router) is otherwise only tested under the gpu marker, with random scores
    (no ties); it is a pure function and runs on the CPU. Ties must go to the lower expert id, as documented."""
    s = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 6):
        assert torch.equal(top_k_by_rank(s, k), torch.topk(s, k).indices)
    ties = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert top_k_by_rank(ties, 3).tolist() == [[1, 3, 0]]
    inf = float("-inf")
    assert top_k_by_rank(torch.tensor([[inf, 0.2, inf, inf]]), 3).tolist() == [[1, 0, 2]]


def test_per_row_routes_mark_the_layers_a_row_skips_as_unused():
    """With per-row specs, return_routes fills the rows that skip a MoE layer with the padding id num_experts, not
    expert 0."""
    model = tiny_model()  # MoE layers 1, 2, 3
    x = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, [SubModelSpec(), SubModelSpec(layers=(0, 2))], return_routes=True)
    E = model.cfg.moe_num_experts
    for i in (1, 3):  # row 1 skips them
        assert (out.routes[i][1].long() == E).all()
        assert (out.routes[i][0].long() < E).all()
    assert (out.routes[2].long() < E).all()


def test_lm_head_cross_entropy_honours_its_ignore_index():
    """ignore_index reaches F.cross_entropy (not only the default -100 works)."""
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.tensor([[1, 7, 3, 7, 2], [7, 4, 5, 6, 7]])
    ce = lm_head_cross_entropy(h, w, None, t, ops.FP32, ignore_index=7)
    assert (ce[t == 7] == 0).all() and (ce[t != 7] > 0).all()
    mean = lm_head_cross_entropy(h, w, None, t, ops.FP32, reduction="mean", ignore_index=7)
    torch.testing.assert_close(mean, ce[t != 7].mean())
