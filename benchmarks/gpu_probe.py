"""GPU probe (session 5): batch-1 decode variants of `FastDecoder`, a kernel profile of the best one's step, and
routing agreement of bf16 against the fp32 CPU forward before and after brief training on the stdlib corpus.

    BUDGET=470 python benchmarks/gpu_probe.py    # on the GPU machine; writes $OUT/probe.json, prints a log
    PROBE_ONLY=train_agree STEPS=300 BIAS_RATE=0 python benchmarks/gpu_probe.py   # the routing part alone, with
                                                 # the balancing bias off (docs/benchmarks/route_agreement.md)

Its committed output (docs/benchmarks/gpu_probe.log, .json) was made before the prefill became a CUDA graph, so
its whole-call tokens/s include an eager prefill of ~50 ms; the per-step times and the routing figures stand.
Not a benchmark with targets: `benchmarks/gpu_throughput.py` is that.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_throughput as gt  # noqa: E402

from elastic_moe.config import ModelConfig  # noqa: E402
from elastic_moe.fast_decode import FastDecoder  # noqa: E402
from elastic_moe.generate import SamplingParams, generate  # noqa: E402
from elastic_moe.gpu import setup_cuda  # noqa: E402
from elastic_moe.model import ElasticMoE  # noqa: E402

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", 500))
OUT = os.environ.get("OUT", "/tmp")
R: dict = {}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    Path(OUT, "probe.json").write_text(json.dumps(R, indent=1, default=str))


def decode_variants(mb, cfg, prompts, dev):
    shared = dict(regional=False, expert_copies=True, fused_attention=True, tune=True)
    variants = [
        ("regional_gemv", dict(regional=True, expert_copies=False, fused_attention=False), 1, None),
        ("regional_gemv_copies", dict(regional=True, expert_copies=True, fused_attention=False), 1, None),
        ("step_gemv_copies", dict(regional=False, expert_copies=True, fused_attention=False), 1, None),
        ("step_gemv_copies_fattn", dict(regional=False, expert_copies=True, fused_attention=True), 1, None),
        ("step_gemv_copies_fattn_tune", shared, 1, None),
        ("step_sub_b1", shared, 1, gt.subnet(cfg)),
        ("step_b64_sorted", shared, 64, None),
    ]
    R["decode"], decs, best = {}, {}, None
    for name, kw, b, spec in variants:
        if time.time() - T0 > BUDGET * 0.55:
            log("skip", name)
            continue
        try:
            torch._dynamo.reset()
            torch.cuda.reset_peak_memory_stats()  # each variant's own peak, not the running one
            d = FastDecoder(mb, expert_path="sorted" if b == 64 else "gemv", **kw)
            r = gt.ours_decode(d, prompts[b], 128, spec, dev)
            r["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            sp = SamplingParams(max_new_tokens=32, temperature=0.0)
            rows = prompts[b][:4].tolist()
            ref, got = generate(mb, rows, sp, spec, eos_id=-1), d.generate(rows, sp, spec, eos_id=-1)
            r["same_tokens_as_generate"] = sum(a.tokens == c.tokens for a, c in zip(ref, got)) / len(rows)
            r["first_lp_diff"] = max(abs(a.logprobs[0] - c.logprobs[0]) for a, c in zip(ref, got))
            R["decode"][name], decs[name] = r, d
            log(name, f"{r['tok_s']:,.0f} tok/s step {r['step_ms']:.3f} ms first {r['first_call_s']:.1f}s "
                f"prefill {r['prefill_s'] * 1e3:.1f}ms")
            if b == 1 and spec is None and (best is None or r["tok_s"] > R["decode"][best]["tok_s"]):
                best = name
        except Exception as e:  # noqa: BLE001 - a failed variant is a result
            R["decode"][name] = traceback.format_exc()[-2000:]
            log(name, "FAILED", repr(e)[:300])
        save()
    return decs, best


def kernel_profile(d, prompts):
    from torch.profiler import ProfilerActivity, profile

    p = SamplingParams(max_new_tokens=33, temperature=0.0)
    d.generate(prompts[1].tolist(), p, None, eos_id=-1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        d.generate(prompts[1].tolist(), p, None, eos_id=-1)
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
    R["profile"] = {"kernels": len(ev), "table": prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)}
    print(R["profile"]["table"])
    log("kernel events in 32 steps + prefill:", len(ev))


def routing_after_training(model32, cfg, dev, rate=1e-3):
    """bf16 (and autocast) routes against the fp32 CPU forward at steps 0, 100, 300, 600 of training on the stdlib
    corpus as bytes (token id = byte + 3)."""
    from elastic_moe.corpus import Corpus

    data = bytearray()
    for doc in Corpus().documents(max_bytes=20_000_000):
        data += doc.text.encode()
    ids = torch.tensor(list(data), dtype=torch.long) + 3
    test, trn = ids[: 2 * 256].view(2, 256), ids[100_000:].to(dev)

    def agree(tag):
        cpu = copy.deepcopy(model32).cpu().eval()
        gaps = []  # fp32 selection score of the k-th minus the (k+1)-th expert, per (token, layer)

        def gap_hook(mod, args):
            x = args[0].float()
            s = torch.softmax(x @ mod.router.float().t(), -1) + mod.bias
            top = s.topk(cfg.moe_k + 1, -1).values
            gaps.append(top[:, -2] - top[:, -1])

        hooks = [cpu.blocks[i].mlp.register_forward_pre_hook(gap_hook) for i in cpu.moe_layers]
        with torch.no_grad():
            ref = cpu(test, return_routes=True)
        for h in hooks:
            h.remove()
        gap = torch.cat(gaps)
        bias = torch.stack([cpu.blocks[i].mlp.bias for i in cpu.moe_layers])
        del cpu
        m = copy.deepcopy(model32).to(torch.bfloat16).eval()
        with torch.no_grad():
            o = m(test.to(dev), return_routes=True)
        r = {"bf16": {"logits_rel_err": gt.rel_err(o.logits, ref.logits),
                      **gt.route_agreement(o.routes, ref.routes, cfg.moe_k)}}
        model32.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            o = model32(test.to(dev), return_routes=True)
        r["autocast"] = {"logits_rel_err": gt.rel_err(o.logits, ref.logits),
                         **gt.route_agreement(o.routes, ref.routes, cfg.moe_k)}
        del m
        r["kth_gap_median"] = gap.median().item()
        r["kth_gap_lt_1e-4"] = (gap < 1e-4).float().mean().item()
        r["bias_abs_mean"] = bias.abs().mean().item()
        model32.train()
        log("agreement", tag, r)
        return r

    R["train_agree"] = {"0": agree("step 0")}
    opt = torch.optim.AdamW(model32.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    g = torch.Generator(device=dev).manual_seed(1)
    S, step = 1024, 0
    while step < int(os.environ.get("STEPS", 600)) and time.time() - T0 < BUDGET * 0.9:
        st = torch.randint(0, len(trn) - S - 1, (8,), generator=g, device=dev)
        x = trn[st[:, None] + torch.arange(S, device=dev)]
        y = trn[st[:, None] + torch.arange(1, S + 1, device=dev)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model32.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model32.update_router_bias(rate)
        step += 1
        if step in (100, 300, 600):
            log("loss", step, loss.item())
            R["train_agree"][str(step)] = agree(f"step {step}")
            save()


def main():
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="settings by environment variable: OUT, "
                            "BUDGET, PROBE_ONLY=train_agree, STEPS, BIAS_RATE (see the module docstring)").parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_probe: needs a CUDA GPU (none visible)")
    setup_cuda()
    dev = torch.device("cuda")
    cfg = ModelConfig(**gt.BIG)
    torch.manual_seed(0)
    with torch.device(dev):
        model32 = ElasticMoE(cfg)
    mb = copy.deepcopy(model32).to(torch.bfloat16)
    mb.set_expert_backend("grouped_mm")
    mb.eval()
    gp = torch.Generator().manual_seed(2)
    prompts = {b: torch.randint(3, cfg.vocab_size, (b, 64), generator=gp) for b in (1, 64)}
    rate = float(os.environ.get("BIAS_RATE", 1e-3))
    R["bias_rate"] = rate
    if os.environ.get("PROBE_ONLY") == "train_agree":  # the routing part alone
        del mb
        routing_after_training(model32, cfg, dev, rate)
        save()
        return
    decs, best = decode_variants(mb, cfg, prompts, dev)
    try:
        log("profile", best)
        kernel_profile(decs[best], prompts)
    except Exception as e:  # noqa: BLE001
        log("profile FAILED", repr(e)[:300])
        R["profile"] = traceback.format_exc()[-2000:]
    save()
    del decs
    gc.collect()
    torch.cuda.empty_cache()
    try:
        routing_after_training(model32, cfg, dev, rate)
    except Exception as e:  # noqa: BLE001
        log("train_agree FAILED", repr(e)[:300])
        R["train_agree_error"] = traceback.format_exc()[-2000:]
    save()
    log("done")


if __name__ == "__main__":
    main()
