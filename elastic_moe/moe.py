"""The MoE feed-forward block of ERNIE-4.5-MoE: fp32 softmax router with a selection-only correction bias,
renormalised top-k gate weights, dropless sort-based expert dispatch, optional shared experts.

Shape legend: T tokens, H hidden, I expert width, E experts, K top-k slots, N routed (token, slot) pairs.

Elastic knobs per call (nothing is copied): `expert_mask` (E,) or (T, E) restricts routing to kept experts (the
softmax runs over them only, as in a model that has only those experts); `top_k` is an int, or a (T, K) bool mask
of the slots each token uses (its first k), so that one call mixes k per token with K a shape, not a value read back;
`routes` (T, K) replays given expert choices (Rollout Router Replay): the gate weights are then recomputed from the
live router over those experts, so the router still gets gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elastic_moe import ops
from elastic_moe.config import ModelConfig


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in `ids` (int64). Like `torch.bincount(ids, minlength=n)`, but with a fixed
    output size: no host sync on CUDA (bincount reads the maximum back) and no graph break under torch.compile."""
    flat = ids.flatten()
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def route_dtype(num_experts: int) -> torch.dtype:
    """Compact integer dtype for recorded routes; the value `num_experts` pads unused slots."""
    return torch.uint8 if num_experts < 255 else torch.int16


def _decode_sized(x_TH: torch.Tensor) -> bool:
    """Compiling a decode step for a GPU (a few tokens, no gradients): the router as pointwise ops and reductions
    that the compiler fuses, where library calls would each be a kernel launch of their own."""
    return x_TH.is_cuda and x_TH.shape[0] <= 256 and not torch.is_grad_enabled() and torch.compiler.is_compiling()


def top_k_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """`torch.topk(scores, k).indices` (largest first). For a decode step compiled for a GPU, computed from pairwise
    ranks, ties to the lower expert id: a few fused kernels instead of topk's sort kernels (~9 us per layer on an
    H100, docs/LOG.md session 5)."""
    if not _decode_sized(scores_TE):
        return torch.topk(scores_TE, k, dim=-1).indices
    return top_k_by_rank(scores_TE, k)


def top_k_by_rank(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    E = scores_TE.shape[-1]
    ids = torch.arange(E, device=scores_TE.device)
    a, b = scores_TE[:, :, None], scores_TE[:, None, :]  # expert e (rows) against expert j (columns)
    ahead = (b > a) | ((b == a) & (ids[None, :] < ids[:, None]))
    rank = ahead.sum(-1)  # (T, E): how many experts rank before e
    slot = rank[:, None, :] == torch.arange(k, device=scores_TE.device)[:, None]  # (T, k, E)
    return (slot * ids).sum(-1)


class MLP(nn.Module):
    """SwiGLU feed-forward; gate and up projections fused into one [2I, H] weight."""

    def __init__(self, hidden: int, inner: int, bias: bool = False):
        super().__init__()
        self.inner = inner
        self.gate_up = ops.Linear(hidden, 2 * inner, bias)
        self.down = ops.Linear(inner, hidden, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@dataclass
class MoEOutput:
    out: torch.Tensor  # (T, H)
    routes: torch.Tensor  # (T, K) expert ids, `num_experts` where a slot is unused
    counts: torch.Tensor  # (E,) routed pairs per expert, for load statistics
    aux_loss: torch.Tensor | None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, inner = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k, self.norm_min = E, cfg.moe_k, cfg.moe_norm_min
        self.router = nn.Parameter(torch.empty(E, H))  # float32 always, as in the reference (see _apply)
        self.register_buffer("bias", torch.zeros(E))  # selection-only correction bias (aux-loss-free balancing)
        self.register_buffer("load", torch.zeros(E))  # routed pairs per expert since the last bias update
        # each expert's fair share of those pairs: what it would get if every token spread its k picks evenly over the
        # experts its sub-model keeps (the balancing target; with no expert masked, the mean of `load`)
        self.register_buffer("fair_load", torch.zeros(E), persistent=False)
        self.register_buffer("expert_order", torch.arange(E))  # most to least important, for "first m experts"
        self.w_gate_up = nn.Parameter(torch.empty(E, H, 2 * inner))  # (in, out) per expert: x @ w
        self.w_down = nn.Parameter(torch.empty(E, inner, H))
        self.shared = MLP(H, inner * cfg.moe_num_shared_experts, cfg.use_bias) if cfg.moe_num_shared_experts else None
        self.numerics = ops.FP32
        self.backend = "auto"

    def route(self, x_TH: torch.Tensor, expert_mask: torch.Tensor | None, top_k: int | torch.Tensor,
              routes: torch.Tensor | None, want_aux: bool):
        """Returns (expert ids (T, K) long, gate weights (T, K) fp32, aux loss or None)."""
        E = self.num_experts
        with torch.autocast(x_TH.device.type, enabled=False):
            if _decode_sized(x_TH):  # one fused reduction instead of cuBLAS's two-kernel matrix-vector product
                logits = (x_TH.float()[:, None, :] * self.router.float()).sum(-1)
            else:
                logits = F.linear(x_TH.float(), self.router.float())
            if expert_mask is not None:
                logits = logits.masked_fill(~expert_mask, float("-inf"))
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            own = None
            k_max = int(top_k) if isinstance(top_k, int) else top_k.shape[1]
            if routes is None or bool((routes >= E).all(-1).any()):
                scores = probs.detach() + self.bias
                if expert_mask is not None:
                    scores = scores.masked_fill(~expert_mask, float("-inf"))
                own = top_k_indices(scores, k_max if routes is None else routes.shape[1])
                if expert_mask is not None:  # more picks than kept experts: the extra picks are masked ones, unused
                    kept = expert_mask.expand(own.shape[0], E) if expert_mask.dim() == 1 else expert_mask
                    own = torch.where(torch.gather(kept, 1, own), own, E)
            if routes is None:
                idx = own
            else:  # replay; a token with no recorded route (all slots padding) keeps its own choice
                idx = routes.long()
                idx = torch.where((idx >= E).all(-1, keepdim=True), own, idx) if own is not None else idx
            valid = idx < E
            if not isinstance(top_k, int):
                valid = valid & (torch.arange(idx.shape[1], device=idx.device) < top_k.sum(1, keepdim=True))
            idx = torch.where(valid, idx, E)
            w = torch.gather(probs, 1, idx.clamp(max=E - 1)) * valid
            w = w / torch.clamp(w.sum(dim=-1, keepdim=True), min=self.norm_min)
            aux = None
            if want_aux:  # Switch-style: E * sum_e (fraction of pairs to e) * (mean router prob of e)
                frac = count_ids(idx, E + 1)[:E].float() / valid.sum().clamp(min=1)
                aux = E * (frac * probs.mean(0)).sum()
        return idx, w, aux

    def forward(self, x_TH: torch.Tensor, expert_mask: torch.Tensor | None = None, top_k: int | torch.Tensor | None = None,
                routes: torch.Tensor | None = None, want_aux: bool = False) -> MoEOutput:
        T, H = x_TH.shape
        E = self.num_experts
        idx_TK, w_TK, aux = self.route(x_TH, expert_mask, self.top_k if top_k is None else top_k, routes, want_aux)
        K = idx_TK.shape[1]
        flat = idx_TK.flatten()
        counts_all = count_ids(flat, E + 1)  # the last bin counts unused slots (id E)
        counts = counts_all[:E]
        if not torch.is_grad_enabled() and T * K <= 8:
            few = self._experts_few if x_TH.device.type == "cpu" else self._experts_gathered
            out = few(x_TH, idx_TK, w_TK)
        else:
            out = self._experts_sorted(x_TH, flat, w_TK.flatten(), counts_all, K)
        if self.shared is not None:
            out = out + self.shared(x_TH)
        return MoEOutput(out, idx_TK.to(route_dtype(E)), counts.detach(), aux)

    def _experts_sorted(self, x_TH, flat_N, w_N, counts_all: torch.Tensor, K: int) -> torch.Tensor:
        """Dropless: sort (token, slot) pairs by expert, one grouped matmul per projection, weighted scatter-add.

        counts_all (E + 1,): pairs per expert, then unused slots (id E), which sort last. They are computed as part
        of the last expert's group and then weighted by 0 (their gate weight), so every size stays on the device:
        nothing here waits for the GPU, and the shapes do not depend on the routing.
        """
        order = torch.argsort(flat_N, stable=True)
        tok = order // K
        xs = x_TH[tok]
        sizes = torch.cat([counts_all[:-2], counts_all[-2:].sum(0, keepdim=True)])  # (E,): padding joins expert E-1
        h = ops.grouped_matmul(xs, self.w_gate_up, sizes, self.numerics, self.backend)
        gate, up = h.chunk(2, dim=-1)
        y = ops.grouped_matmul(F.silu(gate) * up, self.w_down, sizes, self.numerics, self.backend)
        y = y * w_N[order, None].to(y.dtype)
        # accumulate the K contributions of a token in float32 (bit-identical to before for float32 models)
        out = torch.zeros(x_TH.shape, dtype=torch.promote_types(y.dtype, torch.float32), device=x_TH.device)
        return out.index_add_(0, tok, y.to(out.dtype)).to(x_TH.dtype)

    def _experts_gathered(self, x_TH, idx_TK, w_TK) -> torch.Tensor:
        """Decode path for a handful of tokens: gather the chosen experts' weights, batched matmul, no sort."""
        T, K = idx_TK.shape
        valid = idx_TK < self.num_experts
        e = idx_TK.clamp(max=self.num_experts - 1).flatten()
        xs = x_TH.repeat_interleave(K, dim=0)[:, None, :]  # (N, 1, H)
        h = ops.matmul(xs, self.w_gate_up[e], self.numerics)
        gate, up = h.chunk(2, dim=-1)
        y = ops.matmul(F.silu(gate) * up, self.w_down[e], self.numerics)[:, 0, :]  # (N, H)
        y = y.view(T, K, -1) * (w_TK * valid)[..., None].to(y.dtype)
        return y.sum(1).to(x_TH.dtype)

    def _experts_few(self, x_TH, idx_TK, w_TK) -> torch.Tensor:
        """CPU decode path for a handful of tokens: one small matmul per (token, expert) on views of the expert
        weights, so nothing is copied or sorted (on CPU, gathering the weights costs more than the product)."""
        out = torch.zeros(x_TH.shape, dtype=torch.float32)
        inner = self.w_down.shape[1]
        for t, ids in enumerate(idx_TK.tolist()):
            xt = x_TH[t:t + 1]
            for j, e in enumerate(ids):
                if e >= self.num_experts:
                    continue
                h = ops.matmul(xt, self.w_gate_up[e], self.numerics)
                y = ops.matmul(F.silu(h[:, :inner]) * h[:, inner:], self.w_down[e], self.numerics)
                out[t:t + 1] += y * w_TK[t, j]
        return out.to(x_TH.dtype)

    def _apply(self, fn, recurse=True):
        """A cast to a narrower float type (`.to(torch.bfloat16)`, `.half()`) keeps the router, its correction bias
        and the load counters in float32, as transformers keeps ERNIE's gate and statics. In bf16 a bias above 0.5
        cannot take a 1e-3 step (its spacing there is 4e-3) and counts above 256 round."""
        kept = {name: getattr(self, name).data for name in ("router", "bias", "load", "fair_load")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            t = getattr(self, name)
            if t.is_floating_point() and torch.finfo(t.dtype).bits < 32:
                t.data = before.to(device=t.device, dtype=torch.float32)  # the values before the cast, unrounded
        return self

    @torch.no_grad()
    def track_load(self, counts: torch.Tensor, tokens: int, expert_mask: torch.Tensor | None,
                   top_k: int | torch.Tensor | None) -> None:
        """Add one forward's routed pairs per expert to `load`, and their fair share over the experts each token
        could use (expert_mask (E,) or (T, E), top_k int or a (T, K) slot mask, as `forward` takes them) to
        `fair_load`."""
        E = self.num_experts
        k = self.top_k if top_k is None else top_k
        k = k.sum(1).float() if isinstance(k, torch.Tensor) else k  # per token
        self.load += counts.to(self.load.dtype)
        if expert_mask is None:
            picks = k.sum() if isinstance(k, torch.Tensor) else float(tokens * k)
            self.fair_load += picks / E
            return
        m = expert_mask.float().expand(tokens, E)
        avail = m.sum(-1)
        picks = torch.minimum(k if isinstance(k, torch.Tensor) else torch.full_like(avail, k), avail)
        self.fair_load += (m * (picks / avail.clamp(min=1))[:, None]).sum(0)

    @torch.no_grad()
    def reset_load(self) -> None:
        self.load.zero_()
        self.fair_load.zero_()

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3 aux-loss-free balancing: raise the bias of experts below their fair share of the routed pairs,
        lower those above it. The fair share counts only the tokens whose sub-model keeps the expert: rows of
        narrower sub-models neither raise the bias of experts they mask out nor lower that of the ones they keep."""
        if self.load.sum() > 0:
            self.bias += rate * torch.sign(self.fair_load - self.load)
        self.reset_load()

    def load_stats(self) -> dict[str, float]:
        """Busiest and idlest expert against its fair share (max_over_mean: 1 = balanced), and the unused ones."""
        load, fair = self.load, self.fair_load
        seen = fair > 0
        if not bool(seen.any()):
            return {"max_over_mean": 0.0, "min_over_mean": 0.0, "unused": 0}
        ratio = load[seen] / fair[seen]
        return {"max_over_mean": float(ratio.max()), "min_over_mean": float(ratio.min()),
                "unused": int((load[seen] == 0).sum())}
