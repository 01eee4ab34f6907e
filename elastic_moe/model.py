"""The ERNIE-4.5-MoE decoder (transformers' `Ernie4_5_MoeForCausalLM`), elastic at run time.

One forward serves pre-training, evaluation, rollout, RL and export checks. A sub-model spec picks the layers
that run, the experts each MoE layer may route to and the top-k; a list of specs gives every sequence of the
batch its own sub-model (ERNIE 5.0's per-sample elastic training) in one forward and one backward.

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, D head dim, V vocabulary, K top-k slots.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from elastic_moe import ops
from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.moe import MLP, MoE, MoEOutput
from elastic_moe.spec import ResolvedSpec, SubModelSpec, resolve


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Interleaved RoPE (pairs (2j, 2j+1) rotate together), computed in fp32 as the reference does."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)),
                             persistent=False)
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        """A cast to a narrower float type (`.to(torch.bfloat16)`) keeps the frequencies in float32: rounded to bf16
        they put positions in the thousands off by whole radians."""
        before = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = before.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(positions.max()) + 1
        if self._cache is None or self._cache[0] < n or self._cache[1].device != positions.device:
            n = max(n, 256, 2 * (self._cache[0] if self._cache else 0))
            freqs = torch.arange(n, device=positions.device, dtype=torch.float)[:, None] * self.inv_freq.to(positions.device)
            self._cache = (n, freqs.cos(), freqs.sin())
        return self._cache[1][positions], self._cache[2][positions]

    @staticmethod
    def apply(x_BNSD: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor) -> torch.Tensor:
        dtype = x_BNSD.dtype
        x = x_BNSD.float().unflatten(-1, (-1, 2))
        a, b = x[..., 0], x[..., 1]
        c, s = cos_BSd[:, None], sin_BSd[:, None]
        return torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2).to(dtype)


class KVCache:
    """Preallocated keys and values for every layer, plus which key positions are real (left padding)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    @classmethod
    def from_buffers(cls, k: list[torch.Tensor], v: list[torch.Tensor], key_valid: torch.Tensor) -> KVCache:
        """A cache over preallocated tensors (B, KV heads, max_len, D) per layer, written in place (static decode)."""
        self = cls.__new__(cls)
        self.k, self.v, self.key_valid = list(k), list(v), key_valid
        self.length, self.max_len = 0, key_valid.shape[1]
        return self

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only some sequences (finished ones leave the batch)."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.key_valid = self.key_valid[rows]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nq, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
        self.qkv = ops.Linear(cfg.hidden_size, (self.nq + 2 * self.nkv) * self.d, cfg.use_bias)
        self.o = ops.Linear(self.nq * self.d, cfg.hidden_size, cfg.use_bias)

    def forward(self, x_BSH, cos, sin, layer: int, cache: KVCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        q, k, v = self.qkv(x_BSH).split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q = Rotary.apply(q.view(B, S, self.nq, self.d).transpose(1, 2), cos, sin)
        k = Rotary.apply(k.view(B, S, self.nkv, self.d).transpose(1, 2), cos, sin)
        v = v.view(B, S, self.nkv, self.d).transpose(1, 2)
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + S] = k
            cache.v[layer][:, :, start:start + S] = v
            k, v = cache.k[layer][:, :, :start + S], cache.v[layer][:, :, :start + S]
        gqa = self.nq != self.nkv
        if mask is None:
            # without a cache the keys are the queries (causal, also for one token); asked only with a cache, as S
            # is symbolic in a layer compiled with a dynamic sequence length, and SDPA's is_causal must be a bool
            causal = cache is None or S > 1
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=causal, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, S, self.nq * self.d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.use_bias)

    def forward(self, x_BSH, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None,
                expert_mask: torch.Tensor | None = None, top_k: int | torch.Tensor | None = None,
                routes: torch.Tensor | None = None, want_aux: bool = False) -> tuple[torch.Tensor, MoEOutput | None]:
        """One decoder layer; for a MoE layer also returns the routing record (routes, load counts, aux loss)."""
        # the layer id matters only with a cache; not reading it otherwise lets torch.compile reuse one graph for
        # every block (a guard on the id would compile each block separately)
        layer = self.layer if cache is not None else -1
        h = x_BSH + self.attn(self.attn_norm(x_BSH), cos, sin, layer, cache, mask)
        hn = self.mlp_norm(h)
        if not self.is_moe:
            return h + self.mlp(hn), None
        B, S, H = hn.shape
        mo = self.mlp(hn.reshape(B * S, H), expert_mask, top_k, routes, want_aux)
        return h + mo.out.view(B, S, H), mo


def lm_head_cross_entropy(hidden_BSH: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets_BS: torch.Tensor, numerics: ops.Numerics, reduction: str = "none",
                          ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of the LM head's logits, in float32: per token (B, S) (0 where a target is ignore_index), or
    "mean" over the tokens that have a target. A function of tensors alone, so that torch.compile can fuse the
    head, the float32 cast and the loss without ever writing out the (tokens x vocabulary) float32 logits."""
    logits = ops.linear(hidden_BSH, weight, bias, numerics).float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets_BS.flatten(), ignore_index=ignore_index, reduction=reduction)
    return ce.view(targets_BS.shape) if reduction == "none" else ce


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, S, V); None when only hidden states were asked for
    hidden: torch.Tensor  # (B, S, H) after the final norm
    routes: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer id -> (B, S, K) expert ids
    aux_loss: torch.Tensor | None = None


# A pytree node, so that code which looks for the output's tensors finds them: FSDP2 up to torch 2.12 hooks its
# backward all-gather onto the tensors `tree_flatten` returns, and an unregistered dataclass is one opaque leaf.
# (torch 2.6's register_dataclass calls its own deprecated helper, a FutureWarning at every import: not ours to see.)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*_register_pytree_node.* is deprecated", category=FutureWarning)
    torch.export.register_dataclass(ModelOutput, serialized_type_name="elastic_moe.model.ModelOutput")


class ElasticMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else ops.Linear(cfg.hidden_size, cfg.vocab_size, cfg.use_bias)
        self.rotary = Rotary(cfg.dim_head, cfg.rope_theta)
        # layer ids from most to least important, for "keep n layers" (the elastic importance policy updates it)
        self.register_buffer("layer_order", torch.arange(cfg.num_hidden_layers))
        self.register_buffer("layer_order_set", torch.tensor(False))  # False: no order measured, evenly spaced
        self.numerics = ops.FP32
        self.reset_parameters()

    # ----------------------------------------------------------------- set-up
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        self.embed.weight[self.cfg.pad_token_id].zero_()

    @torch.no_grad()
    def scale_init(self, residual_scaled: bool = False, embedding_std: float | None = None) -> None:
        """Rescale a fresh initialisation (the random draws stay those of `reset_parameters`).

        residual_scaled: the matrices that write into the residual stream (attention output, dense and expert down
        projections) get std / sqrt(2 * layers), as in GPT-2 and torchtitan, so that the stream does not grow
        with depth at initialisation. embedding_std: the token embeddings' std (tied: the LM head's too).
        """
        if residual_scaled:
            factor = (2 * self.cfg.num_hidden_layers) ** -0.5
            for blk in self.blocks:
                blk.attn.o.weight.mul_(factor)
                down = blk.mlp.w_down if isinstance(blk.mlp, MoE) else blk.mlp.down.weight
                down.mul_(factor)
                shared = getattr(blk.mlp, "shared", None)
                if shared is not None:
                    shared.down.weight.mul_(factor)
        if embedding_std is not None:
            self.embed.weight.mul_(embedding_std / self.cfg.initializer_range)

    def set_numerics(self, numerics: ops.Numerics) -> None:
        """Put every matrix product of the model on one op-library setting (trainer and rollout alike)."""
        self.numerics = numerics
        for m in self.modules():
            if isinstance(m, (ops.Linear, MoE)):
                m.numerics = numerics

    def set_expert_backend(self, backend: str) -> None:
        """How the MoE layers run their experts: "auto" (the grouped GEMM where it is usable, else the loop),
        "grouped_mm" (always `torch._grouped_mm`) or "loop" (one matmul per expert)."""
        if backend not in ("auto", "grouped_mm", "loop"):
            raise UserError(f"expert backend {backend!r}: expected auto, grouped_mm or loop")
        device = next(self.parameters()).device
        if backend == "grouped_mm" and not ops.grouped_mm_available(device.type):
            raise UserError(f"expert backend 'grouped_mm': torch {torch.__version__} has no torch._grouped_mm "
                            f"kernel for {device.type}; use 'auto' or 'loop'")
        for m in self.modules():
            if isinstance(m, MoE):
                m.backend = backend

    @property
    def moe_layers(self) -> list[int]:
        return self.cfg.moe_layers

    def moe(self, layer: int) -> MoE:
        return self.blocks[layer].mlp

    def resolve(self, spec: SubModelSpec | ResolvedSpec | None) -> ResolvedSpec:
        if isinstance(spec, ResolvedSpec):
            return spec
        order = {i: self.moe(i).expert_order.tolist() for i in self.moe_layers}
        layer_order = self.layer_order.tolist() if bool(self.layer_order_set) else None
        return resolve(spec, self.cfg, order, layer_order)

    @torch.no_grad()
    def set_layer_order(self, order) -> None:
        """Layer ids from most to least important: `layers=n` then keeps the first n of them."""
        self.layer_order.copy_(torch.as_tensor(order))
        self.layer_order_set.fill_(True)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, spec: SubModelSpec | ResolvedSpec | list | None = None, *,
                routes: dict[int, torch.Tensor] | None = None, return_routes: bool = False,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                return_logits: bool = True, want_aux: bool = False, track_load: bool | None = None) -> ModelOutput:
        """input_ids (B, S). spec: one spec for the batch, or a list of B specs (one sub-model per sequence).
        routes: MoE layer id -> (B, S, K) expert ids to replay instead of the router's own top-k.
        cache: a KVCache to read and extend (generation); positions (B, S) default to cache.length + arange(S).
        """
        B, S = input_ids.shape
        cfg = self.cfg
        if input_ids.numel() and (int(input_ids.max()) >= cfg.vocab_size or int(input_ids.min()) < 0):
            raise UserError(f"token id outside the vocabulary of {cfg.vocab_size}")
        per_row = isinstance(spec, (list, tuple))
        if per_row:
            if len(spec) != B:
                raise UserError(f"{len(spec)} specs for a batch of {B}")
            specs = [self.resolve(s) for s in spec]
            if all(s == specs[0] for s in specs):
                per_row, rs = False, specs[0]
        else:
            rs = self.resolve(spec)
        if per_row and cache is not None:
            raise UserError("per-sequence sub-models are a training feature; decode with one spec")
        track_load = self.training if track_load is None else track_load
        start = cache.length if cache is not None else 0
        if cache is not None and start + S > cache.max_len:
            raise UserError(f"sequence of {start + S} tokens exceeds the KV cache of {cache.max_len}")
        if positions is None:
            positions = (torch.arange(S, device=input_ids.device) + start).expand(B, S)
        if int(positions.max()) >= cfg.max_position_embeddings:
            raise UserError(f"position {int(positions.max())} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        cos, sin = self.rotary.cos_sin(positions)
        mask = None
        if cache is not None and (S > 1 and start > 0 or not bool(cache.key_valid.all())):
            q_pos = torch.arange(start, start + S, device=input_ids.device)
            k_pos = torch.arange(start + S, device=input_ids.device)
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None] & cache.key_valid[:, None, None, :start + S]

        x = self.embed(input_ids)
        out_routes: dict[int, torch.Tensor] = {}
        aux_total = None
        for blk in self.blocks:
            i = blk.layer
            if per_row:
                rows_l = [r for r, s in enumerate(specs) if i in s.layers]
                if not rows_l:
                    continue
                rows = None if len(rows_l) == B else torch.tensor(rows_l, device=x.device)
            else:
                if i not in rs.layers:
                    continue
                rows = None
            xb = x if rows is None else x.index_select(0, rows)
            cb, sb = (cos, sin) if rows is None else (cos[rows], sin[rows])
            emask, k, r = None, None, None
            if blk.is_moe:
                emask, k = self._moe_knobs(i, specs if per_row else rs, rows_l if per_row else None, S, x.device)
                r = routes.get(i) if routes else None
                if r is not None:
                    r = (r if rows is None else r[rows]).reshape(xb.shape[0] * S, -1)
            h, mo = blk(xb, cb, sb, cache, mask, emask, k, r, want_aux)
            if mo is not None:
                if track_load:
                    blk.mlp.track_load(mo.counts, xb.shape[0] * S, emask, k)
                if mo.aux_loss is not None:
                    aux_total = mo.aux_loss if aux_total is None else aux_total + mo.aux_loss
                if return_routes:
                    rt = mo.routes.view(xb.shape[0], S, -1)
                    if rows is not None:
                        full = torch.full((B, S, rt.shape[-1]), cfg.moe_num_experts, dtype=rt.dtype, device=rt.device)
                        rt = full.index_copy(0, rows, rt)
                    out_routes[i] = rt
            x = h if rows is None else x.index_copy(0, rows, h)
        if cache is not None:
            cache.length = start + S
        hidden = self.norm(x)
        logits = ops.linear(hidden, self.head_weight(), None if self.lm_head is None else self.lm_head.bias,
                            self.numerics) if return_logits else None
        return ModelOutput(logits, hidden, out_routes, aux_total)

    def _moe_knobs(self, layer, rs, rows_l, S, device):
        """Expert mask and top-k for one MoE layer: shared by the batch, or per token when specs are per row."""
        E = self.cfg.moe_num_experts
        if rows_l is None:
            kept = rs.experts[layer]
            emask = None
            if kept is not None:
                emask = torch.zeros(E, dtype=torch.bool, device=device)
                emask[list(kept)] = True
            return emask, rs.top_k[layer]
        specs = [rs[r] for r in rows_l]
        ks = torch.tensor([s.top_k[layer] for s in specs], device=device)
        emask = None
        if any(s.experts[layer] is not None for s in specs):
            emask = torch.ones(len(specs), E, dtype=torch.bool, device=device)
            for j, s in enumerate(specs):
                if s.experts[layer] is not None:
                    emask[j] = False
                    emask[j, list(s.experts[layer])] = True
            emask = emask.repeat_interleave(S, dim=0)
        if bool((ks == ks[0]).all()):
            return emask, int(ks[0])
        slots = torch.arange(int(ks.max()), device=device) < ks[:, None]  # (rows, K): each row's first k slots
        return emask, slots.repeat_interleave(S, dim=0)

    # ---------------------------------------------------------------- helpers
    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, spec=None, ignore_index: int = -100,
             **kw) -> tuple[torch.Tensor, ModelOutput]:
        out = self(input_ids, spec, **kw)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return loss, out

    @torch.no_grad()
    def update_router_bias(self, rate: float) -> None:
        for i in self.moe_layers:
            self.moe(i).update_bias(rate)

    def load_stats(self) -> dict[str, float]:
        """Per-layer max/mean expert load and unused experts since the last bias update, flat for logging."""
        stats = {}
        for i in self.moe_layers:
            for k, v in self.moe(i).load_stats().items():
                stats[f"load/layer{i}/{k}"] = v
        return stats

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int, spec=None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) of the (sub-)model at `spec`."""
        cfg, rs = self.cfg, self.resolve(spec)
        active = cfg.num_params(list(rs.layers), top_k=None, active=True)
        # replace the default k by the spec's per-layer k for the expert term
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        active += sum((rs.top_k[i] - cfg.moe_k) * expert for i in rs.top_k)
        # QK^T and AV counted over the full (non-causal) square, the PaLM / nanoGPT convention
        return 6.0 * active + 12.0 * len(rs.layers) * seq_len * cfg.num_attention_heads * cfg.dim_head

