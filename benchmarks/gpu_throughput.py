"""Training and decoding throughput of our model against transformers' Ernie4_5_MoeForCausalLM, on one GPU.

Same weights for both (ours exported with `hf.export_hf`, loaded with `experts_implementation="grouped_mm"`).
One run measures, in order (each section guarded; a failure is recorded and the run goes on):

1. ceilings: bf16 matmul TFLOP/s (8192^3, random data) and device-to-device copy bandwidth, in this run;
2. numerics: bf16 (pure bf16 weights, and fp32 weights under autocast) logits and routes on the GPU against the
   fp32 forward on the CPU; FP8 (`torch._scaled_mm`, per-row scales) against its CPU emulation and the K3 KL of the
   FP8 model against the bf16 one;
3. training (bf16 weights, fused AdamW, batch 8 x 2048): transformers, ours eager, ours with activation
   checkpointing, ours with the decoder blocks compiled; tokens/s, MFU against the measured matmul peak, peak memory,
   first-step (compile) time;
4. decoding (64-token prompts, 128 new tokens, greedy, batch 1 and 64): transformers plain and with a static cache
   (which transformers compiles), ours with `FastDecoder` (CUDA graphs; expert paths compared at batch 1), and the
   elastic sub-model with half the top-k, half the experts and three quarters of the layers.

    python benchmarks/gpu_throughput.py --out $OUT          # on the GPU machine
    python benchmarks/gpu_throughput.py --tiny --device cpu  # smoke test of the script itself (numbers meaningless)

Writes gpu_throughput.json / .md / .png under --out and prints the summary JSON as the last line.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, need_cuda  # noqa: E402

from elastic_moe import ops  # noqa: E402
from elastic_moe.atomic import atomic_savefig  # noqa: E402
from elastic_moe.config import ModelConfig  # noqa: E402
from elastic_moe.model import ElasticMoE  # noqa: E402
from elastic_moe.spec import SubModelSpec  # noqa: E402

T0 = time.perf_counter()

# The configuration of the issue: 1.68 B total / 0.31 B active parameters.
BIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=4, moe_num_experts=64, moe_k=6, moe_intermediate_size=512, moe_num_shared_experts=2,
           moe_layer_start_index=1, max_position_embeddings=4096, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
            moe_layer_start_index=1, max_position_embeddings=1024, tie_word_embeddings=False)


def subnet(cfg: ModelConfig) -> SubModelSpec:
    """3/4 of the layers, half the experts, half the top-k (12 layers, 32 experts, top-3 for the big config)."""
    return SubModelSpec(layers=3 * cfg.num_hidden_layers // 4, experts=cfg.moe_num_experts // 2,
                        top_k=max(1, cfg.moe_k // 2))


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ sections
def ceilings(device, tiny):
    n = 1024 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = timed(lambda: [a @ b for _ in range(10)], device) / 10
    tflops = 2 * n ** 3 / t / 1e12
    x = torch.empty(int(2e8 if not tiny else 2e6), dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    y.copy_(x)
    t = timed(lambda: [y.copy_(x) for _ in range(10)], device) / 10
    bw = 2 * x.numel() / t / 1e9
    return {"bf16_matmul_tflops": tflops, "copy_bandwidth_gbs": bw}


def route_agreement(ra: dict, rb: dict, k: int) -> dict:
    same_set, slot = [], []
    for i in ra:
        a, b = ra[i].long().cpu().sort(-1).values, rb[i].long().cpu().sort(-1).values
        same_set.append((a == b).all(-1).float().flatten())
        inter = (a[..., :, None] == b[..., None, :]).any(-1).float().sum(-1) / a.shape[-1]
        slot.append(inter.flatten())
    return {"set_agreement": torch.cat(same_set).mean().item(), "expert_agreement": torch.cat(slot).mean().item()}


def rel_err(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def numerics(model32, device, tiny):
    """model32: fp32 model on `device`. Returns metrics; leaves the model in fp32."""
    res = {}
    g = torch.Generator().manual_seed(0)
    V = model32.cfg.vocab_size
    x = torch.randint(3, V, (2, 256), generator=g)
    torch.set_num_threads(os.cpu_count() or 1)
    cpu = copy.deepcopy(model32).cpu().eval()
    with torch.no_grad():
        ref = cpu(x, return_routes=True)
    del cpu
    gc.collect()
    k = model32.cfg.moe_k
    model32.eval()
    xd = x.to(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        o = model32(xd, return_routes=True)
    res["fp32_gpu"] = {"logits_rel_err": rel_err(o.logits, ref.logits), **route_agreement(o.routes, ref.routes, k)}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        o = model32(xd, return_routes=True)
    res["autocast_bf16"] = {"logits_rel_err": rel_err(o.logits, ref.logits), **route_agreement(o.routes, ref.routes, k)}
    mb = copy.deepcopy(model32).to(torch.bfloat16)
    with torch.no_grad():
        ob = mb(xd, return_routes=True)
    res["bf16"] = {"logits_rel_err": rel_err(ob.logits, ref.logits), **route_agreement(ob.routes, ref.routes, k)}
    # FP8 through the op library (torch._scaled_mm on Hopper/Ada; emulation elsewhere)
    from elastic_moe.rl.mismatch import mismatch_metrics

    if device.type == "cuda":
        a = torch.randn(512, 1024, device=device, dtype=torch.bfloat16)
        w = torch.randn(1024, 2048, device=device, dtype=torch.bfloat16) * 0.02
        real = ops._fp8_scaled_mm(a, w).float()
        emu = ops.fake_quant_fp8(a.float()) @ ops.fake_quant_fp8(w.float().t()).t()
        exact = a.float() @ w.float()
        res["fp8_op"] = {"scaled_mm_vs_emulation_rel_err": rel_err(real, emu),
                         "scaled_mm_vs_exact_rel_err": rel_err(real, exact),
                         "emulation_vs_exact_rel_err": rel_err(emu, exact), "scaled_mm_available": ops._scaled_mm_ok()}
        M, K, N = 16384, 1024, 4096
        a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        w = torch.randn(K, N, device=device, dtype=torch.bfloat16) * 0.02
        t_bf16 = timed(lambda: a @ w, device, 5)
        t_fp8 = timed(lambda: ops._fp8_scaled_mm(a, w), device, 5)
        res["fp8_op"].update(bf16_mm_ms=t_bf16 * 1e3, fp8_mm_with_quant_ms=t_fp8 * 1e3)
    mb.set_numerics(ops.Numerics("fp8"))
    with torch.no_grad():
        o8 = mb(xd, return_routes=True)
    mb.set_numerics(ops.FP32)
    lq = torch.log_softmax(o8.logits.float(), -1)  # rollout q = fp8
    lp = torch.log_softmax(ob.logits.float(), -1)  # trainer p = bf16
    tok = torch.multinomial(lq.exp().flatten(0, 1), 1, generator=torch.Generator(device).manual_seed(0)).view(2, -1)
    logq, logp = lq.gather(-1, tok[..., None])[..., 0], lp.gather(-1, tok[..., None])[..., 0]
    L = sorted(ob.routes)
    mm = mismatch_metrics(logq, logp, torch.ones_like(logq, dtype=torch.bool),
                          torch.stack([o8.routes[i].flatten(0, 1) for i in L]),
                          torch.stack([ob.routes[i].flatten(0, 1) for i in L]))
    exact_kl = (lq.exp() * (lq - lp)).sum(-1).mean().item()
    res["fp8_vs_bf16"] = {"k3": float(mm["k3"]), "exact_kl": exact_kl, "router_flip_rate": float(mm["router_flip_rate"]),
                          "logits_rel_err_vs_fp32_cpu": rel_err(o8.logits, ref.logits),
                          **route_agreement(o8.routes, ob.routes, k)}
    del mb
    return res


def train_run(step_fn, device, steps, warmup):
    """Returns (first step s, mean steady seconds per step over `steps` consecutive steps, peak GiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = timed(step_fn, device)
    for _ in range(max(0, warmup - 1)):
        step_fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    per = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return first, per, peak


def train_ours(model, x, y, device, steps, warmup, lr=1e-5, loss_fn=None):
    from elastic_moe.gpu import fused_adamw

    model.train()
    opt = fused_adamw(model.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = loss_fn or model.loss

    def step():
        loss, _ = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = train_run(step, device, steps, warmup)
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    return out


def train_hf(hf, x, device, steps, warmup, lr=1e-5):
    from elastic_moe.gpu import fused_adamw

    hf.train()
    opt = fused_adamw(hf.parameters(), lr=lr, weight_decay=0.0)

    def step():
        out = hf(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = train_run(step, device, steps, warmup)
    opt.state.clear()
    hf.zero_grad(set_to_none=True)
    return out


def load_hf(model, device, tmp):
    import transformers

    from elastic_moe.hf import export_hf

    path = Path(tmp) / "hf"
    export_hf(model, path)
    kw = dict(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    info = {"transformers": transformers.__version__}
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm",
                                                               attn_implementation="sdpa", **kw)
        info["experts_implementation"] = getattr(hf.config, "_experts_implementation", "grouped_mm")
    except (TypeError, ValueError) as e:
        info["experts_implementation_error"] = repr(e)[:300]
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kw)
        info["experts_implementation"] = "default"
    return hf.to(device), info


def hf_decode(hf, prompts, new, device, static: bool):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"
    mask = torch.ones_like(prompts)
    t_first = timed(lambda: hf.generate(prompts, attention_mask=mask, **kw), device)
    t = timed(lambda: hf.generate(prompts, attention_mask=mask, **kw), device, 2)
    return {"tok_s": prompts.shape[0] * new / t, "first_call_s": t_first, "s": t}


def ours_decode(dec, prompts, new, spec, device, repeat=3):
    from elastic_moe.generate import SamplingParams

    p = SamplingParams(max_new_tokens=new, temperature=0.0, return_routes=True)
    rows = prompts.tolist()
    t_first = timed(lambda: dec.generate(rows, p, spec, eos_id=-1), device)
    t = timed(lambda: dec.generate(rows, p, spec, eos_id=-1), device, repeat)
    p1 = SamplingParams(max_new_tokens=1, temperature=0.0, return_routes=True)
    t1 = timed(lambda: dec.generate(rows, p1, spec, eos_id=-1), device, repeat)  # prefill + first token only
    return {"tok_s": len(rows) * new / t, "first_call_s": t_first, "s": t, "prefill_s": t1,
            "step_ms": (t - t1) / (new - 1) * 1e3}


def bytes_read(cfg: ModelConfig, model, spec, B: int) -> float:
    """Weight bytes one decode step reads (bf16; router fp32): every kept dense weight, and per MoE layer the
    expected number of distinct experts chosen by B tokens (uniform routing), plus the LM head."""
    rs = model.resolve(spec)
    H, D = cfg.hidden_size, cfg.dim_head
    attn = H * D * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 2 * H
    expert = 3 * H * cfg.moe_intermediate_size
    n = cfg.vocab_size * H  # LM head
    for i in rs.layers:
        n += attn
        if cfg.is_moe_layer(i):
            E, k = rs.num_experts(i, cfg), rs.top_k[i]
            distinct = E * (1 - (1 - k / E) ** B)
            n += distinct * expert + cfg.moe_num_shared_experts * expert + 2 * E * H
        else:
            n += 3 * H * cfg.intermediate_size
    return 2.0 * n


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "docs/benchmarks"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model: a smoke test of this script")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budget", type=float, default=570.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--report-only", metavar="FULL_JSON", help="write the report from a saved "
                    "gpu_throughput_full.json (no GPU needed)")
    ap.add_argument("--fill-from", metavar="FULL_JSON", help="with --report-only: decode sections the run skipped, "
                    "taken from a second run on the same device (ratios use that run's own full-model figure)")
    args = ap.parse_args()
    if args.report_only:
        return report_only(Path(args.report_only), args.fill_from and Path(args.fill_from), Path(args.out))
    device = torch.device(args.device)
    need_cuda(device, "gpu_throughput")
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = args.tiny
    cfgd = TINY if tiny else BIG
    B_train, S_train = (2, 64) if tiny else (8, 2048)
    prompt_len, new = (16, 16) if tiny else (64, 128)
    R = {"config": cfgd, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
         "torch": torch.__version__, "command": command_line(), "errors": {}, "timeline": {}}

    def save():
        (out_dir / "gpu_throughput_full.json").write_text(json.dumps(R, indent=1, default=str))

    def section(name, fn, need=0.0):
        left = args.budget - (time.perf_counter() - T0)
        if name in skip or left < need:
            R["errors"][name] = "skipped" if name in skip else f"skipped: {left:.0f}s left, needs ~{need:.0f}s"
            log(f"{name}: {R['errors'][name]}")
            return None
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            v = fn()
        except Exception as e:  # noqa: BLE001 - a benchmark section failing is a result to report
            R["errors"][name] = traceback.format_exc()[-3000:]
            log(f"{name} FAILED: {e!r}")
            v = None
        R["timeline"][name] = time.perf_counter() - t
        log(f"{name} done in {R['timeline'][name]:.1f}s")
        save()
        return v

    if device.type == "cuda":
        from elastic_moe.gpu import setup_cuda

        setup_cuda()
    R["ceilings"] = section("ceilings", lambda: ceilings(device, tiny)) or {}
    peak = R["ceilings"].get("bf16_matmul_tflops", float("nan")) * 1e12
    bw = R["ceilings"].get("copy_bandwidth_gbs", float("nan")) * 1e9

    cfg = ModelConfig(**cfgd)
    torch.manual_seed(0)
    with torch.device(device):
        model = ElasticMoE(cfg)
    R["params_total"] = cfg.num_params()
    R["params_active"] = cfg.num_params(active=True)
    R["subnet"] = subnet(cfg).describe()
    R["numerics"] = section("numerics", lambda: numerics(model, device, tiny))
    torch.backends.cuda.matmul.allow_tf32 = True
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.set_expert_backend("grouped_mm" if device.type == "cuda" else "auto")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    shm = Path("/dev/shm")
    tmp = tempfile.mkdtemp(dir=shm if shm.is_dir() and shutil.disk_usage(shm).free > 16e9 else None)
    hf_pack = section("hf_load", lambda: load_hf(model, device, tmp))
    hf, R["hf"] = (hf_pack if hf_pack else (None, {}))

    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, cfg.vocab_size, (B_train, S_train), generator=g).to(device)
    y = torch.randint(3, cfg.vocab_size, (B_train, S_train), generator=g).to(device)
    fpt = model.flops_per_token(S_train)
    R["flops_per_token"] = fpt
    train = {}

    def rec(name, r):
        first, per, mem = r
        tps = B_train * S_train / per
        train[name] = {"tok_s": tps, "mfu": fpt * tps / peak, "step_s": per, "first_step_s": first, "peak_gib": mem}
        log(f"  train {name}: {tps:,.0f} tok/s, MFU {train[name]['mfu']:.3f}, first {first:.1f}s, peak {mem:.1f} GiB")

    steps = args.steps
    if hf is not None:
        section("train_hf", lambda: rec("hf", train_hf(hf, x, device, steps, 2)), need=30)
    section("train_ours_eager", lambda: rec("ours_eager", train_ours(model, x, y, device, steps, 2)), need=20)

    def ac():
        from elastic_moe.gpu import apply_activation_checkpointing, remove_activation_checkpointing

        apply_activation_checkpointing(model)
        try:
            rec("ours_eager_actckpt", train_ours(model, x, y, device, max(2, steps // 2), 1))
        finally:
            remove_activation_checkpointing(model)

    section("train_ours_actckpt", ac, need=20)

    def compiled():
        from elastic_moe.gpu import compile_blocks, lm_loss_fn, uncompile_blocks

        compile_blocks(model)
        try:
            rec("ours_compiled", train_ours(model, x, y, device, steps, 2))
            rec("ours_compiled_fused_loss", train_ours(model, x, y, device, steps, 2, loss_fn=lm_loss_fn(model)))
        finally:
            uncompile_blocks(model)

    section("train_ours_compiled", compiled, need=90)
    R["train"] = train
    R["train"]["batch"], R["train"]["seq"] = B_train, S_train
    x = y = None  # noqa: F841
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- decode
    model.eval()
    dec = {}
    gp = torch.Generator().manual_seed(2)
    prompts = {b: torch.randint(3, cfg.vocab_size, (b, prompt_len), generator=gp) for b in (1, 64)}
    from elastic_moe.fast_decode import FastDecoder

    if hf is not None:
        hf.eval()
        with torch.no_grad():
            for b in (1, 64):
                r = section(f"hf_plain_b{b}", lambda b=b: hf_decode(hf, prompts[b].to(device), new, device, False),
                            need=30)
                if r:
                    dec[f"hf_plain_b{b}"] = r

        with torch.no_grad():  # transformers compiles its static-cache generate for each batch size
            for b in (1, 64):
                r = section(f"hf_static_compiled_b{b}",
                            lambda b=b: hf_decode(hf, prompts[b].to(device), new, device, True), need=75)
                if r:
                    dec[f"hf_static_compiled_b{b}"] = r

    static_on_cpu = device.type != "cuda"
    decs = {}
    # decoder variants: regional = the pieces of a layer compiled once per layer kind (fast to compile); step = the
    # whole step compiled once per spec (slower to compile, fuses across pieces and layers)
    variants = {"gemv": dict(expert_path="gemv"), "sorted": dict(expert_path="sorted"),
                "gathered": dict(expert_path="gathered"), "gemv_step": dict(expert_path="gemv", regional=False),
                "sorted_step": dict(expert_path="sorted", regional=False),
                "triton": dict(triton_kernels=True)}

    def run_ours(tag, variant, b, spec):
        if variant not in decs:  # min_cache: the 1-token calls that time the prefill reuse the same graphs
            decs[variant] = FastDecoder(model, compile=not static_on_cpu, static_on_cpu=static_on_cpu,
                                        min_cache=1 << (prompt_len + new - 1).bit_length(), **variants[variant])
        r = ours_decode(decs[variant], prompts[b], new, spec, device)
        dec[tag] = r
        log(f"  {tag}: {r['tok_s']:,.0f} tok/s, step {r['step_ms']:.3f} ms (first call {r['first_call_s']:.1f}s)")
        return r

    b1_variants = ("triton", "gemv", "gemv_step", "sorted") if device.type == "cuda" else ("gemv", "gemv_step", "sorted")
    for v in b1_variants:
        section(f"ours_b1_{v}", lambda v=v: run_ours(f"ours_b1_{v}", v, 1, None), need=70 if "step" in v else 30)
    b1 = {v: dec[f"ours_b1_{v}"]["tok_s"] for v in b1_variants if f"ours_b1_{v}" in dec}
    best_b1 = max(b1, key=b1.get) if b1 else "sorted"
    R["best_b1_expert_path"] = best_b1
    section("ours_b64", lambda: run_ours("ours_b64", "sorted", 64, None), need=40)
    section("ours_sub_b1", lambda: run_ours("ours_sub_b1", best_b1, 1, subnet(cfg)), need=70)
    section("ours_sub_b64", lambda: run_ours("ours_sub_b64", "sorted", 64, subnet(cfg)), need=40)

    def switch():
        d = decs[best_b1]
        from torch._dynamo.utils import counters

        before = (d.captures, dict(counters["stats"]).get("unique_graphs", 0))
        t_full = ours_decode(d, prompts[1], new, None, device, 1)["s"]
        t_sub = ours_decode(d, prompts[1], new, subnet(cfg), device, 1)["s"]
        t_full2 = ours_decode(d, prompts[1], new, None, device, 1)["s"]
        after = (d.captures, dict(counters["stats"]).get("unique_graphs", 0))
        return {"new_captures": after[0] - before[0], "new_compiled_graphs": after[1] - before[1],
                "full_s": t_full, "sub_s": t_sub, "full_again_s": t_full2}

    R["spec_switch"] = section("spec_switch", switch, need=10)

    def ours_vs_generate():
        from elastic_moe.generate import SamplingParams, generate

        p = SamplingParams(max_new_tokens=32, temperature=0.0, return_routes=True)
        rows = prompts[1].tolist()  # batch 1: the graphs the timed runs captured
        a = generate(model, rows, p, None, eos_id=-1)
        b = decs[best_b1].generate(rows, p, None, eos_id=-1)
        same_tok = sum(x.tokens == y.tokens for x, y in zip(a, b)) / len(a)
        lp = max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x.logprobs, y.logprobs)
                 if x.tokens[:len(x.logprobs)] == y.tokens[:len(y.logprobs)])
        return {"same_tokens_frac": same_tok, "max_abs_logprob_diff": lp}

    R["decode_vs_generate"] = section("decode_vs_generate", ours_vs_generate, need=10)
    section("ours_b64_step", lambda: run_ours("ours_b64_step", "sorted_step", 64, None), need=70)
    section("ours_b1_gathered", lambda: run_ours("ours_b1_gathered", "gathered", 1, None), need=40)
    R["decode"] = dec

    # ---------------------------------------------------------------- summary
    S = summarize(R, cfg, model, bw)
    R["summary"] = S
    save()
    (out_dir / "gpu_throughput.json").write_text(json.dumps(S, indent=1) + "\n")
    try:
        write_md(R, S, out_dir)
        plot(R, out_dir)
    except Exception:  # noqa: BLE001
        R["errors"]["report"] = traceback.format_exc()[-2000:]
        save()
    table(R, S)
    print(json.dumps(S))


def fill_decode(R: dict, R2: dict) -> None:
    """Decode sections that R skipped, from a second run R2 on the same device. Each keeps its own run's full-model
    tok/s as `reference_tok_s`, so a sub-model's speed-up is a ratio within one run."""
    if (R["device"], R["torch"]) != (R2["device"], R2["torch"]):
        raise SystemExit(f"--fill-from: {R2['device']} / torch {R2['torch']} is not the run's "
                         f"{R['device']} / torch {R['torch']}")
    d2 = R2.get("decode", {})
    for k, v in d2.items():
        if k in R["decode"] or k not in R["errors"]:
            continue
        ref = "ours_b64" if k.endswith("b64") else f"ours_b1_{R2.get('best_b1_expert_path')}"
        R["decode"][k] = dict(v, from_second_run=True, reference_tok_s=d2.get(ref, {}).get("tok_s"))
        del R["errors"][k]


def report_only(full_json: Path, fill_from: Path | None, out_dir: Path) -> None:
    R = json.loads(full_json.read_text())
    if fill_from:
        fill_decode(R, json.loads(fill_from.read_text()))
    cfg = ModelConfig(**R["config"])
    torch.set_default_dtype(torch.bfloat16)  # only shapes and the expert order are read (a CPU model: ~3 GB)
    try:
        model = ElasticMoE(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    bw = (R.get("ceilings") or {}).get("copy_bandwidth_gbs", float("nan")) * 1e9
    S = summarize(R, cfg, model, bw)
    R["summary"] = S
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_throughput.json").write_text(json.dumps(S, indent=1) + "\n")
    write_md(R, S, out_dir)
    plot(R, out_dir)
    table(R, S)
    print(json.dumps(S))


def summarize(R, cfg, model, bw):
    tr, dec = R.get("train", {}), R.get("decode", {})
    g = lambda d, *k: (d.get(k[0], {}) or {}).get(k[1]) if len(k) == 2 else d.get(k[0])  # noqa: E731
    best_train = max((v for k, v in tr.items() if k.startswith("ours") and isinstance(v, dict)),
                     key=lambda v: v["tok_s"], default=None)
    S = {"device": R["device"]}
    S["mfu"] = best_train["mfu"] if best_train else None
    S["train_speedup_vs_hf"] = best_train["tok_s"] / tr["hf"]["tok_s"] if best_train and "hf" in tr else None
    b1 = max((v["tok_s"] for k, v in dec.items() if k.startswith("ours_b1_")), default=None)
    S["decode_b1_tok_s"] = b1
    S["decode_b64_tok_s"] = max(filter(None, [g(dec, "ours_b64", "tok_s"), g(dec, "ours_b64_step", "tok_s")]),
                                default=None)
    hf1 = max(filter(None, [g(dec, "hf_static_compiled_b1", "tok_s"), g(dec, "hf_plain_b1", "tok_s")]), default=None)
    hf64 = max(filter(None, [g(dec, "hf_static_compiled_b64", "tok_s"), g(dec, "hf_plain_b64", "tok_s")]), default=None)
    S["hf_best_b1_tok_s"], S["hf_best_b64_tok_s"] = hf1, hf64
    S["decode_b1_speedup_vs_hf_compiled"] = b1 / hf1 if b1 and hf1 else None
    S["decode_b64_speedup_vs_hf_compiled"] = S["decode_b64_tok_s"] / hf64 if S["decode_b64_tok_s"] and hf64 else None
    floor_b1 = bw / bytes_read(cfg, model, None, 1) if bw == bw else None
    S["bandwidth_bound_b1_tok_s"] = floor_b1
    S["bandwidth_frac_b1"] = b1 / floor_b1 if b1 and floor_b1 else None
    eff = {}
    for b in (1, 64):
        full, sub = g(dec, f"ours_b{b}" if b == 64 else f"ours_b1_{R.get('best_b1_expert_path')}", "tok_s"), \
            g(dec, f"ours_sub_b{b}", "tok_s")
        full = (dec.get(f"ours_sub_b{b}") or {}).get("reference_tok_s") or full  # a filled-in section's own run
        ratio = bytes_read(cfg, model, None, b) / bytes_read(cfg, model, subnet(cfg), b)
        if full and sub:
            eff[f"b{b}"] = {"speedup": sub / full, "bytes_ratio": ratio, "efficiency": (sub / full) / ratio}
    S["subnet_speedup_efficiency"] = eff.get("b1", {}).get("efficiency")
    S["subnet"] = eff
    S["targets"] = {
        "mfu>=0.35": bool(S["mfu"] and S["mfu"] >= 0.35),
        "decode_b1>=1500": bool(b1 and b1 >= 1500),
        "decode_b64>=5x_hf_best": bool(S["decode_b64_speedup_vs_hf_compiled"] and S["decode_b64_speedup_vs_hf_compiled"] >= 5),
        "subnet_efficiency>=0.7": bool(S["subnet_speedup_efficiency"] and S["subnet_speedup_efficiency"] >= 0.7),
    }
    n = R.get("numerics") or {}
    S["numerics"] = {k: n.get(k) for k in ("bf16", "autocast_bf16", "fp32_gpu", "fp8_vs_bf16", "fp8_op")}
    S["errors"] = sorted(R["errors"])
    return S


def table(R, S):
    print("\n=== gpu_throughput:", R["device"], "===")
    for k, v in R.get("train", {}).items():
        if isinstance(v, dict):
            print(f"train {k:22s} {v['tok_s']:>10,.0f} tok/s  MFU {v['mfu']:.3f}  first {v['first_step_s']:6.1f}s  "
                  f"peak {v['peak_gib']:5.1f} GiB")
    for k, v in R.get("decode", {}).items():
        extra = f"  step {v['step_ms']:.3f} ms  prefill {v['prefill_s'] * 1e3:.1f} ms" if "step_ms" in v else ""
        print(f"decode {k:24s} {v['tok_s']:>10,.0f} tok/s  first call {v['first_call_s']:6.1f}s{extra}")
    for k in ("mfu", "train_speedup_vs_hf", "decode_b1_tok_s", "decode_b1_speedup_vs_hf_compiled",
              "decode_b64_speedup_vs_hf_compiled", "bandwidth_frac_b1", "subnet_speedup_efficiency"):
        print(f"{k:36s} {S.get(k)}")
    print("targets:", S["targets"], "errors:", S["errors"])


def fmt(v, spec=",.0f"):
    return "n/a" if v is None else format(v, spec)


def write_md(R, S, out_dir):
    tr, dec = R.get("train", {}), R.get("decode", {})
    c = R.get("ceilings", {})
    lines = [
        "# GPU throughput: elastic-moe against transformers' Ernie4_5_MoeForCausalLM",
        "",
        f"Written by `benchmarks/gpu_throughput.py` on **{R['device']}** (torch {R['torch']}, transformers "
        f"{R.get('hf', {}).get('transformers', 'n/a')}, experts implementation "
        f"`{R.get('hf', {}).get('experts_implementation', 'n/a')}`). Model: {R['params_total'] / 1e9:.2f} B total / "
        f"{R['params_active'] / 1e9:.2f} B active parameters (hidden 1024, 16 layers, 16/4 heads, 64 experts of "
        "width 512, top-6, 2 shared experts, first layer dense, vocab 32000); same weights for both.",
        "",
        f"Ceilings measured in this run: bf16 matmul {fmt(c.get('bf16_matmul_tflops'), '.0f')} TFLOP/s "
        f"(8192^3, random data), device copy {fmt(c.get('copy_bandwidth_gbs'), ',.0f')} GB/s (read + write).",
        "",
        "## Training (bf16 weights, fused AdamW, batch "
        f"{tr.get('batch')} x {tr.get('seq')})",
        "",
        "| run | tokens/s | MFU | first step (s) | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, v in tr.items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {v['tok_s']:,.0f} | {v['mfu']:.1%} | {v['first_step_s']:.1f} | {v['peak_gib']:.1f} |")
    lines += ["", f"MFU = {R.get('flops_per_token', 0) / 1e9:.2f} GFLOP/token x tokens/s / measured matmul peak.",
              "", "## Decoding (64-token prompts, 128 new tokens, greedy; wall time of the whole call incl. prefill)",
              "", "| run | tokens/s | first call (s) | per decode step (ms) | prefill + 1 token (ms) |",
              "|---|---:|---:|---:|---:|"]
    for k, v in dec.items():
        step = f"{v['step_ms']:.3f}" if "step_ms" in v else ""
        pre = f"{v['prefill_s'] * 1e3:.1f}" if "prefill_s" in v else ""
        lines.append(f"| {k}{' (second run)' if v.get('from_second_run') else ''} | {v['tok_s']:,.0f} | "
                     f"{v['first_call_s']:.1f} | {step} | {pre} |")
    second = {k: v for k, v in dec.items() if v.get("from_second_run")}
    if second:
        lines += ["", "Rows marked (second run) were skipped in this run and come from a second run on the same "
                  "machine (`--report-only RUN.json --fill-from SECOND.json`); a sub-model's speed-up below is taken "
                  "within that run, against its own "
                  "full-model figure (" + ", ".join(f"{k}: {fmt(v.get('reference_tok_s'))} tok/s"
                                                    for k, v in second.items()) + ")."]
    sw = R.get("spec_switch") or {}
    dg = R.get("decode_vs_generate") or {}
    lines += ["", "Variants: `gemv` / `sorted` / `gathered` = expert path, pieces of a layer compiled once per layer "
              "kind (regional); `_step` = the whole step compiled once per spec; `triton` = every layer of a decode step "
              "as six hand-written Triton kernels (`elastic_moe/triton_decode.py`), the head compiled. Every run of "
              "ours: a CUDA graph per decode step and one per prefill.", "",
              f"Sub-model: `{R['subnet']}`. Spec switch full -> sub -> full after first use: "
              f"{sw.get('new_captures', 'n/a')} new graph captures, {sw.get('new_compiled_graphs', 'n/a')} new "
              f"compiled graphs. Greedy tokens of the best batch-1 engine against the eager `generate` (32 tokens, "
              f"bf16): same tokens {fmt(dg.get('same_tokens_frac'), '.0%')}, largest log-prob difference "
              f"{fmt(dg.get('max_abs_logprob_diff'), '.3f')}.", ""]
    lines += ["## Summary", "", "| metric | value | target | met |", "|---|---:|---|---|"]
    t = S["targets"]
    lines += [
        f"| MFU (best of ours) | {fmt(S['mfu'], '.1%')} | >= 35% | {'yes' if t['mfu>=0.35'] else '**no**'} |",
        f"| training speed-up vs transformers | {fmt(S['train_speedup_vs_hf'], '.2f')}x | | |",
        f"| decode tokens/s, batch 1 | {fmt(S['decode_b1_tok_s'])} | >= 1,500 | {'yes' if t['decode_b1>=1500'] else '**no**'} |",
        f"| decode speed-up vs transformers' best, batch 1 | {fmt(S['decode_b1_speedup_vs_hf_compiled'], '.1f')}x | | |",
        f"| decode speed-up vs transformers' best, batch 64 | {fmt(S['decode_b64_speedup_vs_hf_compiled'], '.1f')}x | >= 5x | "
        f"{'yes' if t['decode_b64>=5x_hf_best'] else '**no**'} |",
        f"| batch-1 decode / bandwidth bound ({fmt(S['bandwidth_bound_b1_tok_s'])} tok/s) | "
        f"{fmt(S['bandwidth_frac_b1'], '.1%')} | | |",
        f"| sub-model speed-up / active-bytes ratio, batch 1 | {fmt(S['subnet_speedup_efficiency'], '.2f')} | >= 0.70 | "
        f"{'yes' if t['subnet_efficiency>=0.7'] else '**no**'} |",
    ]
    for b, e in S.get("subnet", {}).items():
        lines.append(f"| sub-model {b}: speed-up {e['speedup']:.2f}x, bytes ratio {e['bytes_ratio']:.2f} | "
                     f"{e['efficiency']:.2f} | | |")
    n = R.get("numerics") or {}
    lines += ["", "## Numerics (against the fp32 forward on the CPU; 2 x 256 random tokens)", "",
              "| path | logits rel. L2 error | same expert set per (token, layer) | chosen experts in common |",
              "|---|---:|---:|---:|"]
    for k in ("fp32_gpu", "autocast_bf16", "bf16"):
        if n.get(k):
            v = n[k]
            lines.append(f"| {k} | {v['logits_rel_err']:.2e} | {v['set_agreement']:.2%} | {v['expert_agreement']:.2%} |")
    if n.get("fp8_vs_bf16"):
        v = n["fp8_vs_bf16"]
        lines += ["", f"FP8 (e4m3, per-row scales, `torch._scaled_mm` for every 2-D weight; experts per expert) "
                  f"against bf16: K3 KL {v['k3']:.2e} (exact KL {v['exact_kl']:.2e}), router flip rate "
                  f"{v['router_flip_rate']:.2%}, logits rel. error vs fp32 CPU {v['logits_rel_err_vs_fp32_cpu']:.2e}."]
    if n.get("fp8_op"):
        v = n["fp8_op"]
        lines += [f"FP8 op: `_scaled_mm` vs the CPU quantise-dequantise emulation rel. error "
                  f"{v['scaled_mm_vs_emulation_rel_err']:.2e} (vs exact {v['scaled_mm_vs_exact_rel_err']:.2e}); "
                  f"16384x1024x4096: bf16 {v['bf16_mm_ms']:.3f} ms, fp8 incl. quantisation {v['fp8_mm_with_quant_ms']:.3f} ms."]
    run_cmd = R.get("command")
    lines += ["", f"Reproduce on one GPU (about 6 minutes): `{run_cmd}`." if run_cmd else
              "The command of the run was not recorded (a run made before it was)."]
    if command_line() != run_cmd:  # --report-only
        lines.append(f"This report was written from the run's saved results by `{command_line()}`.")
    if R["errors"]:
        lines += ["", "## Sections that failed or were skipped", ""]
        for k, v in R["errors"].items():
            lines.append(f"- `{k}`: {v.strip().splitlines()[-1][:300] if v.strip() else v}")
    (out_dir / "gpu_throughput.md").write_text("\n".join(lines) + "\n")


def plot(R, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    tr = {k: v for k, v in R.get("train", {}).items() if isinstance(v, dict)}
    axes[0].bar(list(tr), [v["tok_s"] for v in tr.values()], color="tab:blue")
    axes[0].set_title("training tokens/s (bf16, 8x2048)")
    axes[0].tick_params(axis="x", rotation=30)
    for j, b in enumerate((1, 64)):
        d = {k: v for k, v in R.get("decode", {}).items() if k.endswith(f"b{b}") or f"_b{b}_" in k}
        ax = axes[1 + j]
        ax.bar(list(d), [v["tok_s"] for v in d.values()],
               color=["tab:gray" if k.startswith("hf") else "tab:orange" for k in d])
        ax.set_yscale("log")
        ax.set_title(f"decode tokens/s, batch {b}")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"elastic-moe vs transformers on {R['device']}")
    fig.tight_layout()
    atomic_savefig(fig, out_dir / "gpu_throughput.png", dpi=90)


if __name__ == "__main__":
    main()
