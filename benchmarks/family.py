"""The sub-model family of the tiny elastic pre-training run, end to end.

1. train the tiny config (configs/tiny.toml, 200 steps) or reuse the finished run in --run;
2. `family`: layers 2-4 x experts 4/6/8 x top-k 1/2 plus per-layer top-k (42 sub-models), successive halving
   down to 24 timed ones, latency at batch 1 and 8;
3. `extract` under a decode-latency budget (the median latency of the frontier), with a Hugging Face export and a
   short heal through the pre-training loop;
4. re-measure the written model's latency and compare it with the table's prediction;
5. write docs/benchmarks/family.{md,json} and the plots, print the JSON last.

    python benchmarks/family.py                      # 2 busy cores: training 4-8 min (once), the rest ~5 min
    python benchmarks/family.py --run runs/my-run    # another finished run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, command_line, machine, md_table, write_report  # noqa: E402

from elastic_moe.checkpoint import find_checkpoint, load_checkpoint  # noqa: E402
from elastic_moe.extract import Budget, extract_under_budget  # noqa: E402
from elastic_moe.family import Space, load_inputs, run_family  # noqa: E402
from elastic_moe.measure import MeasureConfig  # noqa: E402
from elastic_moe.tomlconfig import load_config  # noqa: E402
from elastic_moe.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def rel(path) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def finished_run(run: Path, steps: int) -> bool:
    try:
        return int(find_checkpoint(run).name.removeprefix("step_")) >= steps
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "tiny-family"), help="run directory (trained if unfinished)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "tiny-family-extracted"), help="extracted checkpoint")
    ap.add_argument("--heal-tokens", type=int, default=16 * 16 * 128, help="0: no healing")
    ap.add_argument("--max-measured", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one-core latency, timed in CPU time (see measure.time_models)
    run, out = Path(args.run), Path(args.out)
    t0, load0 = time.time(), os.getloadavg()

    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.toml", ["train.threads=1"])
    if not finished_run(run, cfg.train.max_steps):
        print(f"training {run} ({cfg.train.max_steps} steps of the tiny config)")
        train(cfg, run)
    inp = load_inputs(run)
    fam_dir = Path(inp.checkpoint) / "family"
    space = Space(layers=[2, 3, 4], experts=[4, 6, 8], top_k=[1, 2], per_layer_top_k=True)
    mc = MeasureConfig(batch_sizes=(1, 8))
    res = run_family(inp, fam_dir, space, mc, max_measured=args.max_measured)
    rows, meta = res.rows, res.meta
    col = meta["latency_col"]
    front = sorted((r for r in rows if r[f"front_{col}"] and r["extractable"]), key=lambda r: r[col])
    budget_ms = round(statistics.median(r[col] for r in front) * 1.02, 3)  # just above the middle of the frontier

    for p in (out, out.parent / f"{out.name}.heal", out.parent / f"{out.name}-hf"):
        shutil.rmtree(p, ignore_errors=True)
    rep = extract_under_budget(inp, out, Budget("latency_ms", budget_ms), hf_dir=out.parent / f"{out.name}-hf",
                               heal_tokens=args.heal_tokens)
    rm = rep["remeasured"]
    sub, _ = load_checkpoint(out)

    DOCS.mkdir(parents=True, exist_ok=True)
    for name in res.plots:
        shutil.copy(name, DOCS / f"family_{name.name}")
    load1 = os.getloadavg()
    headline = {
        # the table's prediction for the machine as it is now: its latency x (anchor now / the table's anchor)
        "latency_rel_error": round(rm["rel_error_machine_corrected"], 4),
        "latency_rel_error_raw": round(rm["rel_error"], 4),
        "anchor_now_over_table": round(rm["machine_factor"], 4),
        "frontier_size": len([r for r in rows if r[f"front_{col}"]]),
        "table_latency_ms": round(rm["table"], 3), "remeasured_latency_ms": round(rm["value"], 3),
        "budget_ms": budget_ms, "chosen": rep["name"], "latency": f"{col} ({meta['speed_settings']['clock']} time)",
        "space_size": meta["search"]["space_size"], "measured": meta["search"]["measured"],
        "search": meta["search"]["mode"], "loadavg_start": round(load0[0], 2), "loadavg_end": round(load1[0], 2),
        "seconds": round(time.time() - t0),
    }
    if rep.get("heal"):
        headline["heal_loss_before"] = round(rep["heal"]["heldout_loss_before"], 4)
        headline["heal_loss_after"] = round(rep["heal"]["heldout_loss_after"], 4)

    b = mc.batch_sizes
    header = ["sub-model", "layers", "experts", "top-k", "loss", "total M", "active M"]
    header += [f"{k} b{n}" for n in b for k in ("prefill ms", "decode ms", "memory MB")] + ["frontier"]
    table = [[r["name"], r["layers"], r["experts"], r["top_k"], f"{r['loss']:.4f}", f"{r['total_params'] / 1e6:.3f}",
              f"{r['active_params'] / 1e6:.3f}"]
             + [f"{r[f'{k}_b{n}']:.2f}" for n in b for k in ("prefill_ms", "decode_ms", "memory_mb")]
             + ["yes" if r[f"front_{col}"] else ""] for r in sorted(rows, key=lambda r: r[col])]
    rb, heal = rep["rebalance"], rep.get("heal")
    md = f"""# Sub-model family of the tiny elastic run

`{command_line()}` on {machine()}; load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end
(2 cores shared with other jobs). {headline['seconds']} s in all.

Checkpoint `{rel(inp.checkpoint)}`
(configs/tiny.toml: 4 layers, layer 0 dense, 8 experts top-2 in layers 1-3; 200 steps of per-sample elastic
training). Space: layers {{2, 3, 4}} x experts kept {{4, 6, 8}} x top-k {{1, 2}}, plus every per-MoE-layer mix of
top-k 1/2: {meta['search']['space_size']} sub-models; successive halving on the held-out loss
({len(meta['search']['rungs'])} rung(s): {', '.join(f"{g['candidates']} -> {g['kept']} on {g['batches']} batch(es)" for g in meta['search']['rungs'])})
left {meta['search']['measured']} to time. Loss: {mc.eval_batches} held-out batches of {mc.eval_batch_size} x
{inp.batches[0][0].shape[1]} tokens. Latency: `generate` with a {mc.prompt_len}-token prompt, {mc.decode_tokens} decode
steps, {mc.repeats} runs per sub-model round-robin, median step, on one thread in CPU time (on this box the wall
time is mostly other jobs; wall medians are in the CSV). Memory: weights + peak live tensors + KV cache.

![quality vs active parameters](family_quality_vs_active.png)
![quality vs latency](family_quality_vs_latency.png)

## Extracted under a latency budget

Budget: decode latency at batch 1 <= {budget_ms} ms/token (just above the median latency of the frontier).
Chosen: **{rep['name']}** (`{rep['spec']}`), loss {rep['family_row']['loss']:.4f}, on the frontier:
{rep['on_frontier']}. Standalone logits vs the elastic forward at that spec: max |diff| {rep['elastic_max_abs_diff']:.1e}.

| | decode ms/token (batch 1) |
|---|---|
| family table | {rm['table']:.3f} |
| full model (anchor) now / in the table | {rm['machine_factor']:.3f} |
| table's prediction for now (table x that) | {rm['table'] * rm['machine_factor']:.3f} |
| re-measured, written model | {rm['value']:.3f} |
| **relative error** (`latency_rel_error`) | **{100 * rm['rel_error_machine_corrected']:+.1f}%** |
| relative error against the table as is | {100 * rm['rel_error']:+.1f}% |

The table's latencies are scaled to the median speed of the anchor (the full model, timed in every chunk of the
family run), so its prediction for a later measurement is the table's figure times how much slower or faster the
anchor runs then; both errors are reported.

Router bias: {rb['action']} ({rb.get('updates', 0)} updates; worst max/mean expert load
{rb.get('max_over_mean_before', float('nan')):.2f} -> {rb.get('max_over_mean_after', float('nan')):.2f}; held-out loss
{rb.get('heldout_loss_before', float('nan')):.4f} -> {rb.get('heldout_loss_after', float('nan')):.4f}).
"""
    if heal:
        md += f"""
Heal: {heal['steps']} steps ({heal['tokens']:,} tokens) of continued pre-training at lr {heal['lr']:.1e} through
the pre-training loop: held-out loss {heal['heldout_loss_before']:.4f} -> {heal['heldout_loss_after']:.4f}.
The Hugging Face export is in `{rel(rep.get('hf_dir'))}` ({sub.num_params() / 1e6:.3f} M parameters).
"""
    md += "\n## All timed sub-models (sorted by decode latency at batch 1)\n\n" + md_table(header, table) + "\n"
    write_report("family", md, headline)


if __name__ == "__main__":
    main()
