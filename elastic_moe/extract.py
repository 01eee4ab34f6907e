"""Pick the best measured sub-model under a budget and write it out as a standalone model.

    inp = load_inputs("runs/tiny")
    report = extract_under_budget(inp, "out/small", Budget("latency_ms", 5.0))

Steps: reuse the family table of the checkpoint (CKPT/family, measuring what is missing, cached), take the sub-model
with the best quality whose cost is within the budget (it is on the measured frontier of that cost by
construction), build it with `hf.extract`, check its logits against the elastic forward at the same spec, re-estimate
the router's correction bias for the kept experts (aux-loss-free updates on training batches until the load is
balanced; kept only if the held-out loss gets at most 0.01 nats worse), optionally heal it by continued pre-training, and save
it (our checkpoint format, and with `hf_dir` a Hugging Face folder too).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from elastic_moe.atomic import atomic_dir, atomic_write_json, read_json, refuse_inside_corpus, refuse_occupied
from elastic_moe.checkpoint import save_checkpoint, torch_state
from elastic_moe.errors import Interrupted, UserError
from elastic_moe.family import META, TABLE, FamilyInputs, Space, load_table, run_family, standalone
from elastic_moe.measure import MeasureConfig, heldout_loss, peak_memory_mb, speed_cols, speed_settings, time_models
from elastic_moe.model import ElasticMoE
from elastic_moe.pareto import pareto_front, quality
from elastic_moe.spec import SubModelSpec

KINDS = ("total_params", "active_params", "latency_ms", "memory_mb")
HEAL_OF = "heal_of.json"  # in a heal run directory: which cut, how many tokens, which lr


@dataclass
class Budget:
    kind: str  # one of KINDS
    limit: float
    batch_size: int = 1  # latency and memory: at this batch size
    latency: str = "decode"  # decode (ms per token) | prefill (ms)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"budget kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.latency not in ("decode", "prefill"):
            raise UserError(f"latency {self.latency!r}: expected decode or prefill")
        if not self.limit > 0:
            raise UserError(f"budget {self.limit} must be positive")

    @property
    def column(self) -> str:
        pre, dec, mem = speed_cols(self.batch_size)
        return {"latency_ms": dec if self.latency == "decode" else pre, "memory_mb": mem}.get(self.kind, self.kind)

    @property
    def measured(self) -> bool:
        return self.kind in ("latency_ms", "memory_mb")

    def label(self) -> str:
        if self.kind == "latency_ms":
            what = "decode latency per token" if self.latency == "decode" else "prefill latency"
            return f"{what} at batch {self.batch_size}"
        if self.kind == "memory_mb":
            return f"peak memory at batch {self.batch_size}"
        return self.kind.replace("_", " ")

    def fmt(self, v: float) -> str:
        if self.kind.endswith("params"):
            return f"{v / 1e6:.3f} M"
        return f"{v:.3f} ms" if self.kind == "latency_ms" else f"{v:.1f} MB"


def parse_count(text: str) -> int:
    """'1.5M', '300k', '2e6', '1200000' -> an integer count."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult != 1 else t) * mult)
    except (ValueError, OverflowError):
        raise UserError(f"expected a parameter count like 1.5M, 300k or 2e6, got {text!r}") from None


def choose(rows: list[dict], budget: Budget, objective: str = "loss") -> tuple[dict, list[dict]]:
    """(best row within the budget, all extractable rows within it). Raises a one-line UserError listing the closest
    options when nothing fits."""
    col = budget.column
    usable = [r for r in rows if r.get("extractable") and isinstance(r.get(col), (int, float))]
    if not usable:
        raise UserError(f"the family table has no extractable sub-model with a measured {col}")
    fits = [r for r in usable if r[col] <= budget.limit]
    if not fits:
        closest = sorted(usable, key=lambda r: r[col])[:3]
        opts = ", ".join(f"{r['name']} ({budget.fmt(r[col])}, loss {r['loss']:.3f})" for r in closest)
        raise UserError(f"no measured sub-model has {budget.label()} <= {budget.fmt(budget.limit)}; "
                        f"closest: {opts}")
    best = min(fits, key=lambda r: (quality(r, objective), r[col]))
    return best, fits


def on_frontier(rows: list[dict], row: dict, col: str, objective: str = "loss") -> bool:
    usable = [r for r in rows if r.get("extractable")]
    return any(usable[i]["name"] == row["name"] for i in pareto_front(usable, col, objective))


def family_table(inp: FamilyInputs, budget: Budget, folder: Path, objective: str, progress: bool,
                 say: Callable[[str], None]) -> tuple[list[dict], dict]:
    """The family table of this checkpoint with the budget's column: reused as is when it has it, else measured
    (with the old table's settings, so its cache answers for everything measured before)."""
    old = load_table(folder)
    if old is None and (folder / TABLE).is_file():
        say(f"family table {folder} is unreadable (a damaged {TABLE} or {META}, or the two are of different "
            "runs): measuring again")
    if old is not None and old[1].get("fingerprint") != inp.fingerprint:
        say(f"family table {folder} is of other weights: measuring again")
        old = None
    mc, space, search, max_measured = MeasureConfig(batch_sizes=(budget.batch_size,)), Space(), "auto", 64
    if old is not None:
        rows, meta = old
        try:  # also read when the table is reused as is: re-balancing and re-measuring take the settings from it
            m = dict(meta["measure"])
            m["batch_sizes"] = tuple(m["batch_sizes"])
            mc, space = MeasureConfig(**m), Space(**meta["space"])
            mc.validate()
            search, max_measured = meta["search"]["mode"], max(64, meta["search"]["measured"])
        except (KeyError, TypeError, ValueError):
            say(f"family table {folder}: its settings in {META} are damaged: measuring with the default ones")
            mc, space, search, max_measured = MeasureConfig(batch_sizes=(budget.batch_size,)), Space(), "auto", 64
        else:
            if all(budget.column in r for r in rows) and meta.get("objective") == objective:
                say(f"using the family table {folder} ({len(rows)} sub-models)")
                return rows, meta
    if budget.measured and budget.batch_size not in mc.batch_sizes:
        mc.batch_sizes = (*mc.batch_sizes, budget.batch_size)
    say(f"measuring the family into {folder} (cached measurements are reused)")
    res = run_family(inp, folder, space, mc, search, max_measured, objective, progress=progress, log=say)
    return res.rows, res.meta


# ----------------------------------------------------------------------------------------------- checks


@torch.no_grad()
def max_logit_diff(model: ElasticMoE, sub: ElasticMoE, spec, x: torch.Tensor) -> float:
    model.eval()
    sub.eval()
    x = x.to(next(model.parameters()).device)
    return float((model(x, spec).logits - sub(x).logits).abs().max())


@torch.no_grad()
def expert_loads(sub: ElasticMoE, batches: list) -> dict[int, torch.Tensor]:
    """Routed (token, slot) pairs per expert of every MoE layer over `batches` (the load counters are left at 0)."""
    device = next(sub.parameters()).device
    for i in sub.moe_layers:
        sub.moe(i).reset_load()
    for x, _ in batches:
        sub(x.to(device), track_load=True)
    loads = {i: sub.moe(i).load.clone() for i in sub.moe_layers}
    for i in sub.moe_layers:
        sub.moe(i).reset_load()
    return loads


def imbalance(loads: dict[int, torch.Tensor]) -> float:
    """The worst layer's max load / mean load (1 = perfectly balanced)."""
    vals = [float(v.max() / v.mean().clamp(min=1e-9)) for v in loads.values()]
    return max(vals) if vals else 1.0


@torch.no_grad()
def rebalance(sub: ElasticMoE, train_batches: list, heldout: list, rate: float, rounds: int = 6, decay: float = 0.8,
              target: float = 1.1, tolerance: float = 0.01) -> dict:
    """Re-estimate the selection bias of the kept experts with the pre-training's aux-loss-free rule
    (bias += rate * sign(mean load - load), one update per training batch), in rounds over `train_batches` with the
    rate shrinking by `decay` each round (sign updates only settle with a shrinking step), until the worst layer's
    max/mean load is <= target. Of the biases after each round (and the original), the best balanced one whose
    held-out loss is at most `tolerance` nats worse than the original's is kept. Load counters end at zero."""
    sub.eval()
    if not sub.moe_layers:
        return {"action": "none (no MoE layer)", "updates": 0}
    device = next(sub.parameters()).device

    def state() -> dict:
        return {"bias": {i: sub.moe(i).bias.clone() for i in sub.moe_layers},
                "imbalance": imbalance(expert_loads(sub, train_batches)), "loss": heldout_loss(sub, None, heldout)}

    path = [state()]
    r = rate
    while len(path) <= rounds and path[-1]["imbalance"] > target:
        for x, _ in train_batches:
            sub(x.to(device), track_load=True)
            sub.update_router_bias(r)
        r *= decay
        path.append(state())
    ok = [0] + [n for n, s in enumerate(path) if n and s["loss"] <= path[0]["loss"] + tolerance]
    n = min(ok, key=lambda n: path[n]["imbalance"])
    best = path[n]
    for i, bias in best["bias"].items():
        sub.moe(i).bias.copy_(bias)
        sub.moe(i).reset_load()
    last = path[-1]
    if len(path) == 1:
        action = "bias kept (already balanced)"
    elif n == 0:
        action = (f"bias kept: balancing to {last['imbalance']:.2f} raised the held-out loss by "
                  f"{last['loss'] - path[0]['loss']:.4f} > {tolerance}")
    elif best["imbalance"] > target and last["imbalance"] <= target:
        action = (f"bias re-estimated (balancing to {last['imbalance']:.2f} raised the held-out loss by "
                  f"{last['loss'] - path[0]['loss']:.4f} > {tolerance}; the best round within it was kept)")
    elif best["imbalance"] > target:
        action = f"bias re-estimated (target max/mean <= {target:g} not reached in {len(path) - 1} round(s))"
    else:
        action = "bias re-estimated"
    return {"action": action, "rounds": n, "updates": n * len(train_batches), "rate": rate, "decay": decay,
            "target": target, "tolerance": tolerance,
            "max_over_mean_before": path[0]["imbalance"], "max_over_mean_after": best["imbalance"],
            "heldout_loss_before": path[0]["loss"], "heldout_loss_after": best["loss"],
            "path": [(round(s["imbalance"], 3), round(s["loss"], 5)) for s in path],
            "max_bias_shift": max(float((best["bias"][i] - path[0]["bias"][i]).abs().max()) for i in sub.moe_layers),
            "load_counters": "reset to 0"}


# ------------------------------------------------------------------------------------------------- heal


def heal(sub: ElasticMoE, tokens: int, inp: FamilyInputs, run_dir: Path, lr: float | None = None,
         progress: bool = True, say: Callable[[str], None] = print, cut: dict | None = None,
         start: dict | None = None) -> tuple[ElasticMoE, dict]:
    """Continue pre-training the standalone sub-model for about `tokens` tokens through the pre-training loop.

    `train()` starts from a run directory's latest checkpoint, so the run directory is seeded with a step-0
    checkpoint of the sub-model and a fresh trainer state (new optimizer, the data stream where the original run
    stopped). Settings are the original run's, with the elastic sampling off (the sub-model trains as itself), a
    constant learning rate (default: lr x min_lr_ratio, the run's final one when it ran its whole schedule) after a
    short warm-up, and no intermediate evaluation.
    An interrupted heal (signal: checkpoint, then `Interrupted`) resumes when called again for the same `cut` and
    `start` (how `sub` was made from it: the seeded checkpoint holds that sub-model, not the one passed now).
    """
    from elastic_moe.checkpoint import load_checkpoint
    from elastic_moe.elastic import Importance
    from elastic_moe.runloop import rng_state
    from elastic_moe.tomlconfig import from_dict
    from elastic_moe.train import TRAINER_STATE, TrainConfig, make_optimizer, train

    if inp.data is None:
        raise UserError("--heal needs the run's training data")
    d = json.loads(json.dumps(inp.run_config or asdict(TrainConfig())))
    d["model"] = sub.cfg.to_dict()
    seq_len = inp.data.seq_len
    d["data"]["seq_len"] = seq_len
    t, o = d["train"], d["optim"]
    step_tokens = t["batch_size"] * t["grad_accum"] * seq_len
    steps = max(1, math.ceil(tokens / step_tokens))
    run_lr = lr if lr is not None else o["lr"] * o["min_lr_ratio"]
    o.update(lr=run_lr, min_lr_ratio=1.0, warmup_steps=max(1, steps // 10), schedule_steps=None)
    t.update(max_steps=steps, save_every=0, keep_checkpoints=1, tensorboard=False, progress=progress)
    d["elastic"].update(scheme="per_sample", p_full=1.0)
    for dim in ("depth", "width", "top_k"):
        d["elastic"][dim] = {"p_full": 1.0, "min": None, "max": None}
    d["eval"].update(every=0, submodels=None)
    cfg: TrainConfig = from_dict(TrainConfig, d)

    # what this heal run is of: an interrupted heal resumes only for the same cut, tokens and learning rate
    heal_of = {"checkpoint": str(Path(inp.checkpoint).resolve()), "spec": cut, "tokens": tokens, "lr": run_lr,
               "start": start}
    tok_dir = Path(inp.checkpoint) / "tokenizer"
    device = next(sub.parameters()).device
    # where the original run's data stream stopped: its global sample position
    position = int((json.loads((Path(inp.checkpoint) / "config.json").read_text()).get("tokens") or 0) // seq_len)
    if (run_dir / HEAL_OF).is_file():
        if read_json(run_dir / HEAL_OF) != heal_of:
            raise UserError(f"heal run directory {run_dir} holds the healing of another cut, token count, lr or "
                            "re-balancing; remove it or choose another OUT")
        say(f"healing: resuming {run_dir}")
    elif run_dir.exists():
        raise UserError(f"heal run directory {run_dir} exists; remove it or choose another OUT")
    else:
        stream = inp.data.train_stream(t["batch_size"], seed=t["seed"])
        importance = Importance(sub, cfg.elastic)
        importance.remove_hooks()
        trainer = {"step": 0, "tokens": 0, "elapsed_s": 0.0,
                   "optimizer": make_optimizer(sub, cfg.optim, device).state_dict(),
                   "data": {**stream.state_dict(), "position": position}, "elastic": importance.state_dict(),
                   "rng": rng_state(), "schedule": {"step": 0, "schedule_steps": steps}}
        shutil.copytree(tok_dir, run_dir / "tokenizer")
        save_checkpoint(run_dir / "checkpoints" / "step_00000000", sub, meta={"step": 0, "tokens": 0},
                        tokenizer_dir=tok_dir, extra={TRAINER_STATE: torch_state(trainer)})
        atomic_write_json(run_dir / HEAL_OF, heal_of)  # last: a folder without it was never started
    before = heldout_loss(sub, None, inp.batches)
    say(f"healing: {steps} steps x {step_tokens:,} tokens at lr {run_lr:.2e} through the pre-training loop in {run_dir}")
    summary = train(cfg, run_dir, log=say)
    if summary["interrupted"] or summary.get("stopped_by"):
        raise Interrupted(f"healing stopped at a checkpoint in {run_dir}; run the same command again to resume",
                          summary.get("stopped_by") or signal.SIGINT)
    healed, _ = load_checkpoint(run_dir, device)
    healed.eval()
    after = heldout_loss(healed, None, inp.batches)
    info = {"tokens": summary["tokens"], "steps": summary["step"], "lr": run_lr, "run_dir": str(run_dir),
            "heldout_loss_before": before, "heldout_loss_after": after, "train_loss_last": summary["final_loss"],
            "data_position": position}
    return healed, info


# ------------------------------------------------------------------------------------------------- the job


def extract_under_budget(inp: FamilyInputs, out: str | Path, budget: Budget, *, family_dir: str | Path | None = None,
                         hf_dir: str | Path | None = None, hf_dtype: str = "float32", objective: str = "loss",
                         heal_tokens: int = 0, heal_lr: float | None = None, rebalance_rate: float | None = None, rebalance_batches: int = 4,
                         remeasure: bool = True, force: bool = False, progress: bool = True,
                         say: Callable[[str], None] = print) -> dict:
    out = Path(out)
    if hf_dir is not None and Path(hf_dir).resolve() == out.resolve():
        raise UserError(f"the checkpoint and the Hugging Face folder would both be {out}: give --hf another folder")
    if hf_dir is not None and (out.resolve() in Path(hf_dir).resolve().parents
                               or Path(hf_dir).resolve() in out.resolve().parents):
        # the one put in place last would replace the other's parent folder, or find it occupied
        raise UserError(f"the checkpoint {out} and the Hugging Face folder {hf_dir} would be one inside the other: "
                        "give --hf a folder beside OUT")
    if hf_dir is not None and heal_tokens > 0 and Path(hf_dir).resolve() == heal_dir(out).resolve():
        raise UserError(f"{hf_dir} is the folder the healing runs in: give --hf another folder")
    folder = Path(family_dir) if family_dir else Path(inp.checkpoint) / "family"
    for path in (out, hf_dir):  # both outputs are checked before any work, so neither is written alone
        if path is not None:
            refuse_inside_corpus(path, inp.corpus, "output folder")
            try:
                refuse_occupied(path, force, inputs=(inp.checkpoint, folder))
            except FileExistsError as e:
                raise UserError(str(e)) from None
    model = inp.model.eval()
    rows, meta = family_table(inp, budget, folder, objective, progress, say)
    best, fits = choose(rows, budget, objective)
    col = budget.column
    spec = SubModelSpec.from_dict(best["spec"])
    overall = min((r for r in rows if r.get("extractable")), key=lambda r: quality(r, objective))
    say(f"chose {best['name']} ({spec.describe()}): the lowest held-out loss ({best['loss']:.4f}) of the {len(fits)} "
        f"measured sub-models with {budget.label()} <= {budget.fmt(budget.limit)} (its own: {budget.fmt(best[col])}; "
        f"{best['active_params'] / 1e6:.3f} M active, {best['total_params'] / 1e6:.3f} M total). "
        f"Best without the budget: {overall['name']} (loss {overall['loss']:.4f}, {budget.fmt(overall[col])})")

    # standalone model, checked against the elastic forward before anything changes it
    from elastic_moe.hf import export_hf, extract

    rs = model.resolve(spec)
    sub = extract(model, rs).eval()
    if bool(model.layer_order_set):  # carry the measured layer order, restricted to the kept layers
        kept = sorted(rs.layers, key=lambda i: model.layer_order.tolist().index(i))
        sub.set_layer_order([rs.layers.index(i) for i in kept])
    diff = max_logit_diff(model, sub, rs, inp.batches[0][0])
    if not diff < 1e-4:
        raise UserError(f"extracted model differs from the elastic forward at {best['name']} by {diff:.2e} (logits)")
    say(f"checked: logits of the standalone model equal the elastic forward at that spec (max |diff| {diff:.1e})")

    rate = rebalance_rate
    if rate is None:  # 10x the run's rate: the bias has to move far in a few hundred updates, not thousands
        rate = 10 * float(((inp.run_config or {}).get("train") or {}).get("router_bias_rate") or 1e-3)
    train_batches = []
    if inp.data is not None and rebalance_batches > 0:
        stream = inp.data.train_stream(meta["measure"]["eval_batch_size"], seed=12345)
        train_batches = [stream.next_batch() for _ in range(rebalance_batches)]
    if train_batches and sub.moe_layers:
        rb = rebalance(sub, train_batches, inp.batches, rate)  # the family table's held-out batches
        say(f"router bias: {rb['action']} after {rb['updates']} update(s) at rate {rate:g}; worst max/mean expert "
            f"load {rb['max_over_mean_before']:.2f} -> {rb['max_over_mean_after']:.2f}, held-out loss "
            f"{rb['heldout_loss_before']:.4f} -> {rb['heldout_loss_after']:.4f}; load counters reset")
    else:
        for i in sub.moe_layers:
            sub.moe(i).reset_load()
        rb = {"action": "bias left as trained, load counters reset (no re-balancing batches)" if sub.moe_layers
              else "none (no MoE layer)", "updates": 0}
        say(f"router bias: {rb['action']}")

    healed = None
    if heal_tokens > 0:
        # what the heal starts from: the sub-model as re-balanced now
        start = {"rebalance_rate": rate if train_batches else None, "rebalance_batches": len(train_batches)}
        sub, healed = heal(sub, heal_tokens, inp, heal_dir(out), heal_lr, progress, say, cut=best["spec"],
                           start=start)
        say(f"healed: held-out loss {healed['heldout_loss_before']:.4f} -> {healed['heldout_loss_after']:.4f} "
            f"after {healed['tokens']:,} tokens")

    remeasured = None
    if remeasure and budget.measured:
        others = [r for r in rows if r["name"] != best["name"]]
        remeasured = remeasure_row(sub, model, budget, meta, others, say)
        remeasured["table"] = best[col]
        remeasured["rel_error"] = (remeasured["value"] - best[col]) / best[col]
        msg = f"table {budget.fmt(best[col])} vs re-measured {budget.fmt(remeasured['value'])}: {100 * remeasured['rel_error']:+.1f}%"
        if "machine_factor" in remeasured:
            f = remeasured["machine_factor"]
            remeasured["rel_error_machine_corrected"] = remeasured["value"] / (best[col] * f) - 1
            msg += (f" (the full model takes {f:.2f}x its time at family time; corrected for that: "
                    f"{100 * remeasured['rel_error_machine_corrected']:+.1f}%)")
        say(msg)

    tok = Path(inp.checkpoint) / "tokenizer"
    tok = tok if tok.is_dir() else None
    report = {"extracted_from": inp.checkpoint, "fingerprint": inp.fingerprint, "name": best["name"],
              "spec": best["spec"], "budget": asdict(budget), "column": col, "family_row": best,
              "family_table": str(folder), "on_frontier": on_frontier(rows, best, col, objective),
              "elastic_max_abs_diff": diff, "rebalance": rb, "heal": healed, "remeasured": remeasured}
    if hf_dir is not None:
        report["hf_dir"], report["hf_dtype"] = str(hf_dir), hf_dtype
    # both outputs are written into temporary folders and put in place together: never one without the other
    with contextlib.ExitStack() as stack:
        ck_tmp = stack.enter_context(atomic_dir(out, force))
        hf_tmp = stack.enter_context(atomic_dir(hf_dir, force)) if hf_dir is not None else None
        save_checkpoint(ck_tmp, sub, meta={"extract": report}, tokenizer_dir=tok, force=True)
        if hf_tmp is not None:
            export_hf(sub, hf_tmp, None, tok, force=True, dtype=hf_dtype)
    say(f"wrote {out} ({sub.num_params() / 1e6:.3f} M parameters)")
    if hf_dir is not None:
        say(f"wrote Hugging Face folder {hf_dir}")
    return report


def heal_dir(out: str | Path) -> Path:
    """The run folder the healing of OUT trains in, beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.heal"


def remeasure_row(sub: ElasticMoE, model: ElasticMoE, budget: Budget, meta: dict, rows: list[dict],
                  say: Callable[[str], None]) -> dict:
    """Time and weigh the extracted model again with the family's settings, to compare with the table.

    It is timed as the table's figures were: round-robin in a chunk of the same size, with the full model (the
    family's anchor, timed with every chunk of the family run) and other members of the family as company, so
    caches and clocks are as busy as they were. Anchor now / anchor then says how much slower or faster the
    machine is than when the table was measured, which on a shared machine is most of any remaining difference."""
    m = dict(meta["measure"])
    m["batch_sizes"] = (budget.batch_size,)
    mc = MeasureConfig(**m)
    device = next(sub.parameters()).device
    want = meta.get("speed_settings", {})
    threads = torch.get_num_threads()
    if want.get("threads") and want["threads"] != threads:
        torch.set_num_threads(want["threads"])
    try:
        now = speed_settings(mc, device)
        if want.get("device_name") and want["device_name"] != now["device_name"]:
            say(f"note: the table was measured on {want['device_name']}, this is {now['device_name']}")
        company = [standalone(model, model.resolve(SubModelSpec.from_dict(r["spec"])))
                   for r in [r for r in rows if r.get("extractable")][: max(0, mc.chunk - 1)]]
        tm, anchor, *_ = time_models([(sub, None), standalone(model, model.resolve(None)), *company],
                                     budget.batch_size, mc)
        tm["memory_mb"] = peak_memory_mb(sub, None, budget.batch_size, mc)
    finally:
        torch.set_num_threads(threads)
    key = {"latency_ms": "decode_ms" if budget.latency == "decode" else "prefill_ms", "memory_mb": "memory_mb"}[budget.kind]
    tm["value"] = tm[key]
    then = (meta.get("anchor") or {}).get(str(budget.batch_size))
    if key != "memory_mb" and then:
        tm["anchor_then_ms"], tm["anchor_now_ms"] = then[key], anchor[key]
        tm["machine_factor"] = anchor[key] / then[key]
    say(f"re-measured {budget.label()}: {budget.fmt(tm[key])} (decode {tm['decode_ms']:.3f} ms/token, prefill "
        f"{tm['prefill_ms']:.3f} ms, memory {tm['memory_mb']:.1f} MB)")
    return tm
