"""Elastic sub-model sampling for once-for-all pre-training (ERNIE 5.0), and the importance orders behind it.

Two schemes, set in the TOML `[elastic]` section:

- per_sample (ERNIE 5.0): every sequence of a batch gets its own sub-model and the whole batch runs in one forward
  and one backward (the model takes a list of per-row specs). A sequence is the full model w.p. `p_full`;
  otherwise each dimension (depth = layers kept, width = experts kept, top_k) stays full w.p. its own `p_full`
  and is otherwise drawn uniformly from [min, max]. All probabilities 1 is the plain non-elastic baseline, run
  through the same code path.
- sandwich (BigNAS): every micro-batch goes through the largest, the smallest and `sandwich_random` random
  sub-models (rows repeated, still one forward), optionally distilling each one from the detached largest.

Which layers a depth-n sub-model keeps, and which experts a width-m one keeps:
- random: a uniformly random subset per sequence (explicit ids in the spec), as ERNIE reports;
- importance: the first n (m) of `model.layer_order` (each MoE layer's `expert_order`), rewritten every
  `reorder_every` steps by `Importance` (experts by routing mass accumulated during training, layers by block
  influence 1 - cos(h_in, h_out) on the current training batch), so sub-models are nested;
- keep_last (layers only): the last n layers; even (layers only): evenly spaced, first and last kept.

Sampling is a pure function of (seed, step, micro-step, global row): every rank draws the same specs for the
global batch, a resumed run draws what the uninterrupted run would have, and N ranks x B rows equal one process
with N*B rows.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.spec import ResolvedSpec, SubModelSpec, resolve

SCHEMES = ("per_sample", "sandwich")
LAYER_POLICIES = ("random", "importance", "keep_last", "even")
EXPERT_POLICIES = ("random", "importance")
FULL = SubModelSpec()


@dataclass
class DimRange:
    p_full: float = 0.8  # probability that this dimension stays at its full value; 1: not elastic
    min: int | None = None  # None: half of the full value (width: at least the largest top-k)
    max: int | None = None  # None: one less than the full value


@dataclass
class ElasticConfig:
    scheme: str = "per_sample"
    p_full: float = 0.0  # per_sample: probability that a sequence is the full model before any dimension is drawn
    depth: DimRange = field(default_factory=DimRange)
    width: DimRange = field(default_factory=DimRange)
    top_k: DimRange = field(default_factory=DimRange)
    layer_policy: str = "random"
    expert_policy: str = "random"
    reorder_every: int = 50  # steps between rewrites of the importance orders
    importance_decay: float = 0.9  # expert score = decay * score + routing mass of the last window
    sandwich_random: int = 2  # random sub-models per micro-batch besides the largest and the smallest
    distill_weight: float = 0.0  # weight of KL(full || sub-model) on sub-model rows, full detached (in-place KD)
    full_steps: int = 0  # per_sample: every row is the full model for the first N steps, sub-models after

    def validate(self) -> None:
        for name, v, ok in [("scheme", self.scheme, SCHEMES), ("layer_policy", self.layer_policy, LAYER_POLICIES),
                            ("expert_policy", self.expert_policy, EXPERT_POLICIES)]:
            if v not in ok:
                raise UserError(f"elastic.{name} = {v!r}: expected one of {', '.join(ok)}")
        for name, p in [("p_full", self.p_full), ("depth.p_full", self.depth.p_full),
                        ("width.p_full", self.width.p_full), ("top_k.p_full", self.top_k.p_full)]:
            if not 0.0 <= p <= 1.0:
                raise UserError(f"elastic.{name} = {p} is not a probability")
        if self.reorder_every < 1 or self.sandwich_random < 0 or self.distill_weight < 0:
            raise UserError("elastic: reorder_every must be >= 1, sandwich_random and distill_weight >= 0")
        if not 0.0 <= self.importance_decay <= 1.0:
            raise UserError(f"elastic.importance_decay = {self.importance_decay} must be in [0, 1]")
        if self.full_steps < 0 or (self.full_steps > 0 and self.scheme != "per_sample"):
            raise UserError(f"elastic.full_steps = {self.full_steps}: needs scheme = \"per_sample\" and >= 0")

    def ranges(self, cfg: ModelConfig) -> Ranges:
        """The [min, max] of every elastic dimension for this model; impossible ranges are a one-line UserError."""
        L, E, K = cfg.num_hidden_layers, cfg.moe_num_experts, cfg.moe_k
        top_k = _range("top_k", self.top_k, K, 1, max(1, K - 1), E)
        k_max = max(K, top_k[1]) if top_k else K
        depth = _range("depth", self.depth, L, max(1, (L + 1) // 2), max(1, L - 1), L)
        width = _range("width", self.width, E, max(k_max, (E + 1) // 2), max(k_max, E - 1), E)
        if width and width[0] < k_max:
            raise UserError(f"elastic: width.min = {width[0]} experts is fewer than the largest top-k {k_max} "
                            f"(raise width.min or lower top_k.max)")
        if not width and top_k and top_k[1] > E:
            raise UserError(f"elastic: top_k.max = {top_k[1]} exceeds the {E} experts")
        if not cfg.moe_layers:
            width = top_k = None
        return Ranges(depth, width, top_k)


def _range(name: str, d: DimRange, full: int, lo: int, hi: int, limit: int) -> tuple[int, int] | None:
    if d.p_full >= 1.0:
        return None
    lo = d.min if d.min is not None else min(lo, d.max if d.max is not None else lo)
    hi = d.max if d.max is not None else max(hi, lo)
    if not 1 <= lo <= hi <= limit:
        raise UserError(f"elastic: {name} range [{lo}, {hi}] is impossible for this model "
                        f"(need 1 <= min <= max <= {limit}; full value {full})")
    return lo, hi


@dataclass(frozen=True)
class Ranges:
    depth: tuple[int, int] | None  # None: the dimension is not elastic
    width: tuple[int, int] | None
    top_k: tuple[int, int] | None

    @property
    def elastic(self) -> bool:
        return any(r is not None for r in (self.depth, self.width, self.top_k))

    def __str__(self) -> str:
        dims = [(n, r) for n, r in (("layers", self.depth), ("experts", self.width), ("top_k", self.top_k)) if r]
        return ", ".join(f"{n} {r[0]}-{r[1]}" for n, r in dims) or "none (full model only)"


class ElasticSampler:
    """Draws the sub-model of every row of a step, identically on every rank."""

    def __init__(self, ecfg: ElasticConfig, cfg: ModelConfig, seed: int):
        self.ecfg, self.cfg, self.seed = ecfg, cfg, seed
        self.ranges = ecfg.ranges(cfg)
        self._resolved: dict[SubModelSpec, ResolvedSpec] = {}

    @property
    def groups(self) -> int:
        """How many times each micro-batch row is repeated: 1 (per_sample) or one per sandwich sub-model."""
        return 2 + self.ecfg.sandwich_random if self.ecfg.scheme == "sandwich" else 1

    def draw(self, rng: np.random.Generator, always: bool = False) -> SubModelSpec:
        """One sub-model: each elastic dimension full w.p. its p_full (unless `always`), else uniform in range."""
        r, e, cfg = self.ranges, self.ecfg, self.cfg

        def pick(rng_: tuple[int, int] | None, p_full: float, full: int) -> int:
            if rng_ is None or (not always and rng.random() < p_full):
                return full
            return int(rng.integers(rng_[0], rng_[1] + 1))

        n = pick(r.depth, e.depth.p_full, cfg.num_hidden_layers)
        m = pick(r.width, e.width.p_full, cfg.moe_num_experts)
        k = pick(r.top_k, e.top_k.p_full, cfg.moe_k)
        return self.make(n, m, k, rng)

    def make(self, n: int, m: int, k: int, rng: np.random.Generator | None = None) -> SubModelSpec:
        """The spec of n layers, m experts per MoE layer, top-k k under the configured policies."""
        cfg, e = self.cfg, self.ecfg
        L, E = cfg.num_hidden_layers, cfg.moe_num_experts
        layers = experts = None
        if n < L:
            layers = n
            if e.layer_policy == "random" and rng is not None:
                layers = tuple(sorted(int(i) for i in rng.choice(L, n, replace=False)))
        if m < E:
            experts = m
            if e.expert_policy == "random" and rng is not None:
                experts = tuple(tuple(sorted(int(i) for i in rng.choice(E, m, replace=False))) for _ in cfg.moe_layers)
        return SubModelSpec(layers, experts, None if k == cfg.moe_k else k)

    def smallest(self) -> SubModelSpec:
        r, cfg = self.ranges, self.cfg
        return self.make(r.depth[0] if r.depth else cfg.num_hidden_layers,
                         r.width[0] if r.width else cfg.moe_num_experts, r.top_k[0] if r.top_k else cfg.moe_k)

    def step_specs(self, step: int, micro: int, rows: int, rank: int = 0, world_size: int = 1) -> list[SubModelSpec]:
        """This rank's specs for micro-step `micro` of `step`, `rows` local rows (times `groups` for sandwich).

        per_sample: global row g (= rank * rows + local row) draws from its own generator, seeded by
        (seed, step, micro, g). sandwich: [largest] * rows + [smallest] * rows + [random_j] * rows ...
        """
        e = self.ecfg
        if e.scheme == "sandwich":
            subs = [FULL, self.smallest()]
            subs += [self.draw(np.random.default_rng([self.seed, step, micro, 1, j]), always=True)
                     for j in range(e.sandwich_random)]
            return [s for s in subs for _ in range(rows)]
        if not self.ranges.elastic or step < e.full_steps:
            return [FULL] * rows
        specs = []
        for g in range(rank * rows, (rank + 1) * rows):
            rng = np.random.default_rng([self.seed, step, micro, 0, g])
            full = rng.random() < e.p_full
            specs.append(FULL if full else self.draw(rng))
        return specs

    def resolve(self, model, specs: list[SubModelSpec]) -> list[ResolvedSpec]:
        """Resolve through the model's current orders (cached until `clear_cache`, called after a reorder)."""
        if len(self._resolved) > 4096:  # random policies draw new subsets every step
            self._resolved.clear()
        out = []
        for s in specs:
            if s not in self._resolved:
                self._resolved[s] = model.resolve(s)
            out.append(self._resolved[s])
        return out

    def clear_cache(self) -> None:
        self._resolved.clear()


def default_eval_specs(sampler: ElasticSampler) -> list[SubModelSpec]:
    """Full model, the smallest value of each elastic dimension alone, and the smallest sub-model overall."""
    r, cfg = sampler.ranges, sampler.cfg
    specs = [FULL]
    if r.depth:
        specs.append(SubModelSpec(layers=r.depth[0]))
    if r.width:
        specs.append(SubModelSpec(experts=r.width[0]))
    if r.top_k:
        specs.append(SubModelSpec(top_k=r.top_k[0]))
    smallest = SubModelSpec(r.depth[0] if r.depth else None, r.width[0] if r.width else None,
                            r.top_k[0] if r.top_k and r.top_k[0] != cfg.moe_k else None)
    if smallest not in specs:
        specs.append(smallest)
    return specs


def spec_name(spec: SubModelSpec) -> str:
    """Short stable name for metrics keys: full, L2, E4, k1, L2-E4-k1, L0.2.3 (explicit ids)."""
    parts = []
    for tag, v in (("L", spec.layers), ("E", spec.experts), ("k", spec.top_k)):
        if v is None:
            continue
        if isinstance(v, tuple) and v and isinstance(v[0], tuple):
            v = "/".join(str(len(t)) for t in v)
        elif isinstance(v, tuple):
            v = ".".join(map(str, v))
        parts.append(f"{tag}{v}")
    return "-".join(parts) or "full"


def check_specs(specs: list[SubModelSpec], cfg: ModelConfig) -> None:
    for s in specs:
        resolve(s, cfg)


def _routing_mass_hook(module, args, kwargs, output) -> None:
    """Add the router's probabilities, summed over the layer's tokens, to `module.routing_mass` (while training).

    One function for every layer, its accumulator found on the module: compiled layers (train.compile) then share
    their graphs, where a closure per layer would make dynamo guard on the closure and compile each layer apart."""
    if not module.training:
        return
    x = args[0] if args else kwargs["x_TH"]
    # over all experts, whatever this row's sub-model keeps: mass under the row's mask would never reach the
    # experts outside the current order's head, so the order would keep confirming itself
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.float(), module.router.float())
        module.routing_mass += F.softmax(logits, dim=-1).sum(0).double()


class Importance:
    """Routing mass per expert (accumulated by forward hooks while training) and block influence per layer;
    `reorder` writes them into the model's `expert_order` / `layer_order` buffers."""

    def __init__(self, model, ecfg: ElasticConfig):
        self.model, self.ecfg = model, ecfg
        E, dev = model.cfg.moe_num_experts, model.layer_order.device
        self.mass = {i: torch.zeros(E, dtype=torch.float64, device=dev) for i in model.moe_layers}  # since last reorder
        self.score = {i: torch.zeros(E, dtype=torch.float64, device=dev) for i in model.moe_layers}
        self._hooks = []
        if ecfg.expert_policy == "importance":
            for i in model.moe_layers:
                model.moe(i).routing_mass = self.mass[i]  # the hook's accumulator (updated in place, never replaced)
                self._hooks.append(model.moe(i).register_forward_hook(_routing_mass_hook, with_kwargs=True))
        L = model.cfg.num_hidden_layers
        if ecfg.layer_policy == "keep_last":
            model.set_layer_order(torch.arange(L - 1, -1, -1))
        elif ecfg.layer_policy == "even":
            model.layer_order_set.fill_(False)  # evenly spaced layers

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for i in self.model.moe_layers:
            self.model.moe(i).__dict__.pop("routing_mass", None)

    @torch.no_grad()
    def reorder(self, all_reduce=None, forward_full=None, batch: torch.Tensor | None = None) -> None:
        """Update the orders. all_reduce(tensor) sums across ranks; forward_full(x) runs the full model (layers)."""
        if self.ecfg.expert_policy == "importance" and self.mass:
            mass = torch.stack([self.mass[i] for i in self.model.moe_layers])
            if all_reduce is not None:
                mass = all_reduce(mass)
            for j, i in enumerate(self.model.moe_layers):
                self.score[i] = self.ecfg.importance_decay * self.score[i] + mass[j]
                order = torch.argsort(self.score[i], descending=True, stable=True)
                self.model.moe(i).expert_order.copy_(order)
                self.mass[i].zero_()
        if self.ecfg.layer_policy == "importance" and forward_full is not None and batch is not None:
            bi = self.block_influence(forward_full, batch)
            if all_reduce is not None:  # the batch may differ across ranks: agree on the summed influence
                bi = all_reduce(bi)
            order = torch.argsort(bi, descending=True, stable=True)
            self.model.set_layer_order(order)

    @torch.no_grad()
    def block_influence(self, forward_full, batch: torch.Tensor) -> torch.Tensor:
        """ShortGPT's block influence 1 - cos(input, output) per layer, on the full model."""
        model = self.model
        inputs: list[torch.Tensor] = []
        norms = [blk.attn_norm for blk in model.blocks] + [model.norm]
        hooks = [n.register_forward_pre_hook(lambda m, a: inputs.append(a[0].float())) for n in norms]
        was_training = model.training
        model.eval()
        # compiled layers (train.compile) run eagerly here: these short-lived hooks would each compile them anew
        eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
        try:
            with eager:
                forward_full(batch)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        L = model.cfg.num_hidden_layers
        return torch.stack([1 - F.cosine_similarity(inputs[i], inputs[i + 1], dim=-1).mean() for i in range(L)])

    def state_dict(self) -> dict:
        return {"mass": {str(i): t.cpu().clone() for i, t in self.mass.items()},
                "score": {str(i): t.cpu().clone() for i, t in self.score.items()}}

    def load_state_dict(self, state: dict, rank: int = 0, world_size: int = 1) -> None:
        """`state["mass_by_rank"]` (when saved from several ranks) holds each rank's own unreduced routing mass:
        with the same number of ranks each takes its own back, so the next reorder sums exactly what it would have;
        with another number, rank 0 takes their sum and the others start from zero."""
        by_rank = state.get("mass_by_rank")
        mass = state["mass"]
        if by_rank and len(by_rank) == world_size:
            mass = by_rank[rank]
        elif by_rank:
            mass = {k: sum(m[k] for m in by_rank) * (rank == 0) for k in by_rank[0]}
        for i in self.mass:
            self.mass[i].copy_(mass[str(i)])
            self.score[i].copy_(state["score"][str(i)])
