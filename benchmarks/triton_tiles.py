"""Tile sizes of the Triton decode kernels (`elastic_moe/triton_decode.py`) at batch 1 on a GPU.

A batch-1 decode step is bound by memory latency: every loop iteration of a program waits for its loads. This
times whole greedy decodes (64-token prompt, 128 new tokens, the GPU config of `gpu_throughput.py`, bf16) with each
candidate set of tiles, the committed `TILES` first as the reference, and checks every candidate's log-probs against
it. Writes triton_tiles.{json,md,png} under --out; the JSON is the last line printed.

    python3 benchmarks/triton_tiles.py --out docs/benchmarks     # on a CUDA GPU (~3 min)
    TRITON_INTERPRET=1 python3 benchmarks/triton_tiles.py --tiny --device cpu --out /tmp/tt   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, need_cuda  # noqa: E402
from gpu_throughput import BIG, TINY, ours_decode  # noqa: E402

from elastic_moe.atomic import atomic_write_text, write_figure  # noqa: E402
from elastic_moe.config import ModelConfig  # noqa: E402
from elastic_moe.model import ElasticMoE  # noqa: E402

LOGPROB_TOL = 0.05  # bf16 noise on the tokens both decodes share; a wrong kernel is far off


def candidates(td) -> dict:
    """Whole tile sets, the committed one first (the reference every other is compared with), each with
    programmatic dependent launch (`td.PDL`) as committed; `committed_with_pdl` turns it on."""
    T = td.Tile

    def tiles(qkv, out, router, up, down, chunk=1024, warps=4, down_chunk=512, down_warps=None):
        return {"qkv": T(qkv, chunk, warps), "out": T(out, chunk, warps), "router": T(router, chunk, warps),
                "up": T(up, chunk, warps), "down": T(down, down_chunk, down_warps or warps)}

    return {
        "committed": dict(td.TILES),
        "committed_with_pdl": dict(td.TILES),
        "session8_first_tiles": tiles(16, 8, 8, 16, 8, chunk=256, down_chunk=256),
        "wide_chunks": tiles(16, 8, 8, 16, 8),
        "half_rows": tiles(8, 4, 4, 8, 4),
        "half_rows_chunk512": tiles(8, 4, 4, 8, 4, chunk=512),
        "half_rows_down_w8": tiles(8, 4, 4, 8, 4, down_warps=8),
        "quarter_rows": tiles(4, 2, 2, 4, 2),
        "quarter_rows_w2": tiles(4, 2, 2, 4, 2, warps=2),
        "half_rows_quarter_moe": tiles(8, 4, 4, 4, 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--profile", action="store_true", help="also profile the committed tiles' decode per kernel")
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the .md and .png from a run's JSON; run nothing")
    args = ap.parse_args()
    if args.report_only:
        S = json.loads(Path(args.report_only).read_text())
        write_md(S, Path(args.out))
        plot(S, Path(args.out))
        print(json.dumps(S))
        return
    device = torch.device(args.device)
    need_cuda(device, "triton_tiles")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("triton_tiles: off a GPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1")
    from elastic_moe import triton_decode as td
    from elastic_moe.fast_decode import FastDecoder
    from elastic_moe.generate import SamplingParams

    if device.type == "cuda":
        from elastic_moe.gpu import setup_cuda

        setup_cuda()
    cfg = ModelConfig(**(TINY if args.tiny else BIG))
    if args.tiny:  # the kernels' smallest tiles: head dim 16
        cfg = ModelConfig(**{**TINY, "hidden_size": 64, "num_attention_heads": 4})
    prompt_len, new = (16, 8) if args.tiny else (64, 128)
    torch.manual_seed(0)
    with torch.device(device):
        model = ElasticMoE(cfg)
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    model.set_expert_backend("grouped_mm" if device.type == "cuda" else "auto")
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    greedy = SamplingParams(max_new_tokens=new, temperature=0.0, return_routes=True)
    cands = candidates(td)
    if args.only:
        cands = {k: v for k, v in cands.items() if k in args.only.split(",") or k == "committed"}
    committed, committed_pdl = dict(td.TILES), td.PDL
    rows, ref = {}, None
    for name, tiles in cands.items():
        td.TILES = tiles
        td.PDL = committed_pdl or name == "committed_with_pdl"
        pdl = td.use_pdl(device)
        t0 = time.perf_counter()
        try:
            dec = FastDecoder(model, compile=device.type == "cuda", static_on_cpu=device.type != "cuda",
                              min_cache=1 << (prompt_len + new - 1).bit_length(), triton_kernels=True)
            out = dec.generate(prompt.tolist(), greedy, None, eos_id=-1)[0]
            r = ours_decode(dec, prompt, new, None, device, repeat=args.repeat)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is a result
            rows[name] = {"error": repr(e)[:300]}
            print(f"{name}: FAILED {e!r}"[:400], flush=True)
            continue
        finally:
            td.TILES, td.PDL = committed, committed_pdl
        ref = ref or out
        # bf16 sums in another order round differently, and a near-tie then picks another greedy token: compare
        # log-probs up to the first step where the tokens part
        agree = next((i for i, (a, b) in enumerate(zip(out.tokens, ref.tokens)) if a != b), len(out.tokens))
        n_prompt = len(out.tokens) - len(out.logprobs)
        lp = max((abs(a - b) for a, b in zip(out.logprobs[:agree - n_prompt], ref.logprobs)), default=0.0)
        rows[name] = {"tiles": {k: [t.rows, t.chunk, t.warps] for k, t in tiles.items()},
                      "pdl": pdl, "tok_s": r["tok_s"], "step_ms": r["step_ms"], "prefill_ms": r["prefill_s"] * 1e3, "setup_s": time.perf_counter() - t0,
                      "same_tokens": out.tokens == ref.tokens, "tokens_agreeing": agree - n_prompt,
                      "max_abs_logprob_diff": lp}
        print(f"{name:28s} {r['tok_s']:8,.0f} tok/s  step {r['step_ms']:.3f} ms  tokens agreeing {agree - n_prompt}, "
              f"max |dlogprob| {lp:.3g}",
              flush=True)
        del dec  # its expert copies: ~3 GB for the GPU config
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not any("tok_s" in v for v in rows.values()):
        sys.exit("triton_tiles: no candidate ran (errors above); nothing written")
    prof = profile(model, prompt, greedy, device, prompt_len + new) if args.profile else None
    ok = {k: v for k, v in rows.items() if "tok_s" in v and v["max_abs_logprob_diff"] < LOGPROB_TOL}
    best = max(ok, key=lambda k: ok[k]["tok_s"]) if ok else None
    S = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
         "command": command_line(), "best": best, "best_tok_s": ok[best]["tok_s"] if best else None,
         "committed_tok_s": rows.get("committed", {}).get("tok_s"),
         "best_speedup_vs_committed": (ok[best]["tok_s"] / rows["committed"]["tok_s"]
                                       if best and "tok_s" in rows.get("committed", {}) else None),
         "candidates": rows, "profile": prof}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "triton_tiles.json").write_text(json.dumps(S, indent=1) + "\n")
    write_md(S, out_dir)
    plot(S, out_dir)
    print(json.dumps(S))


def profile(model, prompt, params, device, length) -> list[dict]:
    """Device time per kernel name over one timed greedy decode with the committed tiles (graphs replayed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from elastic_moe.fast_decode import FastDecoder

    dec = FastDecoder(model, compile=device.type == "cuda", static_on_cpu=device.type != "cuda",
                      min_cache=1 << (length - 1).bit_length(), triton_kernels=True)
    dec.generate(prompt.tolist(), params, None, eos_id=-1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as p:
        dec.generate(prompt.tolist(), params, None, eos_id=-1)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    ev = sorted(p.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:25]
    n = params.max_new_tokens
    rows = [{"name": e.key[:90], "calls": e.count, "us_per_token": getattr(e, key, 0.0) / n} for e in ev]
    for r in rows:
        print(f"  {r['us_per_token']:9.1f} us/token  {r['calls']:6d}  {r['name']}", flush=True)
    return rows


def write_md(S, out_dir: Path):
    lines = ["# Triton decode kernels: tile sizes at batch 1", "",
             f"Device: {S['device']} (torch {S['torch']}). The GPU config of `gpu_throughput.py` in bf16, greedy "
             "decode of 128 new tokens after a 64-token prompt, whole call timed (median of the repeats); tiles are "
             "(rows per program, chunk of the reduced dimension, warps) per kernel. `committed` is `TILES` as "
             "committed when the run was made: the baseline.", "",
             "Every candidate is checked against the baseline's greedy decode: the log-probs of the tokens both "
             f"pick agree within {LOGPROB_TOL} (bf16 sums in another order round differently, so a near-tie can "
             "later pick another token: the count of new tokens agreeing is shown).", "",
             "| candidate | tok/s | step ms | new tokens agreeing | max abs log-prob diff | PDL | tiles |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for k, v in S["candidates"].items():
        if "error" in v:
            lines.append(f"| {k} | failed | | | | | {v['error']} |")
            continue
        tiles = ", ".join(f"{n} {r}/{c}/{w}" for n, (r, c, w) in v["tiles"].items())
        lines.append(f"| {k} | {v['tok_s']:,.0f} | {v['step_ms']:.3f} | {v['tokens_agreeing']} | "
                     f"{v['max_abs_logprob_diff']:.2g} | {v.get('pdl', '')} | {tiles} |")
    if S.get("profile"):
        lines += ["", "Device time per kernel over one decode with the committed tiles (top 25, per new token):", "",
                  "| kernel | calls | us per token |", "| --- | ---: | ---: |"]
        lines += [f"| `{r['name']}` | {r['calls']} | {r['us_per_token']:.1f} |" for r in S["profile"]]
    lines += ["", f"Best: `{S['best']}`, {S['best_speedup_vs_committed'] or float('nan'):.2f}x the baseline.", "",
              "![tiles](triton_tiles.png)", "",
              f"Reproduce: `{S['command']}`." if S.get("command") else
              "The command of the run was not recorded (a run made before it was).", ""]
    if S.get("command") != command_line():  # --report-only
        lines += [f"This report was written from the run's saved results by `{command_line()}`.", ""]
    atomic_write_text(out_dir / "triton_tiles.md", "\n".join(lines))


def plot(S, out_dir: Path) -> None:
    ok = {k: v for k, v in S["candidates"].items() if "step_ms" in v}
    prof = (S.get("profile") or [])[:10]

    def draw(axes):
        ax = axes[0]
        ax.barh(list(ok)[::-1], [v["step_ms"] for v in ok.values()][::-1], color="tab:blue")
        ax.set_xlabel("ms per batch-1 decode step (lower is better)")
        ax.set_title(f"Triton decode tiles, {S['device']}")
        if prof:
            ax = axes[1]
            ax.barh([r["name"][:40] for r in prof][::-1], [r["us_per_token"] for r in prof][::-1], color="tab:orange")
            ax.set_xlabel("device us per token (committed tiles)")
            ax.set_title("where a step's time goes")

    write_figure(out_dir / "triton_tiles.png", draw, 2 if prof else 1, (13, 4.5))


if __name__ == "__main__":
    main()
