"""GPU training helpers for the elastic model: regional torch.compile, activation checkpointing, FSDP2, fused AdamW.

All of them work on a model built by `ElasticMoE` in place and leave its state-dict keys unchanged, so
checkpoints, exports and the elastic forward (sub-model specs, per-row specs, route replay) work as before.

    model = ElasticMoE(cfg).to("cuda", torch.bfloat16)     # or fp32 master weights + torch.autocast(bf16);
                                                           # FSDP2 needs fp32 masters (its policy casts to bf16)
    model.set_expert_backend("grouped_mm")
    apply_activation_checkpointing(model)                  # optional: trade ~1/3 more compute for memory
    compile_blocks(model)                                  # one compiled graph per decoder-layer kind
    apply_fsdp2(model, mesh)                               # only under torchrun with several GPUs
    opt = fused_adamw(model.parameters(), lr=3e-4)

Regional compilation: each `Block` (one decoder layer) is compiled on its own, and the blocks share the compiled
code (torch.compile guards on the block's structure, not its identity), so the first step compiles one dense and
one MoE layer instead of the whole network, and an elastic spec change (fewer layers, fewer experts) reuses them;
a new top-k compiles once more per layer kind.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from elastic_moe.distributed import check_fsdp2
from elastic_moe.errors import UserError
from elastic_moe.model import Block, ElasticMoE


def setup_cuda() -> None:
    """Matmul settings for training on NVIDIA GPUs (TF32 for any float32 product that is left)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _blocks(model: nn.Module) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def compile_blocks(model: ElasticMoE, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = False, cache_size_limit: int = 64) -> ElasticMoE:
    """torch.compile every decoder layer separately (in place, `nn.Module.compile`); the rest stays eager.

    dynamic=False: sequence length and batch are specialised (a new shape compiles once more); the expert counts
    per step are data, not shapes, so routing changes never recompile. `cache_size_limit` bounds the compiled
    variants per code object (dense/MoE x top-k x expert-mask present/absent x shapes).
    """
    from torch import _dynamo

    # hooks on the layers' modules (expert-importance and routing records) are registered and removed during
    # training; by default dynamo does not guard on them, and a graph would keep running the hooks it was traced with
    _dynamo.config.skip_nnmodule_hook_guards = False
    # under DDP, dynamo would split each layer's graph at gradient-bucket boundaries (its DDPOptimizer), which
    # fails on graphs with dynamic row counts (torch 2.13); unsplit, a layer's gradients reach DDP's all-reduce
    # together at the end of its backward, so communication still overlaps the backward of the layers below
    _dynamo.config.optimize_ddp = False
    _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, cache_size_limit)
    lim = getattr(_dynamo.config, "accumulated_cache_size_limit", 0)
    _dynamo.config.accumulated_cache_size_limit = max(lim, 4 * cache_size_limit)
    for blk in _blocks(model):
        blk.compile(backend=backend, mode=mode, dynamic=dynamic)
    return model


def uncompile_blocks(model: ElasticMoE) -> ElasticMoE:
    """Undo `compile_blocks` (the blocks run eagerly again)."""
    for blk in _blocks(model):
        blk._compiled_call_impl = None
    return model


def _checkpointed_forward(orig_forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return orig_forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(orig_forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: ElasticMoE, every: int = 1) -> ElasticMoE:
    """Recompute every `every`-th decoder layer in the backward instead of keeping its activations.

    Wraps the block's forward (an instance attribute, so parameter names and state-dict keys do not change).
    Apply before `compile_blocks` so the compiled region holds the checkpoint. Not for cached decoding (no grad).
    """
    if every < 1:
        raise ValueError("every must be >= 1")
    for j, blk in enumerate(_blocks(model)):
        if j % every == 0 and not getattr(blk, "_checkpointed", False):
            blk.forward = functools.partial(_checkpointed_forward, blk.forward)
            blk._checkpointed = True
    return model


def remove_activation_checkpointing(model: ElasticMoE) -> ElasticMoE:
    for blk in _blocks(model):
        if getattr(blk, "_checkpointed", False):
            del blk.forward  # the instance attribute; the class's forward shows again
            blk._checkpointed = False
    return model


def apply_fsdp2(model: ElasticMoE, mesh=None, *, per_block: bool = False, param_dtype: torch.dtype | None = torch.bfloat16,
                reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True) -> ElasticMoE:
    """Shard the model with FSDP2 (`torch.distributed.fsdp.fully_shard`) over `mesh` (default: the world).

    per_block=True makes each decoder layer its own unit (its parameters are gathered just before it runs and freed
    after, overlapping communication with compute); then every rank must run the same layers in every step (one
    spec per step for all ranks, or full depth), else the ranks wait on each other's all-gathers forever.
    per_block=False (default) shards the whole model as one unit: safe with any per-rank or per-row specs.
    Expert weights (E, in, out) shard along the expert dimension. Buffers (router bias, load counts) stay
    replicated: call `sync_expert_load` before `update_router_bias` so every rank applies the same update.
    param_dtype=bf16 runs forward and backward in bf16 with float32 sharded master weights and float32 reductions.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:  # a bf16 cast keeps the router in float32 (MoE._apply); FSDP2 wants one dtype per unit
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise UserError(f"apply_fsdp2: the model's parameters mix {names}; shard the float32 model and let "
                        f"param_dtype={param_dtype} run forward and backward in low precision")
    check_fsdp2(next(model.parameters()).device)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=mp)
    if per_block:
        for blk in _blocks(model):
            fully_shard(blk, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


def sync_expert_load(model: ElasticMoE, group=None) -> None:
    """Sum the per-expert load counters over ranks (data parallel), so router-bias updates agree everywhere."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    for i in model.moe_layers:
        dist.all_reduce(model.moe(i).load, group=group)
        dist.all_reduce(model.moe(i).fair_load, group=group)


def fused_adamw(params, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.1, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with the fused CUDA kernel where every parameter is on a GPU (one launch per step), else foreach."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused,
                             foreach=None if fused else True)


def lm_loss_fn(model: ElasticMoE, compile: bool = True):
    """A drop-in for `model.loss`: `loss_fn(input_ids, targets, spec=None, **forward_kw) -> (loss, ModelOutput)`.

    The forward runs without the head; the LM head and the cross-entropy then run as one compiled region, so the
    float32 copy of the (tokens x vocabulary) logits and its gradient are fused away rather than written out.
    The returned ModelOutput has logits=None.
    """
    from elastic_moe.model import lm_head_cross_entropy

    def head_ce(hidden, weight, bias, targets):
        return lm_head_cross_entropy(hidden, weight, bias, targets, model.numerics, reduction="mean")

    f = torch.compile(head_ce, dynamic=False) if compile else head_ce

    def loss_fn(input_ids, targets, spec=None, **kw):
        out = model(input_ids, spec, return_logits=False, **kw)
        bias = None if model.lm_head is None else model.lm_head.bias
        return f(out.hidden, model.head_weight(), bias, targets), out

    return loss_fn


def init_mesh(device_type: str | None = None):
    """A 1-D device mesh over all ranks of the current process group (torchrun), for `apply_fsdp2`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (dist.get_world_size(),))
