"""Hand-written Triton kernels for one decode step of a few tokens: each half of a layer in a few kernels.

A batch-1 decode step on an H100 is bound by how many kernels run back to back, not by bytes: compiled by
torch.compile it is ~21 kernels per layer at 1.5-12 us each (docs/gpu_notes.md). Here a MoE layer is six:

    qkv     RMSNorm + QKV matrix-vector product + RoPE + the new key and value written into the static cache
    attend  attention of each query head over a slice of the cache (online softmax; the cache split over programs)
    out     the slices combined + output projection + residual
    router  RMSNorm + router logits (fp32 weight)
    up      per (token, slot): softmax, correction bias, top-k, then that expert's gate/up rows + SwiGLU; the
            recorded routes
    down    per output rows: every slot's down projection, gate-weighted sum + residual

Each program recomputes the RMSNorm of its token (H values, cheaper than a kernel of its own) and the top-k of its
token (E scores). Shared experts come from `FastDecoder`'s expert copies, where they are extra experts of the routed
width taken with weight 1. Everything accumulates in fp32 and rounds where the torch decode path rounds (each
projection's output, SwiGLU's output, the residual sums), so a float32 model gives the torch path's numbers up to
summation order. The kernels are dtype-generic: on a machine without CUDA they run in Triton's interpreter
(`TRITON_INTERPRET=1`, set before the first import), which is how the CPU tests check them in float32 (the
interpreter rounds float32 to bf16 toward zero, a GPU to nearest); `tests/triton_sm90_compile.py` compiles them for
an H100 without one.

Needs the `triton` package (shipped with CUDA builds of PyTorch).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from elastic_moe import ops
from elastic_moe.errors import UserError


@dataclass(frozen=True)
class Tile:
    rows: int  # weight rows per program (a power of two)
    chunk: int  # values of the reduced dimension per load (a power of two)
    warps: int = 4


# Per kernel. A batch-1 step is bound by memory latency, not bandwidth: each loop iteration of a program waits for
# its loads, so fewer, wider loads per program keep more bytes in flight. `benchmarks/triton_tiles.py` times
# candidate tiles on a GPU; these were the fastest there, within noise of the others (docs/benchmarks/triton_tiles.md).
TILES = {"qkv": Tile(8, 1024), "out": Tile(4, 1024), "router": Tile(4, 1024), "up": Tile(8, 1024), "down": Tile(4, 512)}
ATTN_TILE = 4096  # keys x head dim per iteration of the attention: 128 registers a thread on 8 warps at D = 128
# The attention splits the cache's keys over up to this many programs per (token, head) (flash-decoding): a batch-1
# step has only `heads` programs otherwise, each waiting on its key blocks one after another. `_out_kernel` combines
# the splits, so each of its programs reads MAX_SPLITS x heads x head dim partial values (from L2).
MAX_SPLITS = 8
# Programmatic dependent launch (Hopper and later): each kernel of a step is launched while the one before it still
# runs; its programs load the weights they need (which no kernel writes) first, then wait in `_after_previous` for
# the previous kernel's results. Meant to hide the launch gap and the first weight loads of ~100 kernels a step. Off
# until measured: written in session 24 with no GPU lent (it compiles for sm90; `benchmarks/triton_tiles.py` times
# it as `committed_with_pdl` and the gpu-marked tests check it when PDL is True).
PDL = False
# Older Triton has no usable PDL: 3.2 and 3.3.1 (torch 2.6, 2.7) lack the gdc_* intrinsics and launch_pdl, and
# 3.4's (torch 2.8) still take the `_builder` its own compiler no longer passes, so they fail to compile
HAS_PDL = "_semantic" in inspect.signature(getattr(tl.extra.cuda, "gdc_wait", lambda: None)).parameters


def launch_options(pdl: bool) -> dict:
    """A kernel launch's keywords: `launch_pdl` only where this Triton has the option."""
    return {"launch_pdl": pdl} if HAS_PDL else {}


def keys_per_step(D: int) -> int:
    return max(16, ATTN_TILE // D)


def attention_split(L: int, D: int) -> tuple[int, int, int]:
    """(keys per step, keys per split, splits) of the attention over a cache of L columns."""
    keys = keys_per_step(D)
    span = keys * triton.cdiv(triton.cdiv(L, keys), MAX_SPLITS)
    return keys, span, triton.cdiv(L, span)


def use_pdl(device: torch.device) -> bool:
    """Whether kernels launched for `device` use programmatic dependent launch (`PDL`, a CUDA GPU of sm90+)."""
    return PDL and HAS_PDL and device.type == "cuda" and _capability(device.index) >= 9


@functools.cache
def _capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


if HAS_PDL:
    @triton.jit
    def _after_previous(PDL: tl.constexpr):
        """Wait until the previous kernel of the stream has finished and its writes are visible, then let the next
        kernel launch. Every kernel calls this before it reads an activation or writes anything: a kernel's writes
        then come after every earlier kernel has finished (by induction), as without PDL."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
else:
    @triton.jit
    def _after_previous(PDL: tl.constexpr):  # no PDL in this Triton: kernels simply run one after another
        pass


@triton.jit
def _rms_scale(x_ptr, eps, H: tl.constexpr, CHUNK: tl.constexpr):
    """1 / RMS of one token's H values, in fp32."""
    ss = tl.zeros((CHUNK,), tl.float32)
    for c0 in range(0, H, CHUNK):
        o = c0 + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + o, mask=o < H, other=0.0).to(tl.float32)
        ss += x * x
    return tl.rsqrt(tl.sum(ss, 0) / H + eps)


@triton.jit
def _normed(x_ptr, w_ptr, r, o, m):
    """Values o of the RMSNorm of a token, as the model computes them: fp32 normalisation rounded to the input
    dtype, times the weight, rounded again; returned in fp32 (0 where not m)."""
    dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + o, mask=m, other=0.0).to(tl.float32)
    return (w * (x * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def _qkv_kernel(x_ptr, nw_ptr, eps, w_ptr, cos_ptr, sin_ptr, q_ptr, kv_ptr, slot_ptr,
                kv_sb, kv_sh, kv_sl, H: tl.constexpr, D: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr,
                ROWS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    r0 = tl.program_id(1) * ROWS
    even = r0 + 2 * tl.arange(0, ROWS // 2)  # interleaved RoPE: rows 2j and 2j + 1 rotate together
    o = tl.arange(0, CHUNK)
    m = o < H
    we = tl.load(w_ptr + even[:, None] * H + o[None, :], mask=m[None, :], other=0.0)  # the first chunk's weights
    wo = tl.load(w_ptr + (even + 1)[:, None] * H + o[None, :], mask=m[None, :], other=0.0)
    _after_previous(PDL)
    x_row = x_ptr + b * H
    r = _rms_scale(x_row, eps, H, CHUNK)
    xn = _normed(x_row, nw_ptr, r, o, m)
    a = tl.sum(we.to(tl.float32) * xn[None, :], 1)
    c = tl.sum(wo.to(tl.float32) * xn[None, :], 1)
    for c0 in range(CHUNK, H, CHUNK):
        o = c0 + tl.arange(0, CHUNK)
        m = o < H
        xn = _normed(x_row, nw_ptr, r, o, m)
        we = tl.load(w_ptr + even[:, None] * H + o[None, :], mask=m[None, :], other=0.0)
        wo = tl.load(w_ptr + (even + 1)[:, None] * H + o[None, :], mask=m[None, :], other=0.0)
        a += tl.sum(we.to(tl.float32) * xn[None, :], 1)
        c += tl.sum(wo.to(tl.float32) * xn[None, :], 1)
    dt = q_ptr.dtype.element_ty
    a = a.to(dt).to(tl.float32)
    c = c.to(dt).to(tl.float32)
    head = r0 // D
    d_even = even - head * D
    if head < NQ + NKV:  # query or key: rotate
        cs = tl.load(cos_ptr + b * (D // 2) + d_even // 2)
        sn = tl.load(sin_ptr + b * (D // 2) + d_even // 2)
        a, c = a * cs - c * sn, c * cs + a * sn
    if head < NQ:
        tl.store(q_ptr + b * NQ * D + even, a.to(dt))
        tl.store(q_ptr + b * NQ * D + even + 1, c.to(dt))
    else:
        slot = tl.load(slot_ptr)
        is_v = head >= NQ + NKV
        kvh = tl.where(is_v, head - NQ - NKV, head - NQ)
        base = kv_ptr + b * kv_sb + kvh * kv_sh + slot * kv_sl + tl.where(is_v, D, 0) + d_even
        tl.store(base, a.to(dt))
        tl.store(base + 1, c.to(dt))


@triton.jit
def _attend_kernel(q_ptr, kv_ptr, mask_ptr, pm_ptr, pd_ptr, pacc_ptr, scale, kv_sb, kv_sh, kv_sl, L: tl.constexpr,
                   D: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr, KEYS: tl.constexpr, SPAN: tl.constexpr,
                   SPLITS: tl.constexpr, PDL: tl.constexpr):
    """Program (token b, query head h, split s): online softmax over the keys [s * SPAN, (s + 1) * SPAN); writes
    the split's running max, denominator and unnormalised output (fp32) for `_out_kernel` to combine."""
    _after_previous(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s0 = tl.program_id(2) * SPAN
    kvh = h // (NQ // NKV)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * NQ * D + h * D + d).to(tl.float32)
    m = tl.full((), -1e30, tl.float32)  # finite start: a block of masked keys then gives exp(-inf) = 0, not NaN
    den = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    base = kv_ptr + b * kv_sb + kvh * kv_sh
    for l0 in range(0, SPAN, KEYS):
        ls = s0 + l0 + tl.arange(0, KEYS)
        inside = ls < L
        k = tl.load(base + ls[:, None] * kv_sl + d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * scale + tl.load(mask_ptr + b * L + ls, mask=inside, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(base + ls[:, None] * kv_sl + D + d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        den = den * alpha + tl.sum(p, 0)
        m = m_new
    part = (b * NQ + h) * SPLITS + tl.program_id(2)
    tl.store(pm_ptr + part, m)
    tl.store(pd_ptr + part, den)
    tl.store(pacc_ptr + part * D + d, acc)


@triton.jit
def _combined(pm_ptr, pd_ptr, pacc_ptr, b, n, inside, D: tl.constexpr, NQ: tl.constexpr, SPLITS: tl.constexpr,
              dt: tl.constexpr):
    """Values n of token b's attention output, combined from `_attend_kernel`'s splits and rounded as the torch path
    rounds it; in fp32."""
    part = (b * NQ + n // D) * SPLITS  # each value's head: its splits' running max and denominator
    top = tl.full(n.shape, -1e30, tl.float32)
    for s in tl.static_range(SPLITS):
        top = tl.maximum(top, tl.load(pm_ptr + part + s, mask=inside, other=-1e30))
    num = tl.zeros(n.shape, tl.float32)
    den = tl.zeros(n.shape, tl.float32)
    for s in tl.static_range(SPLITS):
        scale = tl.exp(tl.load(pm_ptr + part + s, mask=inside, other=-1e30) - top)
        num += scale * tl.load(pacc_ptr + (part + s) * D + n % D, mask=inside, other=0.0)
        den += scale * tl.load(pd_ptr + part + s, mask=inside, other=1.0)
    return (num / den).to(dt).to(tl.float32)


@triton.jit
def _out_kernel(pm_ptr, pd_ptr, pacc_ptr, w_ptr, x_ptr, h_ptr, H: tl.constexpr, D: tl.constexpr, NQ: tl.constexpr,
                SPLITS: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """h = x + o(y): ROWS output rows of the output projection, reduced over N = heads x head dim, where y (the
    attention output) is first combined from `_attend_kernel`'s splits."""
    N: tl.constexpr = NQ * D
    dt = h_ptr.dtype.element_ty
    b = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    n = tl.arange(0, CHUNK)
    inside = n < N
    w = tl.load(w_ptr + rows[:, None] * N + n[None, :], mask=inside[None, :], other=0.0)  # the first chunk's
    _after_previous(PDL)
    y = _combined(pm_ptr, pd_ptr, pacc_ptr, b, n, inside, D, NQ, SPLITS, dt)
    acc = tl.sum(w.to(tl.float32) * y[None, :], 1)
    for n0 in range(CHUNK, N, CHUNK):
        n = n0 + tl.arange(0, CHUNK)
        inside = n < N
        y = _combined(pm_ptr, pd_ptr, pacc_ptr, b, n, inside, D, NQ, SPLITS, dt)
        w = tl.load(w_ptr + rows[:, None] * N + n[None, :], mask=inside[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * y[None, :], 1)
    x = tl.load(x_ptr + b * H + rows).to(tl.float32)
    tl.store(h_ptr + b * H + rows, (x + acc.to(dt).to(tl.float32)).to(dt))


@triton.jit
def _router_kernel(h_ptr, nw_ptr, eps, wr_ptr, logits_ptr, H: tl.constexpr, E: tl.constexpr, ROWS: tl.constexpr,
                   CHUNK: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    o = tl.arange(0, CHUNK)
    m = o < H
    w = tl.load(wr_ptr + rows[:, None] * H + o[None, :], mask=(rows[:, None] < E) & m[None, :], other=0.0)
    _after_previous(PDL)
    h_row = h_ptr + b * H
    r = _rms_scale(h_row, eps, H, CHUNK)
    xn = _normed(h_row, nw_ptr, r, o, m)
    acc = tl.sum(w.to(tl.float32) * xn[None, :], 1)
    for c0 in range(CHUNK, H, CHUNK):
        o = c0 + tl.arange(0, CHUNK)
        m = o < H
        xn = _normed(h_row, nw_ptr, r, o, m)
        w = tl.load(wr_ptr + rows[:, None] * H + o[None, :], mask=(rows[:, None] < E) & m[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * xn[None, :], 1)
    tl.store(logits_ptr + b * E + rows, acc, mask=rows < E)


@triton.jit
def _up_kernel(h_ptr, nw_ptr, eps, logits_ptr, bias_ptr, emask_ptr, wgu_ptr, act_ptr, ids_ptr, gw_ptr, norm_min,
               routes_ptr, step_ptr, routes_sb, routes_sl, H: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
               K: tl.constexpr, SLOTS: tl.constexpr, INNER: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
               ROUTES: tl.constexpr, PDL: tl.constexpr):
    """Program (token b, slot j, rows): the token's top-k (softmax over the kept experts, selection by probability
    + correction bias, ties to the lower id, gate weights renormalised), then slot j's expert (a routed one for
    j < K, shared expert j - K after them) on ROWS rows of its gate and of its up projection, SwiGLU out. With
    ROUTES, routed slot j also writes its expert id into the recorded routes at column step - 1 (saves a cast and
    a copy kernel per layer)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    ar = tl.arange(0, E_PAD)
    inside = ar < E
    madd = tl.load(emask_ptr + ar, mask=inside, other=float("-inf"))  # 0 for a kept expert, -inf otherwise
    bias = tl.load(bias_ptr + ar, mask=inside, other=0.0)
    _after_previous(PDL)
    logit = tl.load(logits_ptr + b * E + ar, mask=inside, other=0.0) + madd
    p = tl.exp(logit - tl.max(logit, 0))
    prob = p / tl.sum(p, 0)
    score = prob + bias + madd
    # rank of each expert: how many score higher, ties to the lower id (two reductions instead of 3 per slot)
    beats = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & (ar[None, :] < ar[:, None]))
    rank = tl.sum(beats.to(tl.int32), 1)
    chosen = tl.sum(tl.where(rank < K, prob, 0.0), 0)
    mine = tl.sum(tl.where(rank == j, prob, 0.0), 0)
    e = tl.where(j < K, tl.sum(tl.where(rank == j, ar, 0), 0), E + j - K)  # else shared expert j - K
    gate_w = tl.where(j < K, mine / tl.maximum(chosen, norm_min), 1.0)
    if tl.program_id(2) == 0:
        tl.store(ids_ptr + b * SLOTS + j, e)
        tl.store(gw_ptr + b * SLOTS + j, gate_w)
        if ROUTES:
            if j < K:
                col = tl.load(step_ptr) - 1
                tl.store(routes_ptr + b * routes_sb + col * routes_sl + j, e.to(routes_ptr.dtype.element_ty))
    h_row = h_ptr + b * H
    r = _rms_scale(h_row, eps, H, CHUNK)
    rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    base = wgu_ptr + e.to(tl.int64) * (2 * INNER * H)
    g = tl.zeros((ROWS,), tl.float32)
    u = tl.zeros((ROWS,), tl.float32)
    for c0 in range(0, H, CHUNK):
        o = c0 + tl.arange(0, CHUNK)
        m = o < H
        xn = _normed(h_row, nw_ptr, r, o, m)
        wg = tl.load(base + rows[:, None] * H + o[None, :], mask=m[None, :], other=0.0).to(tl.float32)
        wu = tl.load(base + (INNER + rows)[:, None] * H + o[None, :], mask=m[None, :], other=0.0).to(tl.float32)
        g += tl.sum(wg * xn[None, :], 1)
        u += tl.sum(wu * xn[None, :], 1)
    a = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + (b * SLOTS + j) * INNER + rows, a.to(act_ptr.dtype.element_ty))


@triton.jit
def _down_kernel(h_ptr, act_ptr, ids_ptr, gw_ptr, wd_ptr, out_ptr, H: tl.constexpr, SLOTS: tl.constexpr,
                 INNER: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    _after_previous(PDL)
    b = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    acc = tl.zeros((ROWS,), tl.float32)
    for j in tl.static_range(SLOTS):
        e = tl.load(ids_ptr + b * SLOTS + j).to(tl.int64)
        gw = tl.load(gw_ptr + b * SLOTS + j)
        y = tl.zeros((ROWS,), tl.float32)
        for c0 in range(0, INNER, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            a = tl.load(act_ptr + (b * SLOTS + j) * INNER + c, mask=c < INNER, other=0.0).to(tl.float32)
            w = tl.load(wd_ptr + e * (H * INNER) + rows[:, None] * INNER + c[None, :], mask=c[None, :] < INNER,
                        other=0.0).to(tl.float32)
            y += tl.sum(w * a[None, :], 1)
        acc += y * gw
    dt = out_ptr.dtype.element_ty
    h = tl.load(h_ptr + b * H + rows).to(tl.float32)
    tl.store(out_ptr + b * H + rows, (h + acc.to(dt).to(tl.float32)).to(dt))


def _rows(kernel: str, n: int) -> int:
    """The kernel's tile rows, halved until they divide n (the rows a grid of programs splits)."""
    r = TILES[kernel].rows
    while n % r:
        r //= 2
    return r


def check_model(model) -> None:
    """Raise a one-line error naming what these kernels do not cover in `model` (they assume the model as
    transformers ships ERNIE-4.5-MoE: no projection biases, default numerics, shared experts without bias)."""
    cfg = model.cfg
    D, H, inner = cfg.dim_head, cfg.hidden_size, cfg.moe_intermediate_size
    problems = []
    if cfg.use_bias:
        problems.append("projection biases")
    if model.numerics != ops.FP32:
        problems.append(f"numerics {model.numerics}")
    if D & (D - 1) or D < 16:
        problems.append(f"head dim {D} (needs a power of two, >= 16)")
    if H % 8:
        problems.append(f"hidden size {H} (needs a multiple of 8)")
    if cfg.moe_layers and inner % 16:
        problems.append(f"expert width {inner} (needs a multiple of 16)")
    if problems:
        raise UserError("Triton decode kernels do not support " + ", ".join(problems))


def attention(blk, x_BH: torch.Tensor, cos_Bd: torch.Tensor, sin_Bd: torch.Tensor, kv: torch.Tensor,
              slot: torch.Tensor, mask_add_BL: torch.Tensor) -> torch.Tensor:
    """h = x + attention of each token over the static cache (B, nkv, L, 2D), after writing its key and value at
    column `slot` (a () long tensor). mask_add_BL: 0 for keys to attend to, -inf otherwise."""
    a = blk.attn
    B, H = x_BH.shape
    D, nq, nkv = a.d, a.nq, a.nkv
    x = x_BH.contiguous()
    pdl = use_pdl(x.device)
    q = torch.empty(B, nq * D, dtype=x.dtype, device=x.device)
    sb, sh, sl, _ = kv.stride()
    t, rows = TILES["qkv"], _rows("qkv", D)  # a program's rows stay within one head
    _qkv_kernel[(B, (nq + 2 * nkv) * D // rows)](
        x, blk.attn_norm.weight, blk.attn_norm.eps, a.qkv.weight, cos_Bd.contiguous(), sin_Bd.contiguous(), q, kv,
        slot, sb, sh, sl, H=H, D=D, NQ=nq, NKV=nkv, ROWS=rows, CHUNK=t.chunk, PDL=pdl, num_warps=t.warps,
        **launch_options(pdl))
    L = kv.shape[2]
    keys, span, splits = attention_split(L, D)
    pm = torch.empty(B, nq, splits, dtype=torch.float32, device=x.device)
    pd = torch.empty_like(pm)
    pacc = torch.empty(B, nq, splits, D, dtype=torch.float32, device=x.device)
    _attend_kernel[(B, nq, splits)](q, kv, mask_add_BL.contiguous(), pm, pd, pacc, D ** -0.5, sb, sh, sl, L=L, D=D,
                                    NQ=nq, NKV=nkv, KEYS=keys, SPAN=span, SPLITS=splits, PDL=pdl, num_warps=8,
                                    **launch_options(pdl))
    h = torch.empty_like(x)
    t, rows = TILES["out"], _rows("out", H)
    _out_kernel[(B, H // rows)](pm, pd, pacc, a.o.weight, x, h, H=H, D=D, NQ=nq, SPLITS=splits, ROWS=rows,
                                CHUNK=t.chunk, PDL=pdl, num_warps=t.warps, **launch_options(pdl))
    return h


def moe(blk, h_BH: torch.Tensor, emask_add_E: torch.Tensor, top_k: int, experts_t,
        routes: torch.Tensor | None = None, step: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h + MoE(mlp_norm(h)) for a MoE layer; returns (new hidden (B, H), expert ids (B, top_k) int32). experts_t:
    the (E + shared, out, in) expert copies of `FastDecoder`; emask_add_E: 0 for kept experts, -inf for dropped
    ones. routes (B, L, top_k), with step (a () long tensor): the ids are also written at routes[:, step - 1]."""
    mlp = blk.mlp
    B, H = h_BH.shape
    E = mlp.num_experts
    wgu, wd = experts_t
    inner = wd.shape[2]
    if mlp.shared is not None and wgu.shape[0] == E:
        raise UserError("Triton decode kernels need the shared experts folded into the expert copies")
    slots = top_k + wgu.shape[0] - E
    h = h_BH.contiguous()
    dev = h.device
    pdl = use_pdl(dev)
    logits = torch.empty(B, E, dtype=torch.float32, device=dev)
    t = TILES["router"]
    _router_kernel[(B, triton.cdiv(E, t.rows))](h, blk.mlp_norm.weight, blk.mlp_norm.eps, mlp.router, logits,
                                                H=H, E=E, ROWS=t.rows, CHUNK=t.chunk, PDL=pdl,
                                                num_warps=t.warps, **launch_options(pdl))
    act = torch.empty(B, slots, inner, dtype=h.dtype, device=dev)
    ids = torch.empty(B, slots, dtype=torch.int32, device=dev)
    gw = torch.empty(B, slots, dtype=torch.float32, device=dev)
    if routes is not None and (routes.shape[0] != B or routes.shape[2] != top_k or routes.stride(2) != 1):
        raise ValueError(f"routes {tuple(routes.shape)} do not fit a batch of {B} at top-k {top_k}")
    r_sb, r_sl = routes.stride()[:2] if routes is not None else (0, 0)
    t, rows = TILES["up"], _rows("up", inner)
    _up_kernel[(B, slots, inner // rows)](
        h, blk.mlp_norm.weight, blk.mlp_norm.eps, logits, mlp.bias, emask_add_E, wgu, act, ids, gw, mlp.norm_min,
        ids if routes is None else routes, ids if step is None else step, r_sb, r_sl, H=H, E=E,
        E_PAD=triton.next_power_of_2(E), K=top_k, SLOTS=slots, INNER=inner, ROWS=rows, CHUNK=t.chunk,
        ROUTES=routes is not None, PDL=pdl, num_warps=t.warps, **launch_options(pdl))
    out = torch.empty_like(h)
    t, rows = TILES["down"], _rows("down", H)
    _down_kernel[(B, H // rows)](h, act, ids, gw, wd, out, H=H, SLOTS=slots, INNER=inner, ROWS=rows, CHUNK=t.chunk,
                                 PDL=pdl, num_warps=t.warps, **launch_options(pdl))
    return out, ids[:, :top_k]
