"""Review of the op library's FP8 emulation, the rollout / trainer log-probs and R3 replay, and the K3 mismatch
metrics: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from elastic_moe import ops

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fp8_block_scaling_holds_for_batched_weights():
    # before: a batched weight (the MoE's gathered decode path) was quantised per column even with block scaling,
    # so the same expert gave other products there than through the loop / sorted path
    torch.manual_seed(0)
    a, b = torch.randn(3, 200), torch.randn(2, 200, 150)
    b[:, :, :128] *= 50  # blocks of very different magnitude: per-column and per-block scales differ
    n = ops.Numerics("fp8", "block")
    batched = ops.matmul(a, b, n)
    assert torch.allclose(batched, torch.stack([ops.matmul(a, w, n) for w in b.unbind(0)]), rtol=1e-5, atol=1e-3)


def test_fp8_block_scaling_is_the_same_on_every_expert_path():
    model = tiny_model(moe_k=2)
    model.set_numerics(ops.Numerics("fp8", "block"))
    moe = model.moe(model.moe_layers[0])
    torch.manual_seed(1)
    x = torch.randn(3, model.cfg.hidden_size)
    with torch.no_grad():
        idx, w, _ = moe.route(x, None, 2, None, False)
        gathered = moe._experts_gathered(x, idx, w)
        few = moe._experts_few(x, idx, w)
    assert torch.allclose(gathered, few, atol=1e-5)


@pytest.mark.parametrize("block", [None, 4])
def test_fp8_quantisation_is_scale_invariant_for_tiny_rows(block):
    # before: the scale's floor (amax >= 1e-12) flushed rows below ~1e-15 to zero and rounded rows below 1e-12 on a
    # coarser grid than the same values scaled up
    torch.manual_seed(2)
    x = torch.randn(6, 8)
    for c in (1e-13, 1e-20, 1e-30):
        q = ops.fake_quant_fp8(x * c, block)
        assert torch.allclose(q / c, ops.fake_quant_fp8(x, block), rtol=1e-5, atol=0), c
    z = torch.zeros(3, 8)
    assert torch.equal(ops.fake_quant_fp8(z, block), z)


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


def test_weight_sync_refuses_a_tensor_of_another_shape_before_copying_anything():
    # before: copy_ broadcast a (1,) tensor over a (H,) one silently, and a shape that does not broadcast raised a
    # RuntimeError half-way, leaving the engine with some new weights under the old version
    from elastic_moe.errors import UserError
    from elastic_moe.rollout import RolloutEngine

    model = tiny_model()
    eng = RolloutEngine(model)
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    for bad in (torch.ones(1), torch.ones(5)):
        sd = {k: v * 2 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        sd["norm.weight"] = bad
        with pytest.raises(UserError, match="norm.weight"):
            eng.load_weights(sd, 4)
        assert eng.version == 0
        assert all(torch.equal(v, before[k]) for k, v in eng.model.state_dict().items())


@pytest.mark.parametrize("prompt", [[500, 3], [-1, 3]])
def test_fast_decoder_refuses_token_ids_outside_the_vocabulary_as_generate_does(prompt):
    # before: the static-cache prefill skipped the model's input checks: an IndexError traceback
    from elastic_moe.errors import UserError
    from elastic_moe.fast_decode import FastDecoder
    from elastic_moe.generate import SamplingParams, generate

    model = tiny_model()
    with pytest.raises(UserError, match="vocabulary"):
        generate(model, [prompt], SamplingParams(3))
    with pytest.raises(UserError, match="vocabulary"):
        FastDecoder(model, compile=False, static_on_cpu=True).generate([prompt], SamplingParams(3))


def test_fast_decoder_takes_a_list_of_equal_specs_and_refuses_differing_ones_as_generate_does():
    # before: AttributeError ('list' object has no attribute 'layers')
    from elastic_moe.errors import UserError
    from elastic_moe.fast_decode import FastDecoder
    from elastic_moe.generate import SamplingParams, generate
    from elastic_moe.spec import SubModelSpec

    model = tiny_model()
    fd = FastDecoder(model, compile=False, static_on_cpu=True)
    p = SamplingParams(4, temperature=0)
    s = SubModelSpec(top_k=1)
    same = fd.generate([[1, 3], [4, 5, 6]], p, [s, s])
    assert [c.tokens for c in same] == [c.tokens for c in generate(model, [[1, 3], [4, 5, 6]], p, s)]
    for decode in (fd.generate, lambda *a: generate(model, *a)):
        with pytest.raises(UserError, match="one spec"):
            decode([[1, 3], [4, 5, 6]], p, [s, None])


def test_fast_decoder_recovers_after_a_call_with_non_finite_weights():
    # before: the static KV cache kept the NaN keys / values of the bad call in the columns a later call masks out,
    # and the masked attention (0 * NaN) made every later call NaN: one bad step poisoned the engine for good
    from elastic_moe.fast_decode import FastDecoder
    from elastic_moe.generate import SamplingParams

    model = tiny_model()
    fd = FastDecoder(model, compile=False, static_on_cpu=True)
    p = SamplingParams(6, temperature=0)
    good = fd.generate([[1, 2, 3]], p)[0]
    w = model.blocks[0].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(float("nan"))
    assert all(x != x for x in fd.generate([[1, 2, 3]], p)[0].logprobs)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.copy_(w)
    again = fd.generate([[1, 2, 3]], p)[0]
    assert again.tokens == good.tokens and again.logprobs == good.logprobs


def test_samples_of_one_prompt_routed_differently_keep_their_own_prompt_routes():
    from elastic_moe.rollout import Sample, collate

    def sample(prompt_experts: int, version: int) -> Sample:
        routes = {1: torch.tensor([[prompt_experts, 0]] * 3 + [[2, 3]] * 2, dtype=torch.uint8)}
        return Sample(0, [5, 6, 7], [8, 9], [-0.5, -0.25], "length", version, routes)

    same = collate([sample(1, 0), sample(1, 0)], pad_id=0, num_experts=4)
    assert same.prompt_ids.shape[0] == 1 and same.prompt_of.tolist() == [0, 0]
    # two weight versions routed the prompt differently (async RL): R3 must replay each one's own prompt routes
    tb = collate([sample(1, 0), sample(2, 1), sample(1, 0)], pad_id=0, num_experts=4)
    assert tb.prompt_ids.shape[0] == 2 and tb.prompt_of.tolist() == [0, 1, 0]
    assert tb.prompt_routes[1][:, :, 0].tolist() == [[1, 1, 1], [2, 2, 2]]
    pred = tb.rollout_pred_routes()[1]
    assert pred[:, 0, 0].tolist() == [1, 2, 1]
    assert collate([sample(1, 0), sample(2, 1)], 0, 4, with_routes=False).prompt_ids.shape[0] == 1
