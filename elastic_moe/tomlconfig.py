"""Dataclass configs loaded from TOML, with `--set section.key=value` overrides and strict key checking.

Every run config in this project is a (possibly nested) dataclass. `load_config(cls, path, overrides)` reads the
file, applies overrides, rejects unknown keys with a one-line error that names them, and checks types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from pathlib import Path

from elastic_moe.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"malformed config {path}: {e}") from None


def parse_value(text: str):
    """Parse the right-hand side of `--set key=value` as a TOML value, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a section (the config has {part} = {node!r})")
        node[parts[-1]] = parse_value(value.strip())
    return data


def _check_type(name: str, value, tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:  # an optional value: its own error names what is wrong (a typo in a nested table)
            return _check_type(name, value, kinds[0])
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(name, value, a)
            except UserError:
                continue
        raise UserError(f"config key {name}: {value!r} is not a {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {name}: expected a list, got {value!r}")
        inner = args[0] if args else typing.Any
        items = [_check_type(name, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {name}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=name + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"config key {name}: {value} is out of range") from None
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"config key {name}: expected true/false, got {value!r}")
    if tp in (int, float, str) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"config key {name}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)} (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(prefix + k, v, hints[k]) for k, v in data.items()}
    for k, v in kwargs.items():  # rules for every config, so that no value fails late inside torch or numpy
        if k.endswith("seed") and isinstance(v, int) and not 0 <= v < 2**63:
            raise UserError(f"config key {prefix + k} = {v}: seeds must be in [0, 2**63)")
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"config key {prefix + k} = {v}: must be a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63:
            raise UserError(f"config key {prefix + k} = {v}: out of range")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    data = read_toml(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides or []))


def changed_settings(old: dict, new: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """`key.sub old -> new` for every leaf that differs between two config dicts (both compared as JSON has them,
    so a tuple equals the list it was saved as); top-level keys in `skip` are left out."""
    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items() if prefix or k not in skip
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}

    a, b = flat(json.loads(json.dumps(old))), flat(json.loads(json.dumps(new)))
    return [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def note_changed_settings(run_dir: Path, new: dict, say, skip: tuple[str, ...] = ()) -> None:
    """Before a resumed run overwrites RUN_DIR/config.json: say which settings differ from the last session's."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError too
        raise UserError(f"{path} is corrupt ({e}); use another output folder") from None
    changed = changed_settings(old, new, skip)
    if changed:
        say("note: settings changed since the last session: " + "; ".join(changed))
