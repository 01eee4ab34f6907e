"""Compile the Triton decode kernels for an H100 (sm90) with no GPU present, with the shapes of the GPU benchmark's
model, and print each kernel's register use and local (spilled) memory as JSON. Run by tests/test_triton_decode.py
in a process of its own: the tests' interpreter mode replaces the kernels with interpreted functions."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from elastic_moe import triton_decode as td
from elastic_moe.config import ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gpu_throughput import BIG  # noqa: E402

CFG = ModelConfig(**BIG)
H, D, NQ, NKV = CFG.hidden_size, CFG.dim_head, CFG.num_attention_heads, CFG.num_key_value_heads
E, INNER, K = CFG.moe_num_experts, CFG.moe_intermediate_size, CFG.moe_k
SLOTS = K + CFG.moe_num_shared_experts  # the shared experts run as extra experts of the routed width
L = 256  # the cache bucket of a 64-token prompt + 128 new tokens
bf, f32, i32, i64 = "*bf16", "*fp32", "*i32", "*i64"


def tile(kernel: str, n: int | None) -> dict:
    """The ROWS and CHUNK the launch in triton_decode gives `kernel` when its grid splits n rows (None: as is)."""
    t = td.TILES[kernel]
    return dict(ROWS=td._rows(kernel, n) if n else t.rows, CHUNK=t.chunk)


W = {k: t.warps for k, t in td.TILES.items()}
JOBS = {  # kernel: (pointer and scalar arguments, compile-time constants, warps)
    "qkv": (td._qkv_kernel, dict(x_ptr=bf, nw_ptr=bf, eps="fp32", w_ptr=bf, cos_ptr=f32, sin_ptr=f32, q_ptr=bf,
                                 kv_ptr=bf, slot_ptr=i64, kv_sb="i32", kv_sh="i32", kv_sl="i32"),
            dict(H=H, D=D, NQ=NQ, NKV=NKV, **tile("qkv", D)), W["qkv"]),
    "attend": (td._attend_kernel, dict(q_ptr=bf, kv_ptr=bf, mask_ptr=f32, pm_ptr=f32, pd_ptr=f32, pacc_ptr=f32,
                                       scale="fp32", kv_sb="i32", kv_sh="i32", kv_sl="i32"),
               dict(L=L, D=D, NQ=NQ, NKV=NKV, **dict(zip(("KEYS", "SPAN", "SPLITS"), td.attention_split(L, D)))), 8),
    "out": (td._out_kernel, dict(pm_ptr=f32, pd_ptr=f32, pacc_ptr=f32, w_ptr=bf, x_ptr=bf, h_ptr=bf),
            dict(H=H, D=D, NQ=NQ, SPLITS=td.attention_split(L, D)[2], **tile("out", H)), W["out"]),
    "router": (td._router_kernel, dict(h_ptr=bf, nw_ptr=bf, eps="fp32", wr_ptr=f32, logits_ptr=f32),
               dict(H=H, E=E, **tile("router", None)), W["router"]),
    "up": (td._up_kernel, dict(h_ptr=bf, nw_ptr=bf, eps="fp32", logits_ptr=f32, bias_ptr=f32, emask_ptr=f32,
                               wgu_ptr=bf, act_ptr=bf, ids_ptr=i32, gw_ptr=f32, norm_min="fp32", routes_ptr="*u8",
                               step_ptr=i64, routes_sb="i32", routes_sl="i32"),
           dict(H=H, E=E, E_PAD=E, K=K, SLOTS=SLOTS, INNER=INNER, ROUTES=True, **tile("up", INNER)), W["up"]),
    "down": (td._down_kernel, dict(h_ptr=bf, act_ptr=bf, ids_ptr=i32, gw_ptr=f32, wd_ptr=bf, out_ptr=bf),
             dict(H=H, SLOTS=SLOTS, INNER=INNER, **tile("down", H)), W["down"]),
}


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(x for x in text.splitlines() if "REG:" in x)
    return {kv.split(":")[0]: int(kv.split(":")[1]) for kv in line.split() if ":" in kv and kv.split(":")[1].isdigit()}


def main() -> None:
    out = {}
    for name, (fn, args, const, warps) in JOBS.items():
        # as launched on an H100 (with PDL where this Triton has it), with 16-byte aligned tensors (as torch allocates)
        const = dict(const, PDL=td.HAS_PDL)
        sig = dict(args, **{k: "constexpr" for k in const})
        aligned = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(args.values()) if v.startswith("*")}
        kernel = triton.compile(ASTSource(fn, sig, const, attrs=aligned), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps})
        out[name] = resources(kernel.asm["cubin"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
