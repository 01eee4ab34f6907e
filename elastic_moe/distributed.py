"""Data parallelism under `torchrun`: process group set-up, DDP or FSDP2 wrapping, collectives, full state dicts.

One process per device; `torchrun --nproc_per_node N` sets RANK / WORLD_SIZE / LOCAL_RANK. Backend: nccl on GPU,
gloo on CPU. Without those variables everything here is a no-op on a single process.

Per-row elastic sub-models leave some parameters without a gradient on some ranks in some steps. Instead of
`find_unused_parameters` (DDP) - which FSDP2 has no counterpart for - the training forward adds
`0 * sum(p.sum())` over all parameters (see train.TrainForward), so every parameter gets a gradient every step
and every collective is issued on every rank. FSDP2 shards the whole model as one unit for the same reason: a
per-block unit whose block no row on a rank uses would never all-gather there, and the ranks would deadlock.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from elastic_moe.compat import torch_version
from elastic_moe.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device = \"cuda\" but no CUDA device is available")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise UserError(f"train.device = {device!r}: expected auto, cpu or cuda")


def setup(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        except ValueError as e:  # e.g. WORLD_SIZE exported by hand: no rendezvous address
            raise UserError(f"WORLD_SIZE={world} but the process group cannot start ({e}); launch with "
                            "`torchrun --nproc_per_node N`, or unset WORLD_SIZE") from None
        owns = True
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)
    return Dist(device=dev)


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """Sum (or max) `t` over ranks, in place; returns it. gloo needs CPU tensors for some dtypes, so small
    metric vectors are reduced where they live."""
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, d: Dist):
    """Rank 0's `obj` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def fsdp2_runs_on_cpu() -> bool:
    """FSDP2 over gloo on a CPU works from torch 2.9: torch 2.6 fails on its first all-gather (its CPU streams cannot
    record events) and torch 2.8 sums the ranks' gradients instead of averaging them."""
    return torch_version() >= (2, 9)


def check_fsdp2(device: torch.device) -> None:
    """Refuse FSDP2 before sharding where it would fail or give wrong gradients."""
    if device.type == "cpu" and not fsdp2_runs_on_cpu():
        raise UserError(f"FSDP2 on a CPU needs torch >= 2.9 (this is {torch.__version__}); use DDP "
                        f"(train.parallel = \"ddp\") or a GPU")


def wrap(module: nn.Module, d: Dist, mode: str) -> nn.Module:
    """DDP or FSDP2 around `module` (already on d.device); unchanged on a single process."""
    if not d.active:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: the router bias, load counters and importance orders are kept identical by
        # all-reducing their inputs; DDP's broadcast would overwrite every rank's load counts with rank 0's.
        # (Newer torch deprecates the flag in favour of forward_sync_buffers, which still syncs at init.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return DDP(module, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        check_fsdp2(d.device)
        fully_shard(module)
        return module
    raise UserError(f"train.parallel = {mode!r}: expected ddp or fsdp")


def grad_sync(model: nn.Module, d: Dist, mode: str, sync: bool):
    """Context for one micro-step's backward: no gradient all-reduce except on the last micro-step."""
    if not d.active or sync:
        return contextlib.nullcontext()
    if mode == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)  # FSDP2; switched back on by the last micro-step

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return restore()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip to `max_norm` (0: measure only); returns the total norm as a float (DTensor-aware for FSDP2)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist, mode: str) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, valid on rank 0. Collective under FSDP."""
    if d.active and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    inner = model.module if hasattr(model, "no_sync") else model
    return inner.state_dict(), optimizer.state_dict()


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, d: Dist, mode: str) -> None:
    if d.active and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, _keyed_by_name(model, optimizer, state),
                                 options=StateDictOptions(full_state_dict=True))
    else:  # torch matches parameters by position, so a state keyed by name (written under FSDP) loads as well
        optimizer.load_state_dict(state)


def _keyed_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state as FSDP's full state dicts key it (by parameter name). A single process and DDP save torch's
    own, which numbers the parameters in the optimizer's order."""
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if not all(isinstance(i, int) for i in saved):
        return state
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(saved) != len(params):
        raise UserError(f"the checkpoint's optimizer state holds {len(saved)} parameters, the model has {len(params)}")
    names = {id(p): n for n, p in model.named_parameters()}
    name = {i: names[id(p)] for i, p in zip(saved, params)}
    return {"state": {name[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in state["param_groups"]]}
