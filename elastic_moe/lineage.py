"""Lineage of a multi-stage run (the post-training pipeline): a stage runs once, records the checkpoints it read
and wrote (paths and sha256) with its config and the config's hash in STAGE.json and DIR/lineage.json, and is
skipped by a second run only when its settings and inputs are the same."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from elastic_moe.atomic import atomic_write_json, read_json
from elastic_moe.errors import UserError
from elastic_moe.tomlconfig import changed_settings

STAGE_FILE = "STAGE.json"


def checkpoint_record(path: str | Path) -> dict:
    from elastic_moe.checkpoint import find_checkpoint, read_meta

    ckpt = find_checkpoint(path)
    return {"path": str(ckpt), "sha256": read_meta(ckpt).get("sha256", {}).get("model.safetensors")}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def stage_done(out: Path, name: str, inputs: dict[str, str | Path], config: dict) -> dict | None:
    """The record of a finished stage, None if it has not finished; a stage finished with other settings or from
    other input checkpoints is refused (one line), since the stages after it were built on what it made."""
    done = out / name / STAGE_FILE
    if not done.is_file():
        return None
    rec = read_json(done)
    # the init checkpoint's path is left out: its content is compared below, so a moved folder is fine
    changed = changed_settings(rec.get("config", {}), config, skip=("init",))
    old = rec.get("inputs", {})
    changed += [f"input {k} is another checkpoint" for k, v in inputs.items()
                if k in old and old[k]["sha256"] != checkpoint_record(v)["sha256"]]
    changed += [f"input {k} is new" for k in inputs if k not in old]
    changed += [f"input {k} is gone" for k in old if k not in inputs]
    if changed:
        raise UserError(f"stage {name} in {out} finished with other settings ({'; '.join(changed[:4])}"
                        f"{'; ...' if len(changed) > 4 else ''}): use another output folder, or remove {out / name} "
                        "and the stages after it to train them again")
    path = Path(rec["output"]["path"])  # kept inside the stage's folder: found there if the run folder was moved
    if name in path.parts:
        path = out.joinpath(name, *path.parts[len(path.parts) - path.parts[::-1].index(name):])
    if not path.is_dir():
        raise UserError(f"stage {name} in {out} is marked finished but its checkpoint {path} is missing: remove "
                        f"{out / name} to train it again")
    rec["output"]["path"] = str(path)
    return rec


def run_stage(out: Path, name: str, inputs: dict[str, str | Path], config: dict,
              fn: Callable[[Path], Path], log: Callable[[str], None], elapsed_s: float | None = None) -> Path:
    """Run `fn(stage_dir) -> output checkpoint` unless out/name/STAGE.json says it is done; record its lineage.
    With `elapsed_s`, the work was done elsewhere (an expert trained in the pool, which said "starting" itself) and
    `fn` only hands over its output."""
    d = out / name
    done = d / STAGE_FILE
    rec = stage_done(out, name, inputs, config)
    if rec is not None:
        _record_lineage(out, rec)  # a kill between STAGE.json and lineage.json left the stage out of it
        log(f"[{name}] done already: {rec['output']['path']}")
        return Path(rec["output"]["path"])
    if elapsed_s is None:
        log(f"[{name}] starting")
    t0 = time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    output = fn(d)
    rec = {"stage": name, "inputs": {k: checkpoint_record(v) for k, v in inputs.items()},
           "output": checkpoint_record(output), "config": config, "config_sha256": config_hash(config),
           "time_s": time.perf_counter() - t0 if elapsed_s is None else elapsed_s, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(done, rec)
    _record_lineage(out, rec)
    log(f"[{name}] done in {rec['time_s']:.0f} s: {rec['output']['path']}")
    return Path(rec["output"]["path"])


def _lineage(out: Path) -> list[dict]:
    lineage = out / "lineage.json"
    return read_json(lineage).get("stages", []) if lineage.is_file() else []


def _record_lineage(out: Path, rec: dict) -> None:
    stages = _lineage(out)
    if rec in stages:
        return
    atomic_write_json(out / "lineage.json", {"stages": [s for s in stages if s["stage"] != rec["stage"]] + [rec]})


def stage_seconds(out: Path) -> float:
    """The time of every finished stage of the pipeline in `out` (each as its finishing session measured it)."""
    return sum(s.get("time_s", 0.0) for s in _lineage(out))
