"""The Triton decode kernels (`elastic_moe.triton_decode`) against the model's own decode. Without CUDA they run in
Triton's interpreter, which needs the `triton` package (CUDA builds of torch ship it; on a CPU machine
`pip install triton`); without it these tests are skipped."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # skipped before the variable below, which would leak into every
    pytest.skip("triton is not installed", allow_module_level=True)  # later test; not imported before it is set
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, i.e. at the first import
triton_decode = pytest.importorskip("elastic_moe.triton_decode")

from helpers import tiny_model  # noqa: E402
from test_gpu import PROMPTS, assert_same_completions  # noqa: E402

from elastic_moe import fast_decode  # noqa: E402
from elastic_moe.errors import UserError  # noqa: E402
from elastic_moe.fast_decode import FastDecoder  # noqa: E402
from elastic_moe.generate import SamplingParams, generate  # noqa: E402
from elastic_moe.spec import SubModelSpec  # noqa: E402

# head dim 16, experts of width 16: the smallest tiles the kernels take
SHAPES = {
    "shared_gqa2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    "two_shared_gqa4_k3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, moe_k=3,
                               moe_num_shared_experts=2),
    "noshared_mha": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3, moe_num_shared_experts=0,
                         moe_layer_start_index=0),
}
SPECS = [None, SubModelSpec(layers=3, experts=4, top_k=1)]
# float32 CPU models through Triton's interpreter; on a CUDA machine the gpu-marked tests below check the kernels
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests (no CUDA); gpu tests cover CUDA")
SMALL_TILES = {"qkv": triton_decode.Tile(16, 256), "out": triton_decode.Tile(8, 256),
               "router": triton_decode.Tile(8, 256), "up": triton_decode.Tile(16, 256),
               "down": triton_decode.Tile(8, 256)}  # several chunks per loop at the larger shape


@interpreter
@pytest.mark.parametrize("shape", ["two_shared_gqa4_k3", "noshared_mha"])
def test_triton_decode_equals_generate(shape):
    # float32: the kernels give the eager decode's tokens, routes and log-probs (the interpreter is slow: one prompt)
    model = tiny_model(**SHAPES[shape])
    dec = FastDecoder(model, compile=False, static_on_cpu=True, triton_kernels=True)
    for spec in SPECS:
        p = SamplingParams(max_new_tokens=5, temperature=0, return_routes=True)
        want = generate(model, PROMPTS[2:], p, spec, eos_id=-1)
        assert_same_completions(want, dec.generate(PROMPTS[2:], p, spec, eos_id=-1), lp_tol=1e-4)


def _inputs(model, L=16, slot=7):
    """Two tokens' hidden states, a static cache of L columns (the second row left-padded by 2), and an expert
    mask that drops 2 experts."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.hidden_size, generator=g)
    kv = torch.randn(2, cfg.num_key_value_heads, L, 2 * cfg.dim_head, generator=g)
    mask_add = torch.zeros(2, L).masked_fill(torch.arange(L) > slot, float("-inf"))
    mask_add[1, :2] = float("-inf")
    emask = torch.ones(cfg.moe_num_experts, dtype=torch.bool)
    emask[[2, 5]] = False
    dev = model.embed.weight.device
    return [t.to(dev) for t in (x, kv, mask_add, torch.tensor(slot), emask)]


def _decoder(model, kernels):
    dec = FastDecoder(model, compile=False, static_on_cpu=True, expert_path="gemv", expert_copies=True,
                      triton_kernels=kernels)
    dec._refresh_experts_t()
    return dec


def _dense_layer(model, kernels, dt, **kw):
    """Layer 0 (dense) of a decode step: attention with its cache write, then the feed-forward, by the kernels or by
    the torch pieces; returns (hidden, cache)."""
    x, kv, mask_add, slot, _ = _inputs(model, **kw)
    blk, dec, x, kv = model.blocks[0], _decoder(model, kernels), x.to(dt), kv.to(dt)
    pos = torch.tensor([5, 9], device=x.device)
    cos, sin = dec._cos[pos], dec._sin[pos]
    if kernels:
        h = triton_decode.attention(blk, x, cos, sin, kv, slot, mask_add)
        return (h + blk.mlp(blk.mlp_norm(h))).float(), kv.float()
    q, kv_new = fast_decode._attn_in(blk, x, cos, sin)
    kv.index_copy_(2, slot.view(1), kv_new)
    return fast_decode._attn_out_mlp(blk, x, q, kv, mask_add, None, None, "gemv")[0].float(), kv.float()


def _moe_layer(model, kernels, dt, top_k=3):
    """The MoE half of the first MoE layer (norm, router, top-k of the kept experts, routed + shared experts,
    residual); returns (hidden, expert ids)."""
    h, _, _, _, emask = _inputs(model)
    i = model.moe_layers[0]
    blk, dec, h = model.blocks[i], _decoder(model, kernels), h.to(dt)
    if kernels:
        madd = torch.zeros(emask.shape, device=h.device).masked_fill(~emask, float("-inf"))
        routes = torch.full((h.shape[0], 4, top_k), 255, dtype=torch.uint8, device=h.device)
        out, idx = triton_decode.moe(blk, h, madd, top_k, dec._experts_t[i], routes, torch.tensor(3, device=h.device))
        assert torch.equal(routes[:, 2].long(), idx.long()) and bool((routes[:, [0, 1, 3]] == 255).all())
        return out.float(), idx.long()
    out, idx = fast_decode._moe(blk.mlp, blk.mlp_norm(h), emask, top_k, "gemv", dec._experts_t[i])
    return (h + out.to(dt)).float(), idx


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@interpreter
@torch.no_grad()
def test_triton_layer_pieces_match_torch_pieces():
    # float32: attention + cache write + dense MLP, and the MoE half, equal to the torch decode pieces
    m32 = tiny_model(**SHAPES["two_shared_gqa4_k3"])
    for part in (_dense_layer, _moe_layer):
        _assert_same(part(m32, True, torch.float32), part(m32, False, torch.float32))


def _assert_same(got, ref):
    for a, b in zip(got, ref, strict=True):
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@interpreter
@pytest.mark.parametrize("tiles", ["committed", "small"])
@torch.no_grad()
def test_triton_layer_pieces_at_a_larger_shape(tiles, monkeypatch):
    # with small tiles every loop of the kernels runs more than once: hidden 320 (two 256-wide chunks, the second
    # masked), 5 heads of 64 (320 inputs to the output projection), 64 keys per attention step over a 192-column
    # cache with the new token at column 150 (committed: 3 splits of one step; small: 2 splits of two steps, the
    # second half masked), 48 experts (E_PAD 64) top-6 of width 288 plus 2 shared
    if tiles == "small":
        monkeypatch.setattr(triton_decode, "TILES", SMALL_TILES)
        monkeypatch.setattr(triton_decode, "MAX_SPLITS", 2)
    torch.manual_seed(0)
    m32 = tiny_model(hidden_size=320, num_attention_heads=5, num_key_value_heads=1, head_dim=64, moe_num_experts=48,
                     moe_k=6, moe_intermediate_size=288, moe_num_shared_experts=2, num_hidden_layers=2)
    with torch.no_grad():  # tiny_model's x5 weights saturate a 320-wide model; bring activations back to O(1)
        for p in m32.parameters():
            if p.dim() > 1:
                p.mul_(0.2 * (64 / p.shape[-1]) ** 0.5)
    _assert_same(_dense_layer(m32, True, torch.float32, L=192, slot=150),
                 _dense_layer(m32, False, torch.float32, L=192, slot=150))
    _assert_same(_moe_layer(m32, True, torch.float32, top_k=6), _moe_layer(m32, False, torch.float32, top_k=6))


@pytest.mark.gpu
@torch.no_grad()
def test_triton_layer_pieces_bf16_on_gpu():
    # bf16 (GPU only: Triton 3.6's interpreter rounds float32 to bf16 toward zero, where a GPU rounds to nearest):
    # the attention no further from float32 than the torch pieces are (it keeps scores and probabilities in fp32
    # where they round to bf16); the MoE half routes alike and agrees to bf16 precision
    m32 = tiny_model(**SHAPES["two_shared_gqa4_k3"]).cuda()
    mb = copy.deepcopy(m32).to(torch.bfloat16)
    ref = _dense_layer(m32, False, torch.float32)
    got, base = _dense_layer(mb, True, torch.bfloat16), _dense_layer(mb, False, torch.bfloat16)
    for a, b, r in zip(got, base, ref):
        assert _rel(a, r) <= 1.2 * _rel(b, r) + 1e-3, (_rel(a, r), _rel(b, r))
    (got, idx), (base, base_idx) = _moe_layer(mb, True, torch.bfloat16), _moe_layer(mb, False, torch.bfloat16)
    assert torch.equal(idx, base_idx)
    assert _rel(got, base) < 1e-2


def test_triton_decode_refuses_unsupported_shapes():
    model = tiny_model().cuda() if torch.cuda.is_available() else tiny_model()
    with pytest.raises(UserError, match="head dim 8"):
        FastDecoder(model, compile=False, static_on_cpu=True, triton_kernels=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cuda_graph_decode_matches_generate():
    # float32 on the GPU, every step one CUDA graph of Triton kernels (head compiled): the eager decode's tokens
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(**SHAPES["two_shared_gqa4_k3"]).cuda()
    model.set_expert_backend("loop")
    dec = FastDecoder(model, triton_kernels=True)
    p = SamplingParams(max_new_tokens=16, temperature=0, return_routes=True)
    for spec in SPECS + SPECS:
        assert_same_completions(generate(model, PROMPTS, p, spec, eos_id=-1), dec.generate(PROMPTS, p, spec, eos_id=-1),
                                lp_tol=1e-3)
    assert dec.captures == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs an sm90 GPU (grouped GEMM prefill, programmatic dependent launch)")
@pytest.mark.parametrize("pdl", [False, True])
def test_triton_bf16_graphs_equal_eager_kernels(pdl, monkeypatch):
    # with programmatic dependent launch each kernel starts while the previous one runs: the same numbers, or a
    # kernel read something before the previous one had written it
    model = tiny_model(**SHAPES["two_shared_gqa4_k3"]).cuda().to(torch.bfloat16)
    model.set_expert_backend("grouped_mm")
    graphs = FastDecoder(model, compile=False, triton_kernels=True)
    eager = FastDecoder(model, compile=False, cuda_graphs=False, triton_kernels=True)
    p = SamplingParams(max_new_tokens=16, temperature=0, return_routes=True)
    for spec in SPECS:
        monkeypatch.setattr(triton_decode, "PDL", False)
        want = eager.generate(PROMPTS, p, spec, eos_id=-1)
        monkeypatch.setattr(triton_decode, "PDL", pdl)
        assert triton_decode.use_pdl(torch.device("cuda")) == pdl
        assert_same_completions(want, graphs.generate(PROMPTS, p, spec, eos_id=-1), lp_tol=1e-6)


@pytest.mark.skipif(tuple(int(x) for x in triton_decode.triton.__version__.split(".")[:2]) < (3, 3),
                    reason="the sm90 compile check drives Triton 3.3+'s compiler API")
def test_kernels_compile_for_sm90_without_spills():
    # the interpreter does not type-check as the compiler does (loop-carried values, scalar branches); compile
    # every kernel for an H100 with the GPU benchmark's shapes (ptxas ships with triton; no GPU needed)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_sm90_compile.py")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    usage = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(usage) == ["attend", "down", "out", "qkv", "router", "up"]
    for name, res in usage.items():
        assert res["LOCAL"] == 0 and res["REG"] <= 255, (name, res)
