"""The sub-model family of one elastic checkpoint: enumerate it, measure every member, search large spaces, and
mark the Pareto frontiers of quality against cost.

    space = Space(layers=[2, 3, 4], experts=[4, 8], top_k=[1, 2])
    result = run_family(inputs, "runs/tiny/checkpoints/step_00000200/family", space, MeasureConfig())
    result.rows       # one dict per sub-model: loss, params, prefill / decode latency, peak memory, frontier flags

A member is a sub-model spec (layers kept, the first m experts of every MoE layer, top-k; optionally one top-k per
MoE layer). Quality is the held-out token cross-entropy of the elastic forward at that spec (and task accuracy
when a suite is given). Cost is counted (total and active parameters) or measured on the current device on the
standalone sub-model: prefill and decode latency, peak memory (`elastic_moe.measure`).

Timing is noisy on a shared machine, so candidates are timed in chunks, round-robin within a chunk (every
candidate sees the same load), after a warm-up run, with the garbage collector off, and summarised by the median
of many short samples. Every chunk also times the full model (the anchor), and each chunk's latencies are scaled
by (median anchor over the table / the chunk's anchor), so that chunks timed while the machine was busier still
compare; the unscaled figures are kept in `*_raw`.

Large spaces (more than `max_measured` members) go through successive halving on the held-out loss: every rung
evaluates the survivors on twice as many held-out batches and keeps the better half by non-dominated rank over
(loss, active parameters, total parameters); only the survivors are timed. Every measurement is cached in
OUT/cache.jsonl under a key of (checkpoint weights, data, settings, device, spec), so a re-run measures only
what is new.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from elastic_moe.atomic import atomic_savefig, atomic_write_json, atomic_write_text
from elastic_moe.config import ModelConfig
from elastic_moe.elastic import spec_name
from elastic_moe.errors import Interrupted, UserError
from elastic_moe.measure import (
    MeasureConfig,
    heldout_loss,
    peak_memory_mb,
    speed_cols,
    speed_row,
    speed_settings,
    task_accuracy,
    time_models,
)
from elastic_moe.model import ElasticMoE
from elastic_moe.pareto import cost_cols, finite, mark_frontiers, nondominated_rank
from elastic_moe.spec import ResolvedSpec, SubModelSpec, param_counts

TABLE = "family.jsonl"
META = "family_meta.json"
CACHE = "cache.jsonl"
PLOTS = ("quality_vs_active.png", "quality_vs_latency.png")
MAX_PER_LAYER_MIXES = 4096  # per-layer top-k mixes grow as len(top_k) ** MoE layers


# ------------------------------------------------------------------------------------------------------ space


@dataclass
class Space:
    layers: list[int] | None = None  # kept-layer counts; None: 1..L
    experts: list[int] | None = None  # experts kept per MoE layer (the first m by importance); None: 1..E
    top_k: list[int] | None = None  # None: 1..moe_k
    per_layer_top_k: bool = False  # also every per-MoE-layer combination of the top_k values


@dataclass
class Candidate:
    spec: SubModelSpec
    rs: ResolvedSpec
    name: str

    @property
    def key(self) -> str:
        return json.dumps([self.rs.layers, sorted(self.rs.experts.items()), sorted(self.rs.top_k.items())])


def enumerate_space(model: ElasticMoE, space: Space) -> list[Candidate]:
    """Every valid spec of the space, resolved through the model's orders; specs that resolve alike appear once."""
    cfg = model.cfg
    L, E, K = cfg.num_hidden_layers, cfg.moe_num_experts, cfg.moe_k
    n_moe = len(cfg.moe_layers)
    layers = sorted(set(space.layers or range(1, L + 1)))
    experts = sorted(set(space.experts or range(1, E + 1)))
    ks = sorted(set(space.top_k or range(1, K + 1)))
    for what, vals, hi in (("layers", layers, L), ("experts", experts, E), ("top-k", ks, E)):
        bad = [v for v in vals if not 1 <= v <= hi]
        if bad:
            raise UserError(f"family space: {what} {bad} outside 1..{hi}")
    k_choices: list[int | tuple[int, ...]] = list(ks)
    if space.per_layer_top_k and n_moe > 1 and len(ks) ** n_moe > MAX_PER_LAYER_MIXES:
        raise UserError(f"family space: --per-layer-top-k over {n_moe} MoE layers makes {len(ks)}^{n_moe} top-k mixes "
                        f"(at most {MAX_PER_LAYER_MIXES}); give fewer --top-k values or leave it out")
    if space.per_layer_top_k and n_moe > 1:
        k_choices += [t for t in itertools.product(ks, repeat=n_moe) if len(set(t)) > 1]
    out, seen = [], set()
    for n, m, k in itertools.product(layers, experts, k_choices):
        if max(k if isinstance(k, tuple) else (k,)) > m:
            continue
        spec = SubModelSpec(None if n == L else n, None if m == E else m, None if k == K else k)
        rs = model.resolve(spec)
        c = Candidate(spec, rs, spec_name(spec))
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    if not out:
        raise UserError("family space is empty (every top-k exceeds the experts kept?)")
    return out


def extractable(cfg: ModelConfig, rs: ResolvedSpec) -> bool:
    """Whether `extract` can write the spec as a standalone model (one top-k and one expert count for all layers)."""
    from elastic_moe.hf import sub_config

    try:
        sub_config(cfg, rs)
    except UserError:
        return False
    return True


def standalone(model: ElasticMoE, rs: ResolvedSpec) -> tuple[ElasticMoE, SubModelSpec | None]:
    """The standalone sub-model and the spec to run it at: None, or its per-layer top-k (not a config field)."""
    from elastic_moe.hf import extract

    ks = [rs.top_k[i] for i in rs.layers if i in rs.top_k]
    if len(set(ks)) <= 1:
        return extract(model, rs).eval(), None
    uniform = ResolvedSpec(rs.layers, rs.experts, dict.fromkeys(rs.top_k, max(ks)))
    return extract(model, uniform).eval(), SubModelSpec(top_k=tuple(ks))


# ------------------------------------------------------------------------------------------------------ cache


class Cache:
    """Measurements by key, one JSON object per line, appended as they are made (a killed run keeps its work)."""

    def __init__(self, path: Path | None, fresh: bool = False):
        self.path, self.data = path, {}
        text = path.read_text(encoding="utf-8", errors="replace") if path is not None and path.is_file() else ""
        self.torn = bool(text) and not text.endswith("\n")  # a killed run's half line: the next append starts anew
        if not fresh:
            for line in text.splitlines():
                try:
                    d = json.loads(line)
                    self.data[d["key"]] = d["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self.hits = self.misses = 0

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str):
        if key in self.data:
            self.hits += 1
            return self.data[key]
        return None

    def put(self, key: str, value) -> None:
        self.misses += 1
        self.data[key] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n" * self.torn + json.dumps({"key": key, "value": value}) + "\n")
            self.torn = False


def survivors(cfg: ModelConfig, cands: list[Candidate], losses: dict[str, float], keep: int) -> list[Candidate]:
    """The `keep` best candidates by non-dominated rank over (loss, active, total parameters), then by loss; those of
    a non-finite loss last (NaN would compare as neither better nor worse and could survive as non-dominated)."""
    loss = [losses[c.key] if finite(losses[c.key]) else math.inf for c in cands]
    pts = [(x, *reversed(param_counts(cfg, c.rs))) for x, c in zip(loss, cands)]
    ranks = nondominated_rank(pts)
    order = sorted(range(len(cands)), key=lambda i: (loss[i] == math.inf, ranks[i], loss[i]))
    return [cands[i] for i in sorted(order[:keep])]


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class FamilyInputs:
    """What measuring a family needs: the model, its identity, held-out data and (optionally) a tokenizer."""

    model: ElasticMoE
    fingerprint: str  # of the weights (the checkpoint's sha256), part of every cache key
    batches: list  # held-out (x, y) batches
    data_key: str = ""  # identifies the held-out data, part of the loss cache keys
    tokenizer: object | None = None
    checkpoint: str | None = None
    data: object | None = None  # the PreparedData, when loaded from a run (train batches for extract)
    run_config: dict | None = None
    corpus: str | None = None  # the corpus the held-out text came from (None: the embedded default)


@dataclass
class FamilyResult:
    rows: list[dict]
    meta: dict
    out: Path | None = None
    plots: list[Path] = field(default_factory=list)


def run_family(inp: FamilyInputs, out: str | Path | None, space: Space | None = None,
               mc: MeasureConfig | None = None, search: str = "auto", max_measured: int = 64,
               objective: str = "loss", progress: bool = True, fresh: bool = False,
               log: Callable[[str], None] = print) -> FamilyResult:
    """Measure the family and (with `out`) write family.jsonl / family.csv / family_meta.json and the plots."""
    from elastic_moe.atomic import run_lock

    with run_lock(out) if out is not None else contextlib.nullcontext():
        try:
            return _run_family(inp, out, space, mc, search, max_measured, objective, progress, fresh, log)
        except KeyboardInterrupt as e:
            cache = Path(out) / CACHE if out is not None else None
            if cache is None or not cache.is_file() or cache.stat().st_size == 0:
                raise
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            raise Interrupted(f"the measurements made so far are kept in {cache}; run the same command again to go on",
                              signum) from None


def _run_family(inp: FamilyInputs, out: str | Path | None, space: Space | None, mc: MeasureConfig | None,
                search: str, max_measured: int, objective: str, progress: bool, fresh: bool,
                log: Callable[[str], None]) -> FamilyResult:
    space, mc = space or Space(), mc or MeasureConfig()
    mc.validate()
    if objective not in ("loss", "accuracy"):
        raise UserError(f"objective {objective!r}: expected loss or accuracy")
    if objective == "accuracy" and not mc.tasks:
        raise UserError("objective accuracy needs a task suite (--tasks)")
    if search not in ("auto", "grid", "halving"):
        raise UserError(f"search {search!r}: expected auto, grid or halving")
    if not inp.batches:
        raise UserError("no held-out batches to evaluate the loss on")
    model = inp.model.eval()
    cfg = model.cfg
    device = next(model.parameters()).device
    fit = cfg.max_position_embeddings - 1 - mc.decode_tokens
    if mc.prompt_len > fit:
        if fit < 1:
            raise UserError(f"family: {mc.decode_tokens} decode tokens do not fit the context of "
                            f"{cfg.max_position_embeddings}")
        log(f"note: prompt length {mc.prompt_len} -> {fit} to fit the context of {cfg.max_position_embeddings}")
        mc = dataclasses.replace(mc, prompt_len=fit)
    out = Path(out) if out is not None else None
    cache = Cache(out / CACHE if out else None, fresh)
    settings = speed_settings(mc, device)
    code = settings["code"]  # a loss or an accuracy changes with the forward as much as a timing does
    t0, load0 = time.time(), os.getloadavg()
    cands = enumerate_space(model, space)
    eval_n = min(mc.eval_batches, len(inp.batches))
    bar = tqdm(total=0, unit="step", disable=not progress, dynamic_ncols=True, desc="family")

    def tick(n: int = 1) -> None:
        bar.update(n)

    def losses(cs: list[Candidate], n: int) -> dict[str, float]:
        res = {}
        todo = []
        for c in cs:
            k = Cache.key("loss", inp.fingerprint, inp.data_key, list(inp.batches[0][0].shape), n, code, c.key)
            v = cache.get(k)
            if v is None:
                todo.append((c, k))
            else:
                res[c.key] = v
        bar.total += len(todo)
        bar.set_description(f"family: loss on {n} batch(es)")
        for c, k in todo:
            res[c.key] = heldout_loss(model, c.rs, inp.batches, n)
            cache.put(k, res[c.key])
            tick()
        return res

    # search: every candidate, or successive halving on the held-out loss
    search_log: list[dict] = []
    mode = search if search != "auto" else ("grid" if len(cands) <= max_measured else "halving")
    alive = cands
    if mode == "halving" and len(cands) > max_measured:
        n = 1
        while len(alive) > max_measured and n < eval_n:
            keep = max(max_measured, math.ceil(len(alive) / 2))
            search_log.append({"rung": len(search_log), "batches": n, "candidates": len(alive), "kept": keep})
            alive = survivors(cfg, alive, losses(alive, n), keep)
            n = min(2 * n, eval_n)
        if len(alive) > max_measured:  # every batch used: keep the best non-dominated ones
            search_log.append({"rung": len(search_log), "batches": eval_n, "candidates": len(alive), "kept": max_measured})
            alive = survivors(cfg, alive, losses(alive, eval_n), max_measured)
    final_loss = losses(alive, eval_n)

    rows = []
    for c in alive:
        total, active = param_counts(cfg, c.rs)
        kept_moe = [i for i in c.rs.layers if i in c.rs.experts]
        ks = [c.rs.top_k[i] for i in kept_moe]
        ms = sorted({c.rs.num_experts(i, cfg) for i in kept_moe})
        rows.append({
            "name": c.name, "layers": len(c.rs.layers), "layer_ids": " ".join(map(str, c.rs.layers)),
            "experts": ms[0] if len(ms) == 1 else (cfg.moe_num_experts if not ms else "/".join(map(str, ms))),
            "top_k": (ks[0] if len(set(ks)) == 1 else " ".join(map(str, ks))) if ks else cfg.moe_k,
            "total_params": total, "active_params": active, "extractable": extractable(cfg, c.rs),
            "loss": final_loss[c.key], "spec": c.spec.to_dict(),
        })
    by_key = {c.key: r for c, r in zip(alive, rows)}

    if mc.tasks:
        from elastic_moe.tasks import get_suite

        if inp.tokenizer is None:
            raise UserError("task accuracy needs the checkpoint's tokenizer")
        tasks = get_suite(mc.tasks, "test", mc.num_tasks, mc.seed)
        too_long = sum(len(inp.tokenizer.encode_chat(t.messages, add_generation_prompt=True)) + mc.task_tokens
                       > cfg.max_position_embeddings for t in tasks)
        if too_long:
            log(f"note: {too_long} of {len(tasks)} {mc.tasks} prompts do not fit the context of "
                f"{cfg.max_position_embeddings} with {mc.task_tokens} new tokens; they count as wrong")
        bar.set_description(f"family: {mc.tasks} accuracy")
        for c in alive:
            k = Cache.key("acc", inp.fingerprint, mc.tasks, mc.num_tasks, mc.seed, mc.task_tokens, code, c.key)
            v = cache.get(k)
            if v is None:
                bar.total += 1
                v = task_accuracy(model, c.rs, tasks, inp.tokenizer, mc.task_tokens)
                cache.put(k, v)
                tick()
            by_key[c.key]["accuracy"] = v

    anchor = None
    anchor_meta: dict[str, dict[str, float]] = {}
    for b in mc.batch_sizes:
        todo, recs = [], {}
        for c in alive:
            k = Cache.key("speed", 2, inp.fingerprint, settings, b, c.key)
            v = cache.get(k)
            if v is None:
                todo.append((c, k))
            else:
                recs[c.key] = v
        chunks = [todo[i:i + mc.chunk] for i in range(0, len(todo), mc.chunk)]
        bar.total += sum(mc.repeats + len(ch) for ch in chunks)
        for ch in chunks:
            bar.set_description(f"family: latency at batch {b}")
            anchor = anchor or standalone(model, model.resolve(None))
            subs = [standalone(model, c.rs) for c, _ in ch]
            *timings, a = time_models([*subs, anchor], b, mc, tick)
            bar.set_description(f"family: memory at batch {b}")
            for (c, k), (sub, sspec), tm in zip(ch, subs, timings):
                tm["memory_mb"] = peak_memory_mb(sub, sspec, b, mc)
                tm["anchor_prefill_ms"], tm["anchor_decode_ms"] = a["prefill_ms"], a["decode_ms"]
                tick()
                cache.put(k, tm)
                recs[c.key] = tm
            del subs
        # Chunks run at different times, and on a shared machine at different speeds. Every chunk timed the full
        # model too (the anchor): scale each chunk to the median anchor, so rows of different chunks compare.
        ref = {m: statistics.median(v[f"anchor_{m}"] for v in recs.values()) for m in ("prefill_ms", "decode_ms")}
        anchor_meta[str(b)] = ref
        for key, v in recs.items():
            by_key[key].update(speed_row(b, v, ref))
    bar.close()
    del anchor

    mark_frontiers(rows, mc.batch_sizes, objective)
    rows.sort(key=lambda r: (r["active_params"], r["loss"]))
    b0 = mc.batch_sizes[0]
    meta = {
        "checkpoint": inp.checkpoint, "fingerprint": inp.fingerprint, "data": inp.data_key,
        "objective": objective, "space": asdict(space), "measure": asdict(mc), "speed_settings": settings,
        "search": {"mode": mode, "space_size": len(cands), "measured": len(alive), "rungs": search_log},
        "cache": {"hits": cache.hits, "new": cache.misses},
        "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()), "seconds": time.time() - t0,
        "frontier": {col: [r["name"] for r in rows if r[f"front_{col}"]] for col in cost_cols(mc.batch_sizes)},
        "latency_col": speed_cols(b0)[1],
        # the full model, timed with every chunk; latencies are scaled to these medians (see extract.remeasure_row)
        "anchor": anchor_meta,
    }
    res = FamilyResult(rows, meta, out)
    if out is not None:
        write_table(rows, meta, out)
        res.plots = plot_family(rows, meta, out)
    log(f"family: {len(rows)} sub-models measured ({mode}, space of {len(cands)}; measurements: {cache.hits} "
        f"from the cache, {cache.misses} new) in {meta['seconds']:.0f} s; load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    return res


# ------------------------------------------------------------------------------------------------- output


def write_table(rows: list[dict], meta: dict, out: Path) -> None:
    """family.jsonl, family.csv, then family_meta.json with the sha256 of both: each file is replaced atomically,
    but not the three together, so `load_table` refuses a table that is not the one its meta was written with (a
    run killed between the files)."""
    out.mkdir(parents=True, exist_ok=True)
    table = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(out / TABLE, table)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = []

    class _Lines:
        def write(self, s: str) -> None:
            lines.append(s)

    w = csv.DictWriter(_Lines(), fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    atomic_write_text(out / "family.csv", "".join(lines))
    digests = {name: hashlib.sha256(text.encode("utf-8")).hexdigest()
               for name, text in ((TABLE, table), ("family.csv", "".join(lines)))}
    atomic_write_json(out / META, {**meta, "files": digests})  # last: its digests name the table put in place


def load_table(folder: str | Path) -> tuple[list[dict], dict] | None:
    folder = Path(folder)
    if not (folder / TABLE).is_file() or not (folder / META).is_file():
        return None
    try:
        table = (folder / TABLE).read_bytes()
        rows = [json.loads(line) for line in table.decode("utf-8").splitlines() if line.strip()]
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not all(_is_row(r, meta.get("objective")) for r in rows):  # JSON, not a table's
        return None
    files = meta.get("files", {})  # the sha256 of the table the meta was written with (absent in older tables)
    if not isinstance(files, dict) or files.get(TABLE) not in (None, hashlib.sha256(table).hexdigest()):
        return None
    return rows, meta


def _is_row(r, objective) -> bool:
    """Whether `r` has what choosing and extracting read from a row (a hand-edited table may not)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("spec"), dict)
            and number(r.get("loss")) and isinstance(r.get("extractable"), bool)
            and (objective != "accuracy" or number(r.get("accuracy"))))


def plot_family(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """Quality against active parameters, and against measured decode / prefill latency; frontiers marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    objective = meta["objective"]
    ylabel = "held-out loss (lower is better)" if objective == "loss" else "task accuracy (higher is better)"
    b = meta["measure"]["batch_sizes"][0]
    pre, dec, _ = speed_cols(b)
    panels = [(PLOTS[0], [("active_params", "active parameters per token (M)", 1e-6)]),
              (PLOTS[1], [(dec, f"decode latency, ms per token (batch {b})", 1.0),
                          (pre, f"prefill latency, ms ({meta['measure']['prompt_len']} tokens, batch {b})", 1.0)])]
    paths = []
    for fname, axes_spec in panels:
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.4 * len(axes_spec), 4.8), squeeze=False)
        for ax, (col, xlabel, scale) in zip(axes[0], axes_spec):
            _scatter(ax, rows, col, scale, objective)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        fig.suptitle(f"sub-model family: {len(rows)} sub-models, frontier in red "
                     f"({meta['speed_settings']['device_name']}, {meta['speed_settings']['threads']} thread(s))",
                     fontsize=10)
        fig.tight_layout()
        for ax, (col, _, scale) in zip(axes[0], axes_spec):  # once the layout is fixed: labels placed in pixels
            _label_front(fig, ax, rows, col, scale, objective)
        atomic_savefig(fig, out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def _scatter(ax, rows: list[dict], col: str, scale: float, objective: str) -> None:
    y_of = (lambda r: r["loss"]) if objective == "loss" else (lambda r: r["accuracy"])
    pts = [r for r in rows if finite(r.get(col))]
    layer_counts = sorted({r["layers"] for r in pts})
    cmap = __import__("matplotlib").colormaps["viridis"]
    markers = {}
    for r in pts:
        k = str(r["top_k"])
        m = markers.setdefault(k, "os^vD<>P*"[len(markers) % 9])
        color = cmap(layer_counts.index(r["layers"]) / max(1, len(layer_counts) - 1))
        ax.scatter(r[col] * scale, y_of(r), color=color, marker=m, s=18 + 6 * _num(r["experts"]), alpha=0.75,
                   edgecolors="none")
    front = sorted((r for r in pts if r.get(f"front_{col}")), key=lambda r: r[col])
    if front:
        ax.step([r[col] * scale for r in front], [y_of(r) for r in front], where="post", color="tab:red", lw=1.2)
        ax.scatter([r[col] * scale for r in front], [y_of(r) for r in front], facecolors="none",
                   edgecolors="tab:red", s=70, lw=1.2)
    for n in layer_counts:
        ax.scatter([], [], color=cmap(layer_counts.index(n) / max(1, len(layer_counts) - 1)), label=f"{n} layers")
    for k, m in markers.items():
        ax.scatter([], [], color="gray", marker=m, label=f"top-k {k}")
    ax.scatter([], [], color="white", label="size: experts kept")
    ax.legend(fontsize=7, loc="upper right")


# label offsets in points, tried in order until the label overlaps no label placed before it
_LABEL_OFFSETS = [((4, 4), "left"), ((4, -11), "left"), ((-4, 4), "right"), ((-4, -11), "right"),
                  ((4, 13), "left"), ((4, -20), "left"), ((-4, 13), "right"), ((-4, -20), "right")]


def _label_front(fig, ax, rows: list[dict], col: str, scale: float, objective: str) -> None:
    """Name each frontier sub-model next to its point, moving a label around its point while it would cover
    another; one that fits nowhere is left out (the table lists every frontier member)."""
    y_of = (lambda r: r["loss"]) if objective == "loss" else (lambda r: r["accuracy"])
    front = sorted((r for r in rows if finite(r.get(col)) and r.get(f"front_{col}")), key=lambda r: r[col])
    renderer = fig.canvas.get_renderer()
    placed = []
    for r in front:
        for offset, ha in _LABEL_OFFSETS:
            text = ax.annotate(r["name"], (r[col] * scale, y_of(r)), fontsize=7, xytext=offset,
                               textcoords="offset points", ha=ha)
            box = text.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            text.remove()


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float(str(v).split("/")[0])


# ------------------------------------------------------------------------------------------- loading inputs


def _run_config(ckpt: Path) -> dict | None:
    """RUN_DIR/config.json of a checkpoint at RUN_DIR/checkpoints/step_X, None if there is none or it is unreadable."""
    run_json = ckpt.parent.parent / "config.json"
    try:
        cfg = json.loads(run_json.read_text(encoding="utf-8")) if run_json.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _pretraining_config(path: Path, meta: dict) -> dict | None:
    """The config of the pre-training run a checkpoint descends from: its own run folder's when that run trained on
    a corpus, else followed back through `extracted_from` (an extracted sub-model) and `init` (sft, rl and the
    post-training stages), so that all of them are measured on the held-out text of the corpus they came from."""
    from elastic_moe.checkpoint import find_checkpoint, read_meta

    todo, seen = [(path, meta)], set()
    while todo and len(seen) < 16:
        ckpt, m = todo.pop(0)
        if ckpt in seen:
            continue
        seen.add(ckpt)
        cfg = _run_config(ckpt)
        if cfg is not None and "seq_len" in (cfg.get("data") or {}):
            return cfg
        for src in ((m.get("extract") or {}).get("extracted_from"), m.get("init"), (cfg or {}).get("init")):
            if isinstance(src, str) and src:
                try:
                    found = find_checkpoint(src)
                    todo.append((found, read_meta(found)))
                except (UserError, OSError):
                    continue
    return None


def load_inputs(ckpt: str | Path, data: str | None = None, device: str = "auto", eval_batch_size: int = 8,
                eval_batches: int = 8, seq_len: int | None = None, log: Callable[[str], None] = print) -> FamilyInputs:
    """A checkpoint (or run directory) with its tokenizer and its run's held-out data (or `data`'s)."""
    from elastic_moe.checkpoint import load_checkpoint
    from elastic_moe.shards import prepare_data

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, meta = load_checkpoint(ckpt, dev)
    path = Path(meta["path"])
    run_cfg = _pretraining_config(path, meta)
    dc = dict((run_cfg or {}).get("data") or {})
    tok_dir = next((p for p in (path / "tokenizer", path.parent.parent / "tokenizer") if (p / "tokenizer.json").is_file()), None)
    if tok_dir is None:
        raise UserError(f"{path}: no tokenizer/ folder next to the checkpoint (needed to read held-out text)")
    if data is None and run_cfg is None:
        raise UserError(f"{path} is not inside a run directory: pass --data (the corpus to take held-out text from)")
    sl = min(seq_len or dc.get("seq_len") or 128, model.cfg.max_position_embeddings)  # a model of a short context
    corpus = data if data is not None else dc.get("path")
    prepared = prepare_data(corpus, None, vocab_size=model.cfg.vocab_size,
                            seq_len=sl, heldout_frac=dc.get("heldout_frac", 0.01),
                            tokenizer_sample_mb=dc.get("tokenizer_sample_mb", 10.0),
                            jsonl_field=dc.get("jsonl_field", "text"), max_bytes=dc.get("max_bytes"),
                            tokenizer=tok_dir, cache_dir=dc.get("cache_dir"), progress=False, log=lambda _: None)
    batches = prepared.heldout_batches(eval_batch_size, eval_batches)
    if not batches:
        raise UserError(f"no held-out sequence of {sl} tokens in the data")
    fingerprint = meta.get("sha256", {}).get("model.safetensors") or str(path)
    log(f"checkpoint {path} (step {meta.get('step', '?')}), {len(batches)} held-out batch(es) of "
        f"{eval_batch_size} x {sl} tokens, device {dev}")
    return FamilyInputs(model.eval(), fingerprint, batches, f"{prepared.shards_dir}|{sl}", prepared.tokenizer,
                        str(path), prepared, run_cfg, corpus)
