"""How the sub-model family is measured: held-out loss, task accuracy, latency and peak memory of one (sub-)model.

Latency and memory are measured on the standalone sub-model `hf.extract` builds, i.e. what `elastic-moe extract`
writes out:

- prefill latency: from the first forward of `generate` (a `prompt_len` prompt at batch B; the KV cache already
  allocated) to the first decode step;
- decode latency per token: the time of one decode step (forward, sampling and the loop's bookkeeping);
  both the median over `repeats` runs of N decode steps, in CPU time for a one-thread CPU model and wall time
  otherwise (see `time_models`);
- peak memory: weights + the peak of live tensors during generation (on CUDA the allocator's peak; on CPU counted
  op by op under a dispatch mode, see `PeakMemory`), KV cache included, the interpreter's own memory not.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.generate import SamplingParams, generate
from elastic_moe.model import ElasticMoE
from elastic_moe.spec import SubModelSpec


@dataclass
class MeasureConfig:
    batch_sizes: tuple[int, ...] = (1,)
    prompt_len: int = 64
    decode_tokens: int = 8  # decode steps per timed generation
    repeats: int = 10  # timed generations per sub-model and batch size
    quantile: float = 0.5  # of the step times, see time_models
    clock: str = "auto"  # auto | cpu | wall, see time_models
    chunk: int = 8  # candidates timed round-robin together (all held in memory at once)
    eval_batches: int = 8
    eval_batch_size: int = 8
    tasks: str | None = None  # a task domain (elastic_moe.tasks); None: loss only
    num_tasks: int = 16
    task_tokens: int = 48
    seed: int = 0

    def validate(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserError("family: batch sizes must be >= 1")
        if self.clock not in ("auto", "cpu", "wall"):
            raise UserError(f"family: clock {self.clock!r}: expected auto, cpu or wall")
        if not 0.0 <= self.quantile <= 1.0:
            raise UserError(f"family: quantile {self.quantile} must be in [0, 1]")
        if min(self.prompt_len, self.decode_tokens, self.repeats, self.chunk, self.eval_batches,
               self.eval_batch_size, self.num_tasks, self.task_tokens) < 1:
            raise UserError("family: prompt length, decode tokens, repeats, chunk and eval sizes must be >= 1")
        if self.tasks is not None:
            from elastic_moe.tasks.base import DOMAINS

            if self.tasks not in DOMAINS:  # checked here, not after the loss of every sub-model is measured
                raise UserError(f"unknown task domain {self.tasks!r} (known: {', '.join(DOMAINS)})")


def speed_cols(b: int) -> tuple[str, str, str]:
    return f"prefill_ms_b{b}", f"decode_ms_b{b}", f"memory_mb_b{b}"


def speed_row(b: int, v: dict, ref: dict[str, float]) -> dict:
    """Table columns of one speed record; latencies scaled to the reference anchor (raw figures kept)."""
    pre, dec, mem = speed_cols(b)
    row = {mem: v["memory_mb"]}
    for col, m in ((pre, "prefill_ms"), (dec, "decode_ms")):
        row[col] = v[m] * ref[m] / v[f"anchor_{m}"]
        row[f"{col}_raw"] = v[m]
        row[f"{col}_wall_p50"] = v[f"{m}_wall_p50"]
    return row


class PeakMemory(TorchDispatchMode):
    """Peak bytes of CPU tensor storage allocated by the ops run under this mode (inputs and weights not counted).

    A storage counts from the op that creates it until the last tensor that an op returned over it dies; views and
    in-place results share their input's storage and add nothing. Memory an op uses only inside its kernel is not
    seen, so this is a lower bound of the allocator's true peak, exact for what stays alive between ops.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in self._refs:
                self._refs[key] += 1
            elif key in inputs or st.nbytes() == 0:
                continue  # a view of something allocated outside (weights, inputs): not ours
            else:
                self._refs[key], self._sizes[key] = 1, st.nbytes()
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(cfg: ModelConfig, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, cfg.vocab_size, (batch, length), generator=g).tolist()


def _profiled_generate(sub: ElasticMoE, spec, prompts, new_tokens: int, device: torch.device
                       ) -> dict[str, tuple[float, list[float]]]:
    """One `generate` of 1 + new_tokens tokens, timed step by step on both clocks:
    {"wall" | "cpu": (prefill seconds, [seconds of each decode step])}.

    A step runs from the start of one forward to the start of the next (the last: to the end), so sampling and the
    loop's bookkeeping count too. eos -1 never matches: every run does the same work."""
    marks: list[tuple[float, float]] = []

    def hook(module, args):
        _sync(device)
        marks.append((time.perf_counter(), time.process_time()))

    h = sub.register_forward_pre_hook(hook)
    try:
        generate(sub, prompts, SamplingParams(max_new_tokens=1 + new_tokens, temperature=0.0), spec, eos_id=-1)
        _sync(device)
        marks.append((time.perf_counter(), time.process_time()))
    finally:
        h.remove()
    out = {}
    for c, name in enumerate(("wall", "cpu")):
        t = [m[c] for m in marks]
        out[name] = (t[1] - t[0], [b - a for a, b in zip(t[1:], t[2:])])
    return out


def resolve_clock(clock: str, device: torch.device) -> str:
    """auto: CPU time when the model runs on the CPU on one thread, else wall time."""
    if clock == "auto":
        return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise UserError("the cpu clock needs the model on the CPU and one thread (--threads 1)")
    return clock


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q = 0.5: the median, the mean of the middle two if even)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_models(models: list[tuple[ElasticMoE, SubModelSpec | None]], batch: int, mc: MeasureConfig,
                tick: Callable[[], None] = lambda: None) -> list[dict]:
    """Prefill and per-token decode latency (ms) of each model at one batch size.

    `repeats` short generations per model, round-robin over the models (each sees the same load), timed step by
    step, summarised by the `quantile` (the median by default) of the steps. The clock: on a GPU, or on a CPU with
    several threads, wall time. On a CPU with one thread, the CPU time of the process: on a shared machine the
    wall time of a step is mostly the time other jobs held the core. On our 2-core box at load 5, the median wall
    time of a decode step was 2.1-2.3x its CPU time and wandered by 10-30% between runs, and even the fastest of
    160 wall-clock steps jumped from 5.8 to 9.1 ms between runs of the same model; the CPU-time medians of
    three runs agreed within 3%. The wall-clock median is reported alongside (`*_wall_p50`).
    """
    if not models:
        return []
    device = next(models[0][0].parameters()).device
    clock = resolve_clock(mc.clock, device)
    prompts = _prompts(models[0][0].cfg, batch, mc.prompt_len, mc.seed)
    pre = [{"wall": [], "cpu": []} for _ in models]
    dec = [{"wall": [], "cpu": []} for _ in models]
    for sub, spec in models:  # warm-up: allocator, rotary tables, lazy kernels
        _profiled_generate(sub, spec, prompts, mc.decode_tokens, device)
    gc.collect()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(mc.repeats):
            for i in range(len(models)):
                j = (r + i) % len(models)  # rotate the start so no model is always first
                for name, (p, d) in _profiled_generate(*models[j], prompts, mc.decode_tokens, device).items():
                    pre[j][name].append(p)
                    dec[j][name] += d
            tick()
    finally:
        if gc_was:
            gc.enable()
    q = mc.quantile
    return [{"prefill_ms": 1e3 * quantile(p[clock], q), "decode_ms": 1e3 * quantile(d[clock], q), "clock": clock,
             "prefill_ms_wall_p50": 1e3 * statistics.median(p["wall"]),
             "decode_ms_wall_p50": 1e3 * statistics.median(d["wall"])}
            for p, d in zip(pre, dec)]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def peak_memory_mb(sub: ElasticMoE, spec, batch: int, mc: MeasureConfig) -> float:
    """Weights + peak live tensors while generating 1 + decode_tokens tokens from a prompt_len prompt at `batch`."""
    device = next(sub.parameters()).device
    prompts = _prompts(sub.cfg, batch, mc.prompt_len, mc.seed)
    params = SamplingParams(max_new_tokens=1 + mc.decode_tokens, temperature=0.0)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        generate(sub, prompts, params, spec, eos_id=-1)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        # Op-level tracking is slow, so run 2 new tokens (the peak is reached at prefill or the first steps) and add
        # the KV cache that the longer run would allocate on top.
        cfg = sub.cfg
        extra = max(0, mc.decode_tokens - 1)
        kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * cfg.dim_head * extra
        kv *= next(sub.parameters()).element_size()
        sub.rotary._cache = None  # count the rotary table, which the first call builds
        with torch.no_grad(), PeakMemory() as pm:
            generate(sub, prompts, SamplingParams(max_new_tokens=2, temperature=0.0), spec, eos_id=-1)
        peak = pm.peak + kv
    return (weight_bytes(sub) + peak) / 2**20


@torch.no_grad()
def heldout_loss(model: ElasticMoE, spec, batches: list, n: int | None = None) -> float:
    """Mean token cross-entropy of the elastic forward at `spec` over the first n held-out batches."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    tot, cnt = 0.0, 0
    for x, y in batches[:n]:
        logits = model(x.to(device), spec, track_load=False).logits
        tot += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"))
        cnt += y.numel()
    model.train(was)
    return tot / max(cnt, 1)


def task_accuracy(model: ElasticMoE, spec, tasks: list, tokenizer, max_tokens: int, batch: int = 16) -> float:
    """Greedy accuracy on `tasks`; a task whose prompt does not fit the context with `max_tokens` counts as wrong."""
    from elastic_moe.tasks import verify

    limit = model.cfg.max_position_embeddings - max_tokens
    encoded = [(t, tokenizer.encode_chat(t.messages, add_generation_prompt=True)) for t in tasks]
    encoded = [(t, ids) for t, ids in encoded if len(ids) <= limit]
    correct = 0
    for i in range(0, len(encoded), batch):
        part = [t for t, _ in encoded[i:i + batch]]
        prompts = [ids for _, ids in encoded[i:i + batch]]
        outs = generate(model, prompts, SamplingParams(max_new_tokens=max_tokens, temperature=0.0), spec,
                        eos_id=tokenizer.eos_id)
        for t, o in zip(part, outs):
            text = tokenizer.decode([x for x in o.tokens if x != tokenizer.eos_id], skip_special_tokens=True)
            correct += bool(verify(t, text).correct)
    return correct / max(len(tasks), 1)




def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def inference_code_version() -> str:
    """Hash of the modules a measurement runs through: a faster kernel or decode loop, or another way of timing,
    invalidates cached measurements."""
    from elastic_moe import generate as g
    from elastic_moe import model as m
    from elastic_moe import moe, ops

    h = hashlib.sha256()
    for path in (g.__file__, m.__file__, moe.__file__, ops.__file__, __file__):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:12]


def speed_settings(mc: MeasureConfig, device: torch.device) -> dict:
    """Everything a latency or memory figure depends on besides the spec (the cache key, and what `extract` reuses
    to re-measure)."""
    return {"prompt_len": mc.prompt_len, "decode_tokens": mc.decode_tokens, "repeats": mc.repeats,
            "quantile": mc.quantile, "clock": resolve_clock(mc.clock, device), "seed": mc.seed,
            "device": str(device.type), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "code": inference_code_version()}
