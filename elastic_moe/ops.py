"""The low-precision operator library shared by the trainer and the rollout engine.

Every matrix product of the model goes through `matmul` / `linear` here, under a `Numerics` setting, so that
trainer and rollout can be put on exactly the same arithmetic ("unified") or on deliberately different arithmetic
("mismatch") and the effect measured.

Precisions:
- "fp32": plain float32.
- "bf16": operands rounded to bfloat16, products accumulated in float32, result rounded to bfloat16 — what a bf16
  GEMM computes. On a CUDA GPU (or a CPU with native bf16 units) this is the native bf16 kernel; on a CPU without
  them (AVX2-only, where PyTorch's bf16 GEMM runs ~30-100x slower than fp32) the same rounding is emulated around
  an fp32 GEMM.
- "fp8": e4m3 with one scale per row of the activations and per row (output channel) or per 128x128 block of the
  weights (every weight: 2D or a stack of experts). `torch._scaled_mm` on GPUs that support it for row scaling
  (its result rounded to bf16); quantise-dequantise emulation elsewhere and for block scaling (the reference).

`Numerics.kernel` picks between two equally valid reduction orders ("default" and "split") so that two engines can
differ the way two real kernel libraries do, even at the same precision.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Numerics:
    precision: str = "fp32"  # fp32 | bf16 | fp8
    fp8_scaling: str = "row"  # row | block (weights); activations are always per row
    kernel: str = "default"  # default | split (split-K summation order, to emulate another kernel library)

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ValueError(f"unknown precision {self.precision!r} (fp32, bf16, fp8)")
        if self.fp8_scaling not in ("row", "block"):
            raise ValueError(f"unknown fp8_scaling {self.fp8_scaling!r} (row, block)")
        if self.kernel not in ("default", "split"):
            raise ValueError(f"unknown kernel {self.kernel!r} (default, split)")


FP32 = Numerics()


@functools.cache
def cpu_has_native_bf16() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in cap and _probe_fast_bf16()


def _probe_fast_bf16() -> bool:
    import time

    a = torch.randn(256, 256)
    b = a.bfloat16()
    (b @ b), (a @ a)
    t0 = time.perf_counter()
    for _ in range(4):
        b @ b
    t1 = time.perf_counter()
    for _ in range(4):
        a @ a
    t2 = time.perf_counter()
    return (t1 - t0) < 2 * (t2 - t1)


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


# the smallest amax whose scale (amax / FP8_MAX) is a normal float32: any row above it is quantised on the same
# relative grid whatever its magnitude; a row of zeros gets this scale and stays zero
_AMAX_MIN = torch.finfo(torch.float32).tiny * FP8_MAX


def _quant_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of a 2D tensor: returns (x_fp8, scale) with x ~= x_fp8 * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_AMAX_MIN)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fake_quant_fp8(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Quantise to e4m3 and back (in float32): per row, or per `block` x `block` tile when block is given."""
    if block is None:
        q, s = _quant_fp8_rows(x.reshape(-1, x.shape[-1]))
        return (q.float() * s).reshape(x.shape)
    r, c = x.shape
    pr, pc = (-r) % block, (-c) % block
    xp = F.pad(x.float(), (0, pc, 0, pr))
    tiles = xp.reshape((r + pr) // block, block, (c + pc) // block, block)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp(min=_AMAX_MIN)
    scale = amax / FP8_MAX
    deq = (tiles / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return deq.reshape(r + pr, c + pc)[:r, :c]


def _split_k_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b summed over K in two halves: the same product with another summation order."""
    k = a.shape[-1] // 2
    return a[..., :k] @ b[..., :k, :] + a[..., k:] @ b[..., k:, :]


def _effective(a: torch.Tensor, numerics: Numerics) -> tuple[Numerics, torch.dtype]:
    """Autocast asks for low precision: honour it through our own bf16 path (same rounding as a bf16 GEMM)."""
    if numerics.precision == "fp32" and torch.is_autocast_enabled(a.device.type):
        return Numerics("bf16", numerics.fp8_scaling, numerics.kernel), torch.bfloat16
    return numerics, a.dtype


def _native_bf16(device: torch.device) -> bool:
    return device.type == "cuda" or cpu_has_native_bf16()


def matmul(a: torch.Tensor, b: torch.Tensor, numerics: Numerics = FP32) -> torch.Tensor:
    """a [..., K] @ b [K, N] (or batched b) under `numerics`; the result has a's dtype (bf16 under autocast)."""
    numerics, out_dtype = _effective(a, numerics)
    mm = _split_k_matmul if numerics.kernel == "split" else torch.matmul
    if numerics.precision == "fp32":
        return mm(a, b)
    with torch.autocast(a.device.type, enabled=False):
        if numerics.precision == "bf16":
            if _native_bf16(a.device):
                return mm(a.to(torch.bfloat16), b.to(torch.bfloat16)).to(out_dtype)
            return _round_bf16(mm(_round_bf16(a.float()), _round_bf16(b.float()))).to(out_dtype)
        # fp8: straight-through estimator for gradients (quantisation treated as identity in backward)
        if _use_scaled_mm(a, b, numerics):
            return _fp8_scaled_mm(a, b).to(out_dtype)
        af = a.float()
        aq = af + (fake_quant_fp8(af.detach()) - af.detach())
        bf = b.float()
        ws = [_fake_quant_weight(w, numerics) for w in bf.detach().reshape(-1, *b.shape[-2:]).unbind(0)]
        bq = bf + (torch.stack(ws).reshape(b.shape) - bf.detach())
        return mm(aq, bq).to(out_dtype)


def _fake_quant_weight(w_KN: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    """One weight matrix [K, N] through e4m3: per output channel (column) or per 128x128 block."""
    return fake_quant_fp8(w_KN.t()).t() if numerics.fp8_scaling == "row" else fake_quant_fp8(w_KN, 128)


def _use_scaled_mm(a: torch.Tensor, b: torch.Tensor, numerics: Numerics) -> bool:
    """The real FP8 GEMM where it computes what the emulation does: rowwise scales only (block scaling is
    emulated), one 2D weight, and the dimensions `_scaled_mm` accepts (K and N multiples of 16, some rows)."""
    return (a.device.type == "cuda" and b.dim() == 2 and numerics.fp8_scaling == "row" and _scaled_mm_ok()
            and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0 and a.numel() > 0)


@functools.cache
def _scaled_mm_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability()
    return (major, minor) >= (8, 9) and hasattr(torch, "_scaled_mm")


def _fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Real FP8 GEMM (Hopper/Ada): rowwise scales for activations and weight columns. Forward only by design:
    gradients flow through the bf16 product of the dequantised operands."""
    shape = a.shape
    a2 = a.reshape(-1, shape[-1])
    aq, sa = _quant_fp8_rows(a2.detach())
    bq_t, sb = _quant_fp8_rows(b.detach().t())  # per output column
    bq_t = bq_t.contiguous()  # (N, K) row-major, so that its transpose is the column-major operand _scaled_mm needs
    out = torch._scaled_mm(aq, bq_t.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
    ref = a2.to(torch.bfloat16) @ b.to(torch.bfloat16)
    out = ref + (out - ref).detach()
    return out.reshape(*shape[:-1], b.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           numerics: Numerics = FP32) -> torch.Tensor:
    """x @ weight.T (+ bias), weight stored [out, in] as in nn.Linear."""
    if numerics.precision == "fp32" and numerics.kernel == "default" and not torch.is_autocast_enabled(x.device.type):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() <= SMALL_M * x.shape[-1]
                and not torch.is_grad_enabled()):
            return _small_m_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    y = matmul(x, weight.t(), numerics)
    return y if bias is None else y + bias.to(y.dtype)


# CPU fp32 inference products with at most this many rows (decode steps, short prompts) take _small_m_linear;
# with gradients on (training, RL and distillation losses) every product stays F.linear
SMALL_M = 64


def _small_m_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T for a few rows on a CPU. MKL's kernel for a short x times a transposed weight streams the weight
    at a fraction of the memory bandwidth (docs/LOG.md: 1.5-4x slower for 4-64 rows), while
    the same product computed as weight @ x.T does not. A single row times a large weight under torch.compile is a
    multiply-and-sum instead: the compiled reduction reads the weight with every thread, the BLAS gemv with one."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 1 and weight.shape[0] >= 2048 and torch.compiler.is_compiling():
        y = (x2[:, None, :] * weight[None]).sum(-1)
    else:
        y = torch.mm(weight, x2.t()).t().contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(torch.nn.Module):
    """nn.Linear whose product goes through the op library. `numerics` is set on the whole model at once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.numerics = FP32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.numerics)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}"


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int] | torch.Tensor, numerics: Numerics = FP32,
                   backend: str = "auto") -> torch.Tensor:
    """Rows of x [N, K], grouped consecutively by expert with `counts[e]` rows each, times w[e] [K, M] -> [N, M].

    counts: a list, or an int tensor on x's device (no host sync: `_grouped_mm` needs only the offsets).
    backend: "grouped_mm" (one `torch._grouped_mm` call), "loop" (one matmul per non-empty group, the weight
    unbound once so the backward does not materialise a full-size gradient per expert) or "auto".
    """
    if backend == "auto" or not _grouped_mm_computes(numerics):
        # fp8 and the split kernel are the loop's alone: `_grouped_mm` would compute them as bf16 / the default order
        backend = "grouped_mm" if _grouped_mm_usable(x, w, numerics) else "loop"
    if backend == "loop":
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        ws = w.unbind(0)
        outs = [matmul(xe, ws[e], numerics) for e, xe in enumerate(x.split(counts)) if counts[e]]
        if not outs:
            return matmul(x[:0], w[0], numerics)
        return torch.cat(outs) if len(outs) > 1 else outs[0]
    numerics, out_dtype = _effective(x, numerics)
    if isinstance(counts, torch.Tensor):
        offs = counts.cumsum(0, dtype=torch.int32)
    else:
        offs = torch.tensor(counts, dtype=torch.int32, device=x.device).cumsum(0, dtype=torch.int32)
    with torch.autocast(x.device.type, enabled=False):
        if numerics.precision == "fp32":
            return _grouped_mm_any(x, w, offs)
        if _native_bf16(x.device):
            return torch._grouped_mm(x.to(torch.bfloat16), w.to(torch.bfloat16), offs=offs).to(out_dtype)
        y = _grouped_mm_any(_round_bf16(x.float()), _round_bf16(w.float()), offs)
        return _round_bf16(y).to(out_dtype)


def _grouped_mm_any(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # torch.compile's shape rule for `_grouped_mm` accepts only bf16, while the CPU kernel also runs float32: under
    # compilation a float32 CPU call goes through an opaque custom op with its own shape rule and backward
    if x.dtype == torch.float32 and x.device.type == "cpu" and torch.compiler.is_compiling():
        return _grouped_mm_cpu_op(x, w, offs)
    return torch._grouped_mm(x, w, offs=offs)


@torch.library.custom_op("elastic_moe::grouped_mm_cpu", mutates_args=())
def _grouped_mm_cpu_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offs)


@_grouped_mm_cpu_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("elastic_moe::grouped_mm_cpu_grads", mutates_args=())
def _grouped_mm_cpu_grads(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                          grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the eager kernel's own backward: per group, dx = dy w^T and dw = x^T dy (offsets along the shared dim)
    return torch._grouped_mm(grad, w.transpose(-2, -1), offs=offs), torch._grouped_mm(x.t(), grad, offs=offs)


@_grouped_mm_cpu_grads.register_fake
def _(x, w, offs, grad):
    return torch.empty_like(x), torch.empty_like(w)


def _grouped_mm_cpu_backward(ctx, grad):
    # an opaque op too: a compiled backward traces this function, and the float32 shape rule would fail inside it
    x, w, offs = ctx.saved_tensors
    gx, gw = _grouped_mm_cpu_grads(x, w, offs, grad)
    return gx, gw, None


def _grouped_mm_cpu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_grouped_mm_cpu_op.register_autograd(_grouped_mm_cpu_backward, setup_context=_grouped_mm_cpu_setup)


def _cpu_grouped_mm_runs() -> bool:
    try:
        torch._grouped_mm(torch.zeros(2, 4), torch.zeros(1, 4, 4), offs=torch.tensor([2], dtype=torch.int32))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


# torch 2.6-2.7 have no `_grouped_mm`, torch 2.8 has it for CUDA only, later ones for the CPU too. Probed once at
# import, outside any compiled region (under torch.compile the probe would be traced, not run).
_CPU_GROUPED_MM = _cpu_grouped_mm_runs()


def grouped_mm_available(device_type: str) -> bool:
    """Whether this torch has a `torch._grouped_mm` kernel for the device type (on CUDA the capability check is
    left to `_grouped_mm_usable`)."""
    return _CPU_GROUPED_MM if device_type == "cpu" else hasattr(torch, "_grouped_mm")


def _grouped_mm_computes(numerics: Numerics) -> bool:
    return numerics.precision != "fp8" and numerics.kernel == "default"


def _grouped_mm_usable(x: torch.Tensor, w: torch.Tensor, numerics: Numerics) -> bool:
    if not grouped_mm_available(x.device.type) or not _grouped_mm_computes(numerics):
        return False
    # 16-byte aligned strides, in the dtype the product runs in: 8 elements in bf16 (a 16-bit model, bf16 numerics,
    # autocast), 4 in float32
    low = x.dtype == torch.bfloat16 or numerics.precision == "bf16" or torch.is_autocast_enabled(x.device.type)
    n = 8 if low or x.element_size() == 2 or w.element_size() == 2 else 4
    aligned = x.shape[-1] % n == 0 and w.shape[-1] % n == 0
    if x.device.type == "cuda":  # CUDA's grouped GEMM is bf16-only
        return low and aligned and torch.cuda.get_device_capability() >= (9, 0)
    return aligned
