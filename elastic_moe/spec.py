"""Sub-model specs: which layers run, which experts each MoE layer keeps, and the routing top-k.

A `SubModelSpec` is what a user writes (`--layers 6 --experts 8 --top-k 1`); `resolve` turns it into a
`ResolvedSpec` with explicit layer ids, explicit expert ids per MoE layer and a top-k per MoE layer, checked
against the model config. Nothing is copied: the elastic forward masks the router and skips layers.

- layers: None (all), an int n (the first n of the model's measured layer order, else n evenly spaced layers
  keeping the first and the last), or explicit ids.
- experts: None (all), an int m (the first m experts of each MoE layer in the layer's expert order, which the
  importance policy of elastic training keeps sorted so sub-models are nested), or per-MoE-layer explicit ids.
- top_k: None (the config's moe_k), an int, or one per MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError


@dataclass(frozen=True)
class SubModelSpec:
    layers: int | tuple[int, ...] | None = None
    experts: int | tuple[tuple[int, ...], ...] | None = None
    top_k: int | tuple[int, ...] | None = None

    @classmethod
    def parse(cls, layers: str | int | None = None, layer_ids: str | None = None, experts: str | int | None = None,
              top_k: str | int | None = None) -> SubModelSpec:
        """From CLI strings: --layers N | --layer-ids i,j | --experts M | --top-k K (or k1,k2,... per MoE layer)."""
        if layers is not None and layer_ids is not None:
            raise UserError("give --layers or --layer-ids, not both")

        def ints(text, what):
            try:
                return tuple(int(t) for t in str(text).split(",") if t.strip())
            except ValueError:
                raise UserError(f"{what} must be integers, got {text!r}") from None

        def one(text, what):
            vals = ints(text, what)
            if len(vals) != 1:
                raise UserError(f"{what} takes one integer, got {text!r}")
            return vals[0]

        lay = ints(layer_ids, "--layer-ids") if layer_ids is not None else (one(layers, "--layers") if layers is not None else None)
        exp = one(experts, "--experts") if experts is not None else None
        k = None
        if top_k is not None:
            ks = ints(top_k, "--top-k")
            k = ks[0] if len(ks) == 1 else ks
        return cls(lay, exp, k)

    def to_dict(self) -> dict:
        return {"layers": _jsonable(self.layers), "experts": _jsonable(self.experts), "top_k": _jsonable(self.top_k)}

    @classmethod
    def from_dict(cls, d: dict) -> SubModelSpec:
        """From `to_dict`'s JSON; the types are checked by `resolve`."""
        if not isinstance(d, dict) or set(d) - {"layers", "experts", "top_k"}:
            raise UserError(f"sub-model spec {d!r}: expected an object with layers, experts and top_k")
        return cls(_tupled(d.get("layers")), _tupled(d.get("experts")), _tupled(d.get("top_k")))

    def describe(self) -> str:
        def short(v):
            if v is None:
                return "all"
            if isinstance(v, tuple) and v and isinstance(v[0], tuple):
                return "/".join(str(len(t)) for t in v)
            return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

        return f"layers={short(self.layers)} experts={short(self.experts)} top_k={short(self.top_k) if self.top_k is not None else 'default'}"


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(t) for t in v]
    return v


def _tupled(v):
    if isinstance(v, list):
        return tuple(_tupled(t) for t in v)
    return v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v) -> bool:
    return isinstance(v, (tuple, list)) and all(_is_int(t) for t in v)


def check_types(spec: SubModelSpec) -> None:
    """A spec from JSON or Python code may hold anything: refuse what is not a count or a list of ids."""
    if not (spec.layers is None or _is_int(spec.layers) or _ints(spec.layers)):
        raise UserError(f"sub-model spec: layers={spec.layers!r}: expected a count or a list of layer ids")
    if not (spec.experts is None or _is_int(spec.experts)
            or isinstance(spec.experts, (tuple, list)) and all(_ints(t) for t in spec.experts)):
        raise UserError(f"sub-model spec: experts={spec.experts!r}: expected a count or one list of expert ids "
                        f"per MoE layer")
    if not (spec.top_k is None or _is_int(spec.top_k) or _ints(spec.top_k)):
        raise UserError(f"sub-model spec: top_k={spec.top_k!r}: expected a count or one per MoE layer")


FULL = SubModelSpec()


@dataclass(frozen=True)
class ResolvedSpec:
    layers: tuple[int, ...]  # kept layer ids, increasing
    experts: dict[int, tuple[int, ...] | None]  # MoE layer id -> kept expert ids (None: all), kept MoE layers only
    top_k: dict[int, int]  # MoE layer id -> k

    def is_full(self, cfg: ModelConfig) -> bool:
        return (len(self.layers) == cfg.num_hidden_layers and all(v is None for v in self.experts.values())
                and all(k == cfg.moe_k for k in self.top_k.values()))

    def num_experts(self, layer: int, cfg: ModelConfig) -> int:
        e = self.experts.get(layer)
        return cfg.moe_num_experts if e is None else len(e)


def param_counts(cfg: ModelConfig, rs: ResolvedSpec) -> tuple[int, int]:
    """(total, active) parameters of the sub-model, from ModelConfig.num_params layer by layer."""
    total, active = cfg.num_params([]), cfg.num_params([], active=True)
    for i in rs.layers:
        m = rs.num_experts(i, cfg) if i in rs.experts else None
        total += cfg.num_params([i], experts=m) - cfg.num_params([])
        active += cfg.num_params([i], experts=m, top_k=rs.top_k.get(i), active=True) - cfg.num_params([], active=True)
    return total, active


def default_layers(cfg: ModelConfig, n: int) -> tuple[int, ...]:
    """The n layers kept when only a count is given: evenly spaced, always keeping the first and the last."""
    L = cfg.num_hidden_layers
    if n == L:
        return tuple(range(L))
    if n == 1:
        return (L - 1,)
    return tuple(sorted({round(i * (L - 1) / (n - 1)) for i in range(n)}))


def resolve(spec: SubModelSpec | None, cfg: ModelConfig, expert_order: dict[int, list[int]] | None = None,
            layer_order: list[int] | None = None) -> ResolvedSpec:
    """Check `spec` against `cfg` and make it explicit.

    expert_order: per MoE layer, expert ids from most to least important ("the first m experts"); identity if None.
    layer_order: layer ids from most to least important, used when `layers` is a count; evenly spaced if None.
    """
    spec = spec or FULL
    check_types(spec)
    L, E = cfg.num_hidden_layers, cfg.moe_num_experts
    if spec.layers is None:
        layers = tuple(range(L))
    elif isinstance(spec.layers, int):
        if not 1 <= spec.layers <= L:
            raise UserError(f"sub-model spec: layers={spec.layers} must be between 1 and {L}")
        layers = tuple(sorted(layer_order[: spec.layers])) if layer_order else default_layers(cfg, spec.layers)
    else:
        layers = tuple(spec.layers)
        if not layers:
            raise UserError("sub-model spec: no layers kept")
        bad = [i for i in layers if not 0 <= i < L]
        if bad:
            raise UserError(f"sub-model spec: layer id(s) {bad} out of range 0..{L - 1}")
        if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
            raise UserError(f"sub-model spec: layer ids must be increasing and distinct, got {list(layers)}")
    moe = [i for i in cfg.moe_layers]
    kept_moe = [i for i in layers if i in moe]

    experts: dict[int, tuple[int, ...] | None] = {}
    if spec.experts is None:
        experts = {i: None for i in kept_moe}
    elif isinstance(spec.experts, int):
        m = spec.experts
        if not 1 <= m <= E:
            raise UserError(f"sub-model spec: experts={m} must be between 1 and {E}")
        for i in kept_moe:
            order = expert_order[i] if expert_order else list(range(E))
            experts[i] = None if m == E else tuple(sorted(order[:m]))
    else:
        if len(spec.experts) != len(moe):
            raise UserError(f"sub-model spec: experts lists {len(spec.experts)} MoE layers, the model has {len(moe)}")
        for i, ids in zip(moe, spec.experts):
            ids = tuple(ids)
            if not ids:
                raise UserError(f"sub-model spec: layer {i} keeps no experts")
            bad = [e for e in ids if not 0 <= e < E]
            if bad:
                raise UserError(f"sub-model spec: expert index {bad} out of range 0..{E - 1} in layer {i}")
            if len(set(ids)) != len(ids):
                raise UserError(f"sub-model spec: duplicate expert ids in layer {i}")
            if i in kept_moe:
                experts[i] = None if len(ids) == E else tuple(sorted(ids))

    if spec.top_k is None:
        given = {}
    elif isinstance(spec.top_k, int):
        given = dict.fromkeys(moe, spec.top_k)
    else:
        if len(spec.top_k) != len(moe):
            raise UserError(f"sub-model spec: top_k lists {len(spec.top_k)} MoE layers, the model has {len(moe)}")
        given = dict(zip(moe, spec.top_k))
    ks = {i: given.get(i, cfg.moe_k) for i in kept_moe}
    for i, k in {**given, **ks}.items():  # every value given is checked, also those of layers the spec drops
        n = (E if spec.experts is None else spec.experts if isinstance(spec.experts, int)
             else len(spec.experts[moe.index(i)]))
        if k < 1:
            raise UserError(f"sub-model spec: top_k={k} must be >= 1")
        if k > n:
            raise UserError(f"sub-model spec: top_k={k} exceeds the {n} experts kept in layer {i}")
    return ResolvedSpec(layers, experts, ks)
