"""The op library's numerics on the expert paths: FP8 block scaling on batched and per-expert weights, scale
invariance for tiny rows, bf16 experts of any width, and what the grouped-GEMM backend hands back."""


import pytest
import torch
from helpers import tiny_model

from elastic_moe import ops
from elastic_moe.config import ModelConfig
from elastic_moe.model import ElasticMoE

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


def _model(hidden: int) -> ElasticMoE:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, moe_num_experts=4, moe_k=2,
                      moe_intermediate_size=12, max_position_embeddings=64)
    return ElasticMoE(cfg)


@pytest.mark.skipif(not ops.grouped_mm_available("cpu"), reason="this torch has no CPU torch._grouped_mm")
def test_a_bf16_model_whose_width_is_not_a_multiple_of_8_runs_its_experts():
    # before: hidden 36 passed the "multiple of 4 elements" check meant for float32, and torch._grouped_mm refused
    # the bfloat16 rows (72 bytes): "strides should be multiple of 16 bytes"
    model = _model(36).to(torch.bfloat16)
    x = torch.randint(3, 64, (2, 8))
    out = model(x).logits
    out.float().sum().backward()
    model.set_expert_backend("loop")
    model.zero_grad()
    ref = model(x).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("numerics", [ops.Numerics("fp8"), ops.Numerics("fp32", kernel="split")])
@pytest.mark.skipif(not ops.grouped_mm_available("cpu"), reason="this torch has no CPU torch._grouped_mm")
def test_the_grouped_mm_backend_keeps_numerics_it_cannot_compute(numerics):
    # before: a model put on the grouped_mm backend (as gpu.py advises) and then on fp8 numerics ran its experts
    # in bf16 (and the split kernel in the default order): the "fp8" measurement was of bf16 experts
    model = _model(32).eval()
    x = torch.randint(3, 64, (2, 8))
    model.set_numerics(numerics)
    with torch.no_grad():
        model.set_expert_backend("loop")
        ref = model(x).logits
        model.set_expert_backend("grouped_mm")
        got = model(x).logits
    assert torch.equal(got, ref)


def test_fp8_row_scaling_of_a_weight_is_per_output_channel():
    """The emulated FP8 weight is scaled per output column, as _scaled_mm's rowwise scale_b is: scaling one column
    of the weight by 2^10 scales that output column exactly and leaves the others bit-identical."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 64, generator=g), torch.randn(64, 32, generator=g)
    fp8 = ops.Numerics("fp8")
    y = ops.matmul(a, b, fp8)
    b2 = b.clone()
    b2[:, 3] *= 1024.0
    y2 = ops.matmul(a, b2, fp8)
    others = [c for c in range(32) if c != 3]
    assert torch.equal(y2[:, others], y[:, others])
    torch.testing.assert_close(y2[:, 3], y[:, 3] * 1024.0, rtol=1e-6, atol=0)


def test_bf16_products_are_rounded_to_bf16_on_every_path():
    """The CPU emulation of a bf16 GEMM (no native bf16 units) rounds its float32 result to bf16."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 48, generator=g), torch.randn(48, 24, generator=g)
    bf16 = ops.Numerics("bf16")
    for y in (ops.matmul(a, b, bf16), ops.linear(a, b.t(), None, bf16),
              ops.grouped_matmul(a, torch.stack([b, -b]), [2, 4], bf16, "loop")):
        assert torch.equal(y, y.bfloat16().float())
        assert not torch.equal(y, a @ b)  # the rounding did happen (fp32 product differs)


def test_the_split_kernel_computes_the_same_product_in_another_order():
    """The "split" kernel is the same product summed in another order (fp32 rounding apart), on the plain and the
    grouped path."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(6, 64, generator=g), torch.randn(64, 24, generator=g)
    split = ops.Numerics(kernel="split")
    torch.testing.assert_close(ops.matmul(a, b, split), a @ b, rtol=1e-5, atol=1e-5)
    w = torch.stack([b, 2 * b])
    want = torch.cat([a[:2] @ b, a[2:] @ (2 * b)])
    torch.testing.assert_close(ops.grouped_matmul(a, w, [2, 4], split), want, rtol=1e-5, atol=1e-5)
