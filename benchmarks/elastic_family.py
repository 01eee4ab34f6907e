"""ERNIE 5.0 Tables 9-11 in miniature: one elastic (once-for-all) MoE against a fixed full model and against
independently trained models of the sub-model shapes, all at the same token budget.

Runs (each in its own directory under runs/elastic_family/, reused when complete, so a crash loses nothing finished):
  fixed     the full model (4 layers, 16 experts, top-4), no elastic sampling
  elastic   the same model, per-sample elastic training (configs/elastic_family.toml [elastic])
  indep_L3  a 3-layer model (= layers {0, 2, 3} of the 4-layer one: dense layer + 2 MoE layers)
  indep_E8  8 experts per MoE layer, top-4
  indep_k2  16 experts, top-2
Then every (trained model, evaluated sub-model) pair on the same held-out batches, the EA35.8%-like sub-model
(2 layers, 8 experts, top-1), decode speed at top-1 (25% of top-4), and FLOPs / wall-time cost of the elastic run.
The fixed and elastic runs are repeated with further seeds (`--seeds`, default 0-5; runs fixed_seed1, ...): the
elastic-vs-fixed comparisons are reported per seed, the headline keys take the worst seed (a gain smaller than the
seed-to-seed spread is not a gain), and each sub-model's gain over the fixed cut also gets a 95% interval of its
mean over the seeds (paired by seed, Student's t).
Every comparison is repeated on a second test set that nothing was tuned on: pieces of the standard-library files
beyond the runs' `data.max_bytes` (read by no run, not even the tokenizer), picked by the held-out split's hash rule.
Losses are cached per run (`eval_losses.json`), so a second invocation only re-times.

    python benchmarks/elastic_family.py            # full run (15 runs, 45-70 min on one core)
    python benchmarks/elastic_family.py --quick    # smoke run (a few steps; report under runs/elastic_family_quick/)

One core: train.threads = 1 and torch.set_num_threads(1); runs are sequential. The last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, command_line, machine, md_table  # noqa: E402

from elastic_moe.atomic import atomic_savefig, atomic_write_json, atomic_write_text  # noqa: E402
from elastic_moe.checkpoint import load_checkpoint  # noqa: E402
from elastic_moe.corpus import Corpus  # noqa: E402
from elastic_moe.elastic import FULL, ElasticSampler, spec_name  # noqa: E402
from elastic_moe.generate import SamplingParams, generate  # noqa: E402
from elastic_moe.model import ElasticMoE  # noqa: E402
from elastic_moe.shards import doc_hash, heldout_batches, prepare_data, split_document  # noqa: E402
from elastic_moe.spec import SubModelSpec  # noqa: E402
from elastic_moe.tomlconfig import load_config  # noqa: E402
from elastic_moe.train import TrainConfig, make_optimizer, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ANALYSIS = "## What the numbers say"
MAX_DOC_CHARS = 32768  # prepare_data's default: documents are cut into pieces of at most this many characters
CONFIG = ROOT / "configs" / "elastic_family.toml"
NAME = "elastic_family"

FIXED = ["elastic.depth.p_full=1.0", "elastic.width.p_full=1.0", "elastic.top_k.p_full=1.0"]
RUNS = {  # name -> (overrides, the sub-model of the 4-layer/16-expert/top-4 model it has the shape of)
    "fixed": (FIXED, SubModelSpec()),
    "elastic": ([], SubModelSpec()),
    "indep_L3": (FIXED + ["model.num_hidden_layers=3"], SubModelSpec(layers=3)),
    "indep_E8": (FIXED + ["model.moe_num_experts=8"], SubModelSpec(experts=8)),
    "indep_k2": (FIXED + ["model.moe_k=2"], SubModelSpec(top_k=2)),
}
EA = SubModelSpec(layers=2, experts=8, top_k=1)  # ~36% of total, ~54% of active parameters (ERNIE's EA35.8%)
TOPK25 = SubModelSpec(top_k=1)
EVAL_SPECS = [SubModelSpec(), SubModelSpec(layers=3), SubModelSpec(experts=8), SubModelSpec(top_k=2), TOPK25,
              SubModelSpec(layers=2), EA]
INDEP_OF = {spec_name(spec): name for name, (_, spec) in RUNS.items() if name.startswith("indep")}
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student's t, 0.975, df 1-10 (df > 10 uses 10's: wider)
LABEL = {"fixed": "fixed full model, sub-model cut from it", "elastic": "elastic model",
         "indep": "independently trained at that size"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_dir(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}_seed{seed}"


def run_config(name: str, quick: bool, seed: int = 0) -> TrainConfig:
    over = list(RUNS[name][0]) + [f"train.seed={seed}"]
    if quick:
        over += ["train.max_steps=6", "train.save_every=3", "optim.warmup_steps=2", "elastic.reorder_every=2"]
    return load_config(TrainConfig, CONFIG, over)


def train_run(name: str, root: Path, quick: bool, seed: int = 0) -> dict:
    """Train one run (resuming a partial one); a complete run is recognised by its summary.json."""
    cfg = run_config(name, quick, seed)
    name = run_dir(name, seed)
    out = root / name
    done = out / "summary.json"
    if done.is_file():
        s = json.loads(done.read_text())
        if s.get("config") == json.loads(json.dumps(cfg.to_dict())):
            log(f"{name}: complete, reused ({s['elapsed_s']:.0f} s, {s['tokens']:,} tokens)")
            return s
        log(f"{name}: config changed, retraining from scratch")
        shutil.rmtree(out)  # the run cache is ours; resuming its checkpoints would continue the old config
    load0 = os.getloadavg()
    t0 = time.time()
    log(f"{name}: training {cfg.train.max_steps} steps")
    s = train(cfg, out, log=lambda m: log(f"{name}: {m}"))
    if s["interrupted"]:
        raise SystemExit(f"{name} was interrupted; run again to resume")
    keep = {k: s[k] for k in ("run_dir", "step", "tokens", "elapsed_s", "tokens_per_s", "final_loss", "params",
                              "active_params", "checkpoint", "elastic")}
    keep.update(wall_s=time.time() - t0, loadavg_start=load0, loadavg_end=os.getloadavg(),
                config=json.loads(json.dumps(cfg.to_dict())))
    done.write_text(json.dumps(keep, indent=2))
    log(f"{name}: done in {keep['elapsed_s']:.0f} s ({keep['tokens_per_s']:,.0f} tokens/s), "
        f"final train loss {keep['final_loss']:.4f}")
    return keep


@torch.no_grad()
def heldout_loss(model: ElasticMoE, batches, spec: SubModelSpec) -> float:
    model.eval()
    tot, n = 0.0, 0
    for x, y in batches:
        logits = model(x, spec).logits
        tot += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    return tot / n


def batches_fingerprint(batches) -> str:
    h = hashlib.sha256()
    for x, y in batches:
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def run_losses(run: Path, batches, fingerprint: str, specs: list[SubModelSpec]) -> dict[str, float]:
    """Loss on `batches` of each sub-model of the run's final checkpoint, cached in the run folder (which a retrain
    deletes) under the checkpoint and the token fingerprint."""
    cache_path = run / "eval_losses.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    ckpt = json.loads((run / "summary.json").read_text())["checkpoint"]
    keys = {spec_name(s): f"{Path(ckpt).name}/{fingerprint}/{spec_name(s)}" for s in specs}
    missing = [s for s in specs if keys[spec_name(s)] not in cache]
    if missing:
        model = load_checkpoint(run)[0].eval()
        for s in missing:
            cache[keys[spec_name(s)]] = heldout_loss(model, batches, s)
        atomic_write_json(cache_path, cache)
    return {name: cache[key] for name, key in keys.items()}


def unseen_test_batches(cfg: TrainConfig, root: Path, tokenizer: Path, target_bytes: int) -> list:
    """A test set no run has read: standard-library text after the runs' first `data.max_bytes` bytes (the
    corpus is read in a fixed file order), cut into documents as the shards are, and the pieces whose hash falls
    below target_bytes / (bytes available) kept, the rule that picks the held-out split."""
    dc = cfg.data
    seen, pieces = 0, []
    for doc in Corpus(dc.path).documents():
        if seen >= dc.max_bytes:
            pieces += split_document(doc.text, MAX_DOC_CHARS)
        seen += len(doc.text.encode("utf-8"))
    available = sum(len(p.encode("utf-8")) for p in pieces)
    if not available:
        raise SystemExit("elastic_family.py: error: the corpus has no text beyond data.max_bytes for the unseen test")
    cut = min(1.0, target_bytes / available) * 2**64
    path = root / "unseen_test.jsonl"
    atomic_write_text(path, "".join(json.dumps({"text": p}) + "\n" for p in pieces if doc_hash(p) < cut))
    data = prepare_data(path, None, vocab_size=cfg.model.vocab_size, seq_len=dc.seq_len, heldout_frac=0.0,
                        tokenizer=tokenizer, cache_dir=dc.cache_dir, progress=False, log=lambda m: None)
    # heldout_frac 0 still moves one document to the held-out split (neither split is left empty): take both
    return heldout_batches(data.train, 16, dc.seq_len) + heldout_batches(data.heldout, 16, dc.seq_len)


def compare(by_seed: dict, indep: dict[str, float], sub_cols: list[str]) -> dict:
    """Elastic vs fixed per seed (full-size ratio, gain over the fixed cut per sub-model, mean and 95% interval of
    each gain) and the first seed's elastic sub-models against the independently trained models."""
    first = next(iter(by_seed.values()))
    full = {sd: m["elastic"]["full"] / m["fixed"]["full"] for sd, m in by_seed.items()}
    gain = {sd: {c: 1 - m["elastic"][c] / m["fixed"][c] for c in sub_cols} for sd, m in by_seed.items()}
    stats = {c: mean_ci95([g[c] for g in gain.values()]) for c in sub_cols}
    return {"full_by_seed": full, "gain_by_seed": gain, "gain_mean": {c: v[0] for c, v in stats.items()},
            "gain_ci95": {c: list(v[1:]) for c, v in stats.items()},
            "vs_indep": {c: first["elastic"][c] / v for c, v in indep.items()}}


def elastic_flops(cfg: TrainConfig, model: ElasticMoE) -> tuple[float, float, dict]:
    """Training FLOPs of the elastic run (replaying its sampler: a pure function of seed/step/row) and of the
    fixed run with the same tokens; and how often each sub-model was drawn."""
    sampler = ElasticSampler(cfg.elastic, cfg.model, cfg.train.seed)
    seq, cache, counts = cfg.data.seq_len, {}, {}
    el = 0.0
    for step in range(cfg.train.max_steps):
        for micro in range(cfg.train.grad_accum):
            for s in sampler.step_specs(step, micro, cfg.train.batch_size):
                if s not in cache:
                    cache[s] = model.flops_per_token(seq, s)
                el += cache[s] * seq
                counts[spec_name(s)] = counts.get(spec_name(s), 0) + 1
    rows = cfg.train.max_steps * cfg.train.grad_accum * cfg.train.batch_size
    return el, model.flops_per_token(seq) * seq * rows, counts


def interleaved_step_times(cfg: TrainConfig, data, steps: int) -> dict:
    """Training-step time of the fixed recipe (every row the full model) and of the elastic one (the rows' sampled
    sub-models), measured alternately on one fresh model and the same batches, so that load changes on the shared
    machine hit both alike. Median seconds per step; the model and optimizer are those of the training loop."""
    torch.manual_seed(0)
    model = ElasticMoE(cfg.model).train()
    opt = make_optimizer(model, cfg.optim, torch.device("cpu"))
    sampler = ElasticSampler(cfg.elastic, cfg.model, cfg.train.seed)
    stream = data.train_stream(cfg.train.batch_size, seed=cfg.train.seed)
    times = {"fixed": [], "elastic": []}
    for i in range(steps + 1):
        x, y = stream.next_batch()
        for kind in ("fixed", "elastic") if i % 2 else ("elastic", "fixed"):
            # steps after the full-model-only start, where the elastic rows are drawn
            step = cfg.elastic.full_steps + i
            specs = sampler.step_specs(step, 0, cfg.train.batch_size) if kind == "elastic" else [FULL] * len(x)
            t = time.perf_counter()
            logits = model(x, sampler.resolve(model, specs)).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_bias(cfg.train.router_bias_rate)
            if i:  # the first pair is warm-up
                times[kind].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def mean_ci95(xs: list[float]) -> tuple[float, float, float]:
    """Mean and the two ends of its two-sided 95% Student's t interval."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, float("nan"), float("nan")
    half = T975[min(len(xs) - 1, len(T975)) - 1] * statistics.stdev(xs) / len(xs) ** 0.5
    return m, m - half, m + half


def decode_speed(model: ElasticMoE, prompts: list[list[int]], new: int, repeats: int) -> dict:
    """Median seconds of greedy decoding at the full top-k and at top-1, measured interleaved."""
    params = SamplingParams(max_new_tokens=new, temperature=0)
    times = {"full": [], "k1": []}
    specs = {"full": None, "k1": TOPK25}
    for spec in specs.values():  # warm-up
        generate(model, prompts, params, spec=spec, eos_id=-1)
    for _ in range(repeats):
        for name, spec in specs.items():
            t = time.perf_counter()
            generate(model, prompts, params, spec=spec, eos_id=-1)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def plot(matrix: dict, cols: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = [("elastic", "elastic model", "tab:blue"), ("fixed", "cut from the fixed model", "tab:gray"),
              ("indep", "independently trained", "tab:orange")]
    w = 0.27
    for j, (key, label, color) in enumerate(series):
        xs, ys = [], []
        for i, c in enumerate(cols):
            v = matrix[key].get(c)
            if v is not None:
                xs.append(i + (j - 1) * w)
                ys.append(v)
        bars = ax.bar(xs, ys, w, label=label, color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    allv = [v for m in matrix.values() for v in m.values()]
    ax.set_ylim(min(allv) - 0.15, max(allv) + 0.25)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_xlabel("evaluated sub-model (L = layers kept, E = experts kept, k = top-k; full = 4 layers, 16 experts, top-4)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Elastic family: held-out loss per evaluated sub-model and trained model (equal tokens)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: a few steps, report under the run folder")
    ap.add_argument("--root", default=None, help="run cache folder (default runs/elastic_family[_quick])")
    ap.add_argument("--eval-batches", type=int, default=None, help="held-out batches of 16 (default: all, max 40)")
    ap.add_argument("--unseen-bytes", type=int, default=None,
                    help="about how many bytes of unread standard-library text the second test set takes (default 300000)")
    ap.add_argument("--seeds", default="0,1,2,3,4,5",
                    help="comma-separated seeds: the first trains all five runs, the others the fixed and elastic runs")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"elastic_family.py: error: --seeds needs distinct integers, got {args.seeds!r}")
    torch.set_num_threads(1)
    root = Path(args.root) if args.root else ROOT / "runs" / (NAME + ("_quick" if args.quick else ""))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load_start = os.getloadavg()

    summaries = {name: train_run(name, root, args.quick, seeds[0]) for name in RUNS}
    extra = {seed: {name: train_run(name, root, args.quick, seed) for name in ("fixed", "elastic")}
             for seed in seeds[1:]}
    torch.set_num_threads(1)

    # ---- held-out data: the runs' shared tokenizer and shards
    cfg = run_config("elastic", args.quick, seeds[0])
    dc = cfg.data
    data = prepare_data(dc.path, None, vocab_size=cfg.model.vocab_size, seq_len=dc.seq_len,
                        heldout_frac=dc.heldout_frac, tokenizer_sample_mb=dc.tokenizer_sample_mb,
                        max_bytes=dc.max_bytes, tokenizer=root / run_dir("elastic", seeds[0]) / "tokenizer",
                        cache_dir=dc.cache_dir,
                        progress=False, log=lambda m: None)
    nb = args.eval_batches or (2 if args.quick else 40)
    batches = data.heldout_batches(16, nb)
    eval_tokens = sum(y.numel() for _, y in batches)
    log(f"evaluating on {len(batches)} held-out batches ({eval_tokens:,} tokens)")

    unseen_bytes = args.unseen_bytes or (20_000 if args.quick else 300_000)
    unseen_batches = unseen_test_batches(cfg, root, root / run_dir("elastic", seeds[0]) / "tokenizer", unseen_bytes)
    unseen_tokens = sum(y.numel() for _, y in unseen_batches)
    log(f"unseen test: {len(unseen_batches)} batches ({unseen_tokens:,} tokens)")

    # ---- the matrix: every run's sub-models on both test sets (the same tokenizer for all: trained on the data,
    # not the seed)
    models = {name: load_checkpoint(root / run_dir(name, seeds[0]))[0].eval() for name in RUNS}
    cols = [spec_name(s) for s in EVAL_SPECS]
    sub_cols = [c for c in cols if c != "full"]

    def evaluate(test_batches, label: str) -> tuple[dict, dict]:
        fp = batches_fingerprint(test_batches)
        by_seed = {}
        for seed in seeds:
            by_seed[seed] = {key: run_losses(root / run_dir(key, seed), test_batches, fp, EVAL_SPECS)
                             for key in ("elastic", "fixed")}
            for key, losses in by_seed[seed].items():
                log(f"{label}, seed {seed} {key}: " + ", ".join(f"{c} {v:.4f}" for c, v in losses.items()))
        indep = {spec_name(shape): run_losses(root / name, test_batches, fp, [SubModelSpec()])["full"]
                 for name, (_, shape) in RUNS.items() if name.startswith("indep")}
        log(f"{label}, independent models at their own shapes: " + ", ".join(f"{c} {v:.4f}" for c, v in indep.items()))
        return by_seed, indep

    by_seed, indep = evaluate(batches, "held-out")
    matrix = {"elastic": by_seed[seeds[0]]["elastic"], "fixed": by_seed[seeds[0]]["fixed"], "indep": indep}
    unseen_by_seed, unseen_indep = evaluate(unseen_batches, "unseen")
    unseen_matrix = {"elastic": unseen_by_seed[seeds[0]]["elastic"], "fixed": unseen_by_seed[seeds[0]]["fixed"],
                     "indep": unseen_indep}

    # ---- parameters of each evaluated sub-model (of the 4-layer / 16-expert / top-4 model)
    el = models["elastic"]
    mc = el.cfg
    tot_p, act_p = mc.num_params(), mc.num_params(active=True)
    pinfo = {}
    for s in EVAL_SPECS:
        rs = el.resolve(s)
        kept_moe = [i for i in rs.layers if i in mc.moe_layers]
        m = rs.num_experts(kept_moe[0], mc)
        k = rs.top_k[kept_moe[0]]
        pinfo[spec_name(s)] = {"layers": list(rs.layers), "experts": m, "top_k": k,
                               "total": mc.num_params(list(rs.layers), experts=m),
                               "active": mc.num_params(list(rs.layers), experts=m, top_k=k, active=True),
                               "flops": el.flops_per_token(dc.seq_len, s)}
    # the independent models' own parameter counts agree with the sub-model counts (same shapes)
    for name, (_, shape) in RUNS.items():
        if name.startswith("indep"):
            own = models[name].cfg.num_params()
            assert own == pinfo[spec_name(shape)]["total"], (name, own, pinfo[spec_name(shape)]["total"])

    # ---- cost
    fl_el, fl_fixed, counts = elastic_flops(cfg, el)
    wall_ratio = summaries["elastic"]["elapsed_s"] / summaries["fixed"]["elapsed_s"]
    every_run = [(run_dir(n, seeds[0]), s) for n, s in summaries.items()]
    every_run += [(run_dir(n, sd), s) for sd, runs in extra.items() for n, s in runs.items()]
    for name, s in every_run:  # median step time: less sensitive to load spikes than the sum
        steps = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
        s["median_step_s"] = statistics.median(r["step_s"] for r in steps if "step_s" in r)
    median_ratio = summaries["elastic"]["median_step_s"] / summaries["fixed"]["median_step_s"]
    log("interleaved step timing")
    inter = interleaved_step_times(cfg, data, 4 if args.quick else 30)
    inter["n"] = 4 if args.quick else 30
    log(f"interleaved: fixed {inter['fixed']:.3f} s/step, elastic {inter['elastic']:.3f} s/step")
    flops_ratio = fl_el / fl_fixed

    # ---- decode speed at top-1 (25% of top-4)
    held = torch.cat([x for x, _ in batches])
    log("decode timing")
    new = 8 if args.quick else 64
    dec = {}
    for b in (1, 8) if args.quick else (1, 8, 64):
        prompts = [row[:32].tolist() for row in held[:b]]
        dec[b] = decode_speed(el, prompts, new, 1 if args.quick else (5 if b < 64 else 3))
        dec[b]["speedup"] = dec[b]["full"] / dec[b]["k1"]
        log(f"decode batch {b}: full {dec[b]['full']:.3f} s, top-1 {dec[b]['k1']:.3f} s")

    # ---- headline (worst seed where it says so; the independent models are trained with the first seed only)
    E = matrix["elastic"]
    held_cmp = compare(by_seed, indep, sub_cols)
    unseen_cmp = compare(unseen_by_seed, unseen_indep, sub_cols)

    def keys(c: dict, prefix: str = "") -> dict:
        return {
            f"{prefix}full_loss_ratio_elastic_vs_fixed": round(max(c["full_by_seed"].values()), 4),
            f"{prefix}max_subnet_loss_ratio_vs_independent": round(max(c["vs_indep"].values()), 4),
            f"{prefix}min_subnet_gain_vs_cut_fixed": round(min(min(g.values()) for g in c["gain_by_seed"].values()), 4),
        }

    def detail(c: dict, prefix: str = "") -> dict:
        return {
            f"{prefix}full_loss_ratio_elastic_vs_fixed_by_seed": {str(sd): round(v, 4) for sd, v in c["full_by_seed"].items()},
            f"{prefix}min_subnet_gain_vs_cut_fixed_by_seed": {str(sd): round(min(g.values()), 4)
                                                               for sd, g in c["gain_by_seed"].items()},
            f"{prefix}subnet_gain_vs_cut_fixed_mean": {col: round(v, 4) for col, v in c["gain_mean"].items()},
            f"{prefix}subnet_gain_vs_cut_fixed_ci95": {col: [round(v, 4) for v in ci] for col, ci in c["gain_ci95"].items()},
        }

    headline = {
        **keys(held_cmp), "seeds": seeds, **detail(held_cmp),
        # the cost is measured side by side (the runs' wall times may come from different sessions and loads)
        "elastic_cost_ratio": round(inter["elastic"] / inter["fixed"], 4),
        "elastic_flops_ratio": round(flops_ratio, 4),
        "elastic_train_wall_time_ratio": round(wall_ratio, 4),
        "elastic_median_step_time_ratio": round(median_ratio, 4),
        "ea_total_param_frac": round(pinfo[spec_name(EA)]["total"] / tot_p, 4),
        "ea_active_param_frac": round(pinfo[spec_name(EA)]["active"] / act_p, 4),
        "ea_loss_ratio": round(E[spec_name(EA)] / E["full"], 4),
        "topk25_decode_speedup": round(dec[1]["speedup"], 4),
        "topk25_decode_speedup_batch8": round(dec[8]["speedup"], 4),
        "topk25_loss_ratio": round(E[spec_name(TOPK25)] / E["full"], 4),
        "unseen_eval_tokens": unseen_tokens, **keys(unseen_cmp, "unseen_"), **detail(unseen_cmp, "unseen_"),
    }
    targets = {f"{key} ({label})": met for c, label in ((held_cmp, "held-out"), (unseen_cmp, "unseen files"))
               for key, _, _, met in criteria(c)}
    targets.update({
        "elastic run cost <= 1.15x fixed (step time, side by side)": inter["elastic"] / inter["fixed"] <= 1.15,
        "elastic run cost <= 1.15x fixed (FLOPs)": flops_ratio <= 1.15,
    })
    result = {"headline": headline, "targets": targets, "matrix": matrix, "matrix_by_seed": by_seed,
              "held_compare": held_cmp, "unseen_matrix": unseen_matrix, "unseen_matrix_by_seed": unseen_by_seed,
              "unseen_compare": unseen_cmp,
              "runs_other_seeds": extra, "params": pinfo,
              "total_params": tot_p, "active_params": act_p, "eval_tokens": eval_tokens, "unseen_tokens": unseen_tokens,
              "unseen_target_bytes": unseen_bytes,
              "decode_s": {"batches": dec, "new_tokens": new, "prompt": 32}, "runs": summaries,
              "drawn_submodels": counts, "interleaved_step_s": inter, "flops": {"elastic": fl_el, "fixed": fl_fixed}}
    out_dir = root if args.quick else DOCS
    out_dir.mkdir(parents=True, exist_ok=True)
    (root / "result.json").write_text(json.dumps(result, indent=2, default=str))
    plot(matrix, cols, out_dir / f"{NAME}.png")
    md = report(result, cols, cfg, t_start, load_start, args.quick)
    # the hand-written reading of the numbers (ANALYSIS heading onwards) survives a regenerated report; update it
    # by hand when the numbers move
    old_md = out_dir / f"{NAME}.md"
    if old_md.is_file() and ANALYSIS in old_md.read_text():
        md = md.rstrip("\n") + "\n\n" + old_md.read_text()[old_md.read_text().index(ANALYSIS):]
    atomic_write_text(out_dir / f"{NAME}.md", md)
    atomic_write_text(out_dir / f"{NAME}.json", json.dumps(headline, indent=2) + "\n")
    log(f"report: {out_dir / (NAME + '.md')}")
    print(json.dumps(headline))


def seeds_table(c: dict) -> str:
    """Per seed: elastic full / fixed full and each sub-model's gain over the fixed cut; then the mean and its
    95% interval."""
    sub_cols = list(c["gain_mean"])
    rows = [[str(sd), f"{c['full_by_seed'][sd]:.4f}"] + [f"{g[col]:+.2%}" for col in sub_cols]
            for sd, g in c["gain_by_seed"].items()]
    rows.append(["mean", f"{statistics.mean(c['full_by_seed'].values()):.4f}"]
                + [f"{c['gain_mean'][col]:+.2%}" for col in sub_cols])
    rows.append(["95% interval of the mean", "-"]
                + [f"{c['gain_ci95'][col][0]:+.2%} .. {c['gain_ci95'][col][1]:+.2%}" for col in sub_cols])
    return md_table(["seed", "elastic full / fixed full"] + [f"gain vs cut, {col}" for col in sub_cols], rows)


def ok(b: bool) -> str:
    return "**met**" if b else "**MISSED**"


def criteria(c: dict) -> list[tuple[str, str, str, bool]]:
    """The targets for the comparisons on one test set: (key in result.json's targets, wording in the report,
    value, met)."""
    n = len(c["full_by_seed"])
    worst_full = max(c["full_by_seed"].values())
    worst = {col: min(g[col] for g in c["gain_by_seed"].values()) for col in c["gain_mean"]}
    return [
        ("elastic full within 1% of fixed full",
         f"elastic at full size within 1% of the fixed full model (worst of {n} seeds)",
         f"{worst_full:.4f}", worst_full <= 1.01),
        ("every elastic sub-model within 3% of the independent model",
         "each elastic sub-model within 3% of the independent model of its size",
         ", ".join(f"{col} {v:.4f}" for col, v in c["vs_indep"].items()), max(c["vs_indep"].values()) <= 1.03),
        ("every elastic sub-model better than the cut fixed model on every seed",
         f"each elastic sub-model better than the same cut of the fixed model (relative loss gain, worst of {n} seeds)",
         ", ".join(f"{col} {v:+.2%}" for col, v in worst.items()), min(worst.values()) > 0),
        ("mean gain of every sub-model over the cut fixed model above 0 at 95%",
         f"the same, as the mean over the {n} seeds: lower end of its 95% interval",
         ", ".join(f"{col} {v[0]:+.2%}" for col, v in c["gain_ci95"].items()),
         min(lo for lo, _ in c["gain_ci95"].values()) > 0),
    ]


def report(r: dict, cols: list[str], cfg: TrainConfig, t_start: float, load_start, quick: bool) -> str:
    h, M, P, runs = r["headline"], r["matrix"], r["params"], r["runs"]
    tot, act = r["total_params"], r["active_params"]
    mc, tc = cfg.model, cfg.train
    step_tokens = tc.batch_size * cfg.data.seq_len * tc.grad_accum
    rows = []
    for key, name in (("elastic", "elastic"), ("fixed", "fixed (sub-models cut from it)")):
        rows.append([name] + [f"{M[key][c]:.4f}" for c in cols])
    for run, (_, shape) in RUNS.items():
        if run.startswith("indep"):
            c = spec_name(shape)
            rows.append([f"{run} (trained at {c})"] + [f"{M['indep'][c]:.4f}" if cc == c else "-" for cc in cols])
    matrix_md = md_table(["trained model \\ evaluated sub-model"] + cols, rows)

    prow = []
    for c in cols:
        p = P[c]
        el, fx = M["elastic"][c], M["fixed"][c]
        ind = M["indep"].get(c)
        prow.append([c, ",".join(map(str, p["layers"])), p["experts"], p["top_k"], f"{p['total'] / 1e6:.3f} M",
                     f"{p['total'] / tot:.1%}", f"{p['active'] / 1e6:.3f} M", f"{p['active'] / act:.1%}",
                     f"{el / M['elastic']['full']:.4f}", f"{el / fx:.4f}", f"{el / ind:.4f}" if ind else "-"])
    params_md = md_table(["sub-model", "layers kept", "experts", "top-k", "total params", "of total", "active params",
                          "of active", "elastic loss / elastic full", "elastic / cut fixed", "elastic / independent"],
                         prow)

    rrows = []
    all_runs = dict(runs)
    for seed, extra in r["runs_other_seeds"].items():
        all_runs.update({run_dir(name, seed): s for name, s in extra.items()})
    for name, s in all_runs.items():
        rrows.append([name, f"{s['params'] / 1e6:.3f} M", f"{s['active_params'] / 1e6:.3f} M", f"{s['tokens']:,}",
                      f"{s['elapsed_s']:.0f}", f"{s.get('median_step_s', float('nan')):.3f}", f"{s['tokens_per_s']:,.0f}", f"{s['final_loss']:.4f}",
                      " / ".join(f"{x:.2f}" for x in s["loadavg_start"][:1] + s["loadavg_end"][:1])])
    runs_md = md_table(["run", "params", "active", "tokens", "train time (s)", "median step (s)", "tokens/s", "final train loss (last 20 steps)",
                        "load avg 1-min start / end"], rrows)

    t = r["targets"]
    d = r["decode_s"]
    drawn = sorted(r["drawn_submodels"].items(), key=lambda kv: -kv[1])
    drawn_txt = ", ".join(f"{k} {v / sum(r['drawn_submodels'].values()):.1%}" for k, v in drawn)
    dec_txt = "; ".join(f"batch {b}: {v['full']:.3f} s -> {v['k1']:.3f} s = **{v['speedup']:.3f}x**"
                        for b, v in d["batches"].items())
    seeds_md, unseen_seeds_md = seeds_table(r["held_compare"]), seeds_table(r["unseen_compare"])
    targets_md = "\n".join(f"| {label}: {wording} | {value} | {ok(met)} |"
                           for c, label in ((r["held_compare"], "held-out"), (r["unseen_compare"], "unseen files"))
                           for _, wording, value, met in criteria(c))
    U = r["unseen_matrix"]
    unseen_rows = [["elastic"] + [f"{U['elastic'][c]:.4f}" for c in cols],
                   ["fixed (sub-models cut from it)"] + [f"{U['fixed'][c]:.4f}" for c in cols]]
    unseen_rows += [[f"independent at {c}"] + [f"{U['indep'][c]:.4f}" if cc == c else "-" for cc in cols]
                    for c in U["indep"]]
    unseen_md = md_table(["trained model \\ evaluated sub-model (first seed)"] + cols, unseen_rows)
    n_seeds = len(r["matrix_by_seed"])
    total_min = (time.time() - t_start) / 60
    train_min = sum(s["wall_s"] for s in all_runs.values()) / 60
    return f"""# Elastic family: ERNIE 5.0 Tables 9-11 in miniature
{"**QUICK SMOKE RUN - numbers meaningless**" if quick else ""}
`{command_line()}` — one elastic MoE vs a fixed full model vs models trained independently at sub-model sizes,
all at the same token budget ({runs['fixed']['tokens']:,} tokens each), every pair evaluated on the same
{r['eval_tokens']:,} held-out tokens.

Machine: {machine()}. Training used one thread per run (`train.threads = 1`); load average at
start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} (1/5/15 min, two cores shared with other
engineers' jobs), at the end {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} / {os.getloadavg()[2]:.2f}. Training: {train_min:.1f} min
of wall time summed over the {len(all_runs)} runs (data preparation included); this invocation (training of the runs not cached,
evaluation, timing): {total_min:.1f} min.

## Setup

- Model (`configs/elastic_family.toml`): vocab {mc.vocab_size}, hidden {mc.hidden_size}, {mc.num_hidden_layers} layers
  (layer 0 dense, FFN {mc.intermediate_size}; layers 1-3 MoE), {mc.moe_num_experts} experts of width
  {mc.moe_intermediate_size}, top-{mc.moe_k}, GQA {mc.num_attention_heads}:{mc.num_key_value_heads};
  {tot / 1e6:.3f} M parameters, {act / 1e6:.3f} M active. Aux-loss-free router balancing (bias rate
  {tc.router_bias_rate}).
- Data: first {cfg.data.max_bytes / 1e6:.0f} MB of the Python standard-library sources, BPE vocab {mc.vocab_size},
  seq {cfg.data.seq_len}, {cfg.data.heldout_frac:.0%} of documents held out.
- Training: {tc.max_steps} steps x {step_tokens:,} tokens (batch {tc.batch_size}) = {runs['fixed']['tokens']:,}
  tokens per run, AdamW lr {cfg.optim.lr} cosine to {cfg.optim.min_lr_ratio}x, warm-up {cfg.optim.warmup_steps},
  fp32, seed {tc.seed} (same data order in every run). Initialisation: normal(0, {mc.initializer_range}),
  residual-stream writers scaled by 1/sqrt(2 x layers): {cfg.init.residual_scaled}, embedding std
  {cfg.init.embedding_std or mc.initializer_range}.
- Elastic run: per-sample sub-models (ERNIE 5.0), one forward/backward per batch; the first
  {cfg.elastic.full_steps} steps train the full model only, then each dimension independently: depth full w.p.
  {cfg.elastic.depth.p_full}, else [{cfg.elastic.depth.min}, {cfg.elastic.depth.max}] layers; width full w.p.
  {cfg.elastic.width.p_full}, else [{cfg.elastic.width.min}, {cfg.elastic.width.max}] experts; top-k full w.p.
  {cfg.elastic.top_k.p_full}, else [{cfg.elastic.top_k.min}, {cfg.elastic.top_k.max}].
  Layer policy `{cfg.elastic.layer_policy}` (n layers = evenly spaced, first and last kept: 3 -> {{0, 2, 3}},
  2 -> {{0, 3}}), expert policy `{cfg.elastic.expert_policy}` (experts re-ranked by routing mass every
  {cfg.elastic.reorder_every} steps, so "8 experts" = the 8 most used). Sub-models drawn, by share of
  sequences: {drawn_txt}.
- Fixed run: the same config with every elastic p_full = 1 (same code path; also keeps the importance expert
  order, so its "8 experts" cut is the 8 most used — the kindest cut). Independent runs: the fixed recipe with
  the sub-model's shape as the whole model: `indep_L3` 3 layers (dense + 2 MoE, the shape of {{0, 2, 3}}),
  `indep_E8` 8 experts top-4, `indep_k2` 16 experts top-2.

## Held-out loss, every (trained model, evaluated sub-model) pair

{matrix_md}

![held-out loss per evaluated sub-model and trained model](elastic_family.png)

Sub-models (parameters of the 4-layer/16-expert model; active = parameters one token uses, embedding row +
LM head counted as in `ModelConfig.num_params`) and loss ratios:

{params_md}

## Across seeds: elastic vs fixed

The fixed and elastic runs trained with {n_seeds} seeds ({", ".join(map(str, h["seeds"]))}; the seed sets the
initialisation, the data order and the elastic draws; the held-out tokens are the same). Gain vs cut = 1 - elastic
loss / loss of the same sub-model cut from the fixed model of that seed (positive: the elastic model is better).
The interval is the mean's two-sided 95% Student's t interval over the seeds (paired: each seed's elastic run
against the fixed run of the same seed).

{seeds_md}

## A second test set: files no run has read

The sub-model mix in `configs/elastic_family.toml` was chosen by comparing mixes on the held-out tokens above
(docs/LOG.md, session 12), which makes the figures above a little optimistic. So every comparison is repeated on
tokens nothing was tuned on: the standard-library text after the runs' first {cfg.data.max_bytes / 1e6:.0f} MB (the
corpus is read in a fixed file order; no run and not the tokenizer read past it), cut into documents of at most
{MAX_DOC_CHARS:,} characters as the shards are, keeping the pieces whose hash falls below a fraction chosen for about
{r['unseen_target_bytes']:,} bytes (the held-out split's rule): {r['unseen_tokens']:,} tokens.

{unseen_md}

{unseen_seeds_md}

## Runs

{runs_md}

Elastic cost (`elastic_cost_ratio`), measured side by side (a fresh model, the same batches, a fixed step then an
elastic step, {r['interleaved_step_s'].get('n', 30)} pairs, median): fixed {r['interleaved_step_s']['fixed']:.3f} s/step, elastic
{r['interleaved_step_s']['elastic']:.3f} s/step = **{h['elastic_cost_ratio']:.3f}x**; training FLOPs (replaying the sampler's draws,
`model.flops_per_token`) {r['flops']['elastic'] / 1e12:.3f} vs {r['flops']['fixed'] / 1e12:.3f} TFLOP = **{h['elastic_flops_ratio']:.3f}x**.
The runs' own wall times, {runs['elastic']['elapsed_s']:.0f} s vs {runs['fixed']['elapsed_s']:.0f} s = {h['elastic_train_wall_time_ratio']:.3f}x
(median step {runs['elastic']['median_step_s']:.3f} s vs {runs['fixed']['median_step_s']:.3f} s = {h['elastic_median_step_time_ratio']:.3f}x), were taken at
different moments on a shared machine, possibly in different sessions (see the load column), so their ratio
carries the load changes between the runs; it is reported, not used as the cost.

## EA35.8%-like sub-model and top-k at 25%

- `{spec_name(EA)}` (2 of 4 layers, 8 of 16 experts, top-1): {h['ea_total_param_frac']:.1%} of total and
  {h['ea_active_param_frac']:.1%} of active parameters (ERNIE's EA35.8%: ~36% / ~54%); loss ratio to the
  elastic full model **{h['ea_loss_ratio']:.4f}** (cut from the fixed model:
  {M['fixed'][spec_name(EA)] / M['fixed']['full']:.4f}).
- Top-k cut to 25% (top-1 of top-4) on the elastic model: loss ratio **{h['topk25_loss_ratio']:.4f}**
  (cut from the fixed model: {M['fixed'][spec_name(TOPK25)] / M['fixed']['full']:.4f}); greedy
  decode ({d['prompt']}-token prompts, {d['new_tokens']} new tokens, KV cache, 1 thread, median of interleaved
  repeats), full top-4 -> top-1: {dec_txt}. The headline `topk25_decode_speedup` is batch 1.

## Targets

| target | value | |
|---|---|---|
{targets_md}
| elastic run cost <= 1.15x fixed, step time side by side | {h['elastic_cost_ratio']:.3f} | {ok(t['elastic run cost <= 1.15x fixed (step time, side by side)'])} |
| elastic run cost <= 1.15x fixed, FLOPs | {h['elastic_flops_ratio']:.3f} | {ok(t['elastic run cost <= 1.15x fixed (FLOPs)'])} |

Headline (`docs/benchmarks/elastic_family.json`):

```json
{json.dumps(h, indent=2)}
```
"""


if __name__ == "__main__":
    main()
