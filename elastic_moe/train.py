"""Elastic (once-for-all) MoE pre-training: the config dataclasses and one straight training loop.

    cfg = load_config(TrainConfig, "configs/tiny.toml", ["train.max_steps=50"])
    summary = train(cfg, "runs/tiny")       # resumes from runs/tiny/checkpoints/ when there is one

RUN_DIR/
  config.toml, config.json    the run's config (a resume must keep its [model] section)
  tokenizer/                  the tokenizer of the run (Hugging Face files)
  metrics.jsonl, tb/          one JSON object per logged step; TensorBoard events when tensorboard is installed
  checkpoints/step_XXXXXXXX/  model (+ tokenizer) and trainer.pt: optimizer, data stream, importance scores,
                              RNG states, step; written atomically by rank 0, the last `keep_checkpoints` kept
  report.md, loss.png         written when the run completes

Under `torchrun` the same function runs data-parallel (see distributed.py); every rank reads its own slice of each
global batch and draws the same per-row sub-models, so N ranks x batch B train like one process with batch N*B.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from elastic_moe import distributed, gpu
from elastic_moe.atomic import atomic_write_json, atomic_write_text, refuse_inside_corpus, run_lock
from elastic_moe.checkpoint import TRAINER_STATE, load_checkpoint, load_optimizer_state, save_checkpoint, torch_state
from elastic_moe.config import ModelConfig
from elastic_moe.corpus import Corpus
from elastic_moe.elastic import (
    FULL,
    ElasticConfig,
    ElasticSampler,
    Importance,
    check_specs,
    default_eval_specs,
    spec_name,
)
from elastic_moe.errors import UserError, require, threads_check
from elastic_moe.metrics import MetricsSink, read_metrics, recent_mean, write_report
from elastic_moe.model import ElasticMoE, lm_head_cross_entropy
from elastic_moe.runloop import (
    StopSignal,
    latest_checkpoint,
    prune_checkpoints,
    resuming_from,
    rng_state,
    say_if_finished,
    set_rng_state,
)
from elastic_moe.schedule import lr_at
from elastic_moe.shards import PreparedData, prepare_data, tokenizer_sample_check
from elastic_moe.spec import SubModelSpec, param_counts
from elastic_moe.tomlconfig import changed_settings, note_changed_settings

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.toml"


# ----------------------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    path: str | None = None  # file or folder (.jsonl: one JSON object per line); None: Python's stdlib sources
    seq_len: int = 128
    max_bytes: int | None = None  # use only this much of the corpus text
    heldout_frac: float = 0.01
    tokenizer_sample_mb: float = 10.0
    jsonl_field: str = "text"
    cache_dir: str | None = None  # tokenizers and shards; None: $ELASTIC_MOE_CACHE or ~/.cache/elastic_moe


@dataclass
class InitConfig:
    """How a fresh model's weights are drawn (a resumed run keeps its own): normal(0, model.initializer_range), then
    these rescalings (`ElasticMoE.scale_init`)."""
    residual_scaled: bool = False  # residual-stream writers (attention out, down projections) / sqrt(2 * layers)
    embedding_std: float | None = None  # None: model.initializer_range


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule_steps: int | None = None  # length of the cosine schedule; None: train.max_steps
    weight_decay: float = 0.1  # on matrices, not on norms, biases or routers
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping

    def validate(self) -> None:
        checks = [
            (self.lr > 0 and self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1,
             "optim: lr must be > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]"),
            (self.schedule_steps is None or self.schedule_steps >= 1, "optim.schedule_steps must be >= 1"),
            # past the end of its warm-up the schedule never reaches optim.lr, nor decays
            (self.schedule_steps is None or self.warmup_steps <= self.schedule_steps,
             f"optim.warmup_steps = {self.warmup_steps} is more than optim.schedule_steps = {self.schedule_steps}: "
             "the learning rate would never reach optim.lr (lower warmup_steps or raise schedule_steps)"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)"),
            (self.eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
             "optim: eps must be > 0, weight_decay and grad_clip >= 0"),
        ]
        require(checks)


@dataclass
class LoopConfig:
    max_steps: int = 200
    batch_size: int = 16  # sequences per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2 fully_shard)
    compile: bool = False  # regional torch.compile: each decoder layer on its own (gpu.compile_blocks), the LM head
    # and the loss as one more region (without distillation)
    compile_backend: str = "inductor"  # any torch.compile backend; aot_eager traces without generating code
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward instead of storing it
    threads: int = 0  # CPU threads for torch; 0: torch's default (on a busy machine 1 can be much faster)
    router_bias_rate: float = 1e-3  # aux-loss-free balancing (DeepSeek-V3); 0: off
    aux_loss_weight: float = 0.0  # Switch-style load-balancing loss; 0: off
    log_every: int = 1
    save_every: int = 100  # 0: only at the end and on SIGINT/SIGTERM
    keep_checkpoints: int = 3
    progress: bool = True
    tensorboard: bool = True


@dataclass
class EvalConfig:
    every: int = 100  # 0: only at the end
    batch_size: int = 16
    max_batches: int = 8
    submodels: list[SubModelSpec] | None = None  # None: full + the smallest of each elastic dimension + smallest


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        t, d = self.train, self.data
        backends = _compile_backends() if t.compile else []  # importing dynamo takes seconds: only when compiling
        self.model.validate()
        self.elastic.validate()
        self.optim.validate()
        checks = [
            (t.max_steps >= 0, f"train.max_steps = {t.max_steps} must be >= 0"),
            (self.init.embedding_std is None or self.init.embedding_std > 0,
             f"init.embedding_std = {self.init.embedding_std} must be > 0"),
            (self.init.embedding_std is None or self.model.initializer_range > 0,  # it rescales the drawn embeddings
             f"init.embedding_std = {self.init.embedding_std} needs model.initializer_range > 0, got "
             f"{self.model.initializer_range}"),
            threads_check(t.threads, "train.threads"),
            (t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1"),
            (t.dtype in ("auto", "fp32", "bf16"), f"train.dtype = {t.dtype!r}: expected auto, fp32 or bf16"),
            (t.parallel in ("ddp", "fsdp"), f"train.parallel = {t.parallel!r}: expected ddp or fsdp"),
            (not t.compile or t.compile_backend in backends,
             f"train.compile_backend = {t.compile_backend!r}: not a torch.compile backend (expected one of "
             f"{', '.join(backends)})"),
            (t.log_every >= 1 and t.save_every >= 0 and t.keep_checkpoints >= 1,
             "train.log_every and train.keep_checkpoints must be >= 1, train.save_every >= 0"),
            (t.router_bias_rate >= 0 and t.aux_loss_weight >= 0, "train.router_bias_rate and aux_loss_weight must be >= 0"),
            tokenizer_sample_check(d.tokenizer_sample_mb),
            (1 <= d.seq_len <= self.model.max_position_embeddings,
             f"data.seq_len = {d.seq_len} must be in [1, model.max_position_embeddings = "
             f"{self.model.max_position_embeddings}]"),
            (self.eval.every >= 0 and self.eval.batch_size >= 1 and self.eval.max_batches >= 0,
             "eval: every and max_batches must be >= 0, batch_size >= 1"),
        ]
        require(checks)
        self.elastic.ranges(self.model)
        if self.eval.submodels:
            try:
                check_specs(self.eval.submodels, self.model)
            except UserError as e:
                raise UserError(f"eval.submodels: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


def dump_toml(data: dict, prefix: str = "") -> str:
    """A nested dict as TOML (None values left out: they are the defaults)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):  # as TOML escapes: no surrogate pairs (characters past U+FFFF) and no raw DEL
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    def is_tables(v) -> bool:
        return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)

    lines = []
    for k, v in data.items():
        if v is None or isinstance(v, dict) or is_tables(v):
            continue
        lines.append(f"{k} = {value(v)}")
        try:
            lines[-1].encode("utf-8")
        except UnicodeEncodeError:  # a path of bytes that are not UTF-8 (os.fsdecode's surrogates)
            raise UserError(f"config key {prefix}{k}: {value(v)} is not UTF-8 text, which config.toml must be; "
                            "rename it or use a link with a UTF-8 name") from None
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            body = dump_toml(v, name + ".")
            out += f"\n[{name}]\n" + body
        elif is_tables(v):
            for item in v:
                out += f"\n[[{prefix}{k}]]\n" + dump_toml(item, f"{prefix}{k}.")
    return out


def _compile_backends() -> list[str]:
    from torch._dynamo import list_backends

    return sorted(set(list_backends(exclude_tags=())) | {"inductor"})


# ------------------------------------------------------------------------------------------------------ pieces


class Rows:
    """The per-row specs, handed through DDP / FSDP untouched (they would walk and rebuild dataclasses)."""

    def __init__(self, specs):
        self.specs = specs


class TrainForward(nn.Module):
    """What DDP / FSDP wrap: the model's forward plus `0 * sum(params)`, so that every parameter gets a (zero)
    gradient in every step even when no row of this rank used it (per-row elastic sub-models).

    Given targets, it returns the per-token cross-entropy (B, S) instead of the logits, computed by `token_ce`
    (`lm_head_cross_entropy`, compiled under train.compile so that the float32 logits are never written out)."""

    def __init__(self, model: ElasticMoE, token_ce=lm_head_cross_entropy):
        super().__init__()
        self.model = model
        self.token_ce = token_ce

    def forward(self, x: torch.Tensor, rows: Rows, want_aux: bool = False, targets: torch.Tensor | None = None):
        m = self.model
        out = m(x, rows.specs, want_aux=want_aux, return_logits=targets is None)
        touch = torch.stack([p.sum() for p in m.parameters()]).sum() * 0.0
        if targets is None:
            return out.logits, out.aux_loss, touch
        bias = None if m.lm_head is None else m.lm_head.bias
        return self.token_ce(out.hidden, m.head_weight(), bias, targets, m.numerics), out.aux_loss, touch


def make_optimizer(model: nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith("router") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=device.type == "cuda" or None)


def autocast_for(dtype: str, device: torch.device):
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def objective(logits: torch.Tensor | None, y: torch.Tensor, specs: list[SubModelSpec], groups: int,
              distill_weight: float, teacher: torch.Tensor | None = None, token_ce: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, float]]]:
    """Training loss and logging parts {name: (sum, count)}. token_ce: the per-token cross-entropy (B, S) when the
    forward computed it from the hidden states (no distillation: the logits are not needed then).

    per_sample (groups 1): mean over rows of the token cross-entropy, plus, on sub-model rows, distill_weight *
    KL(full || sub-model) against `teacher`, the detached full model's logits of those rows (in-place
    distillation); every row weighs the same.
    sandwich (groups G): mean over the G sub-models of their cross-entropy, plus distill_weight * mean KL from
    the detached largest (group 0) to each other group.
    """
    if token_ce is None:
        token_ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    ce = token_ce.mean(1)
    ce_d = ce.detach().double()
    if groups == 1:
        loss = ce.mean()
        full = torch.tensor([s == FULL for s in specs], device=ce.device)
        parts = {"loss_full": (ce_d[full].sum(), float(full.sum())), "loss_sub": (ce_d[~full].sum(), float((~full).sum()))}
        if distill_weight > 0:  # the part exists on every rank, rows or not: ranks all-reduce the same parts
            kl = token_kl(teacher, logits[~full]).mean(1) if teacher is not None else ce.new_zeros(0)
            loss = loss + distill_weight * kl.sum() / len(specs)
            parts["kl"] = (kl.detach().double().sum(), float(kl.numel()))
    else:
        per = ce.view(groups, -1).mean(1)
        loss = per.mean()
        parts = {"loss_largest": (per[0].detach().double(), 1.0), "loss_smallest": (per[1].detach().double(), 1.0)}
        if distill_weight > 0:
            B = y.shape[0] // groups
            kl = token_kl(logits[:B].detach(), logits[B:].unflatten(0, (groups - 1, B))).mean()
            loss = loss + distill_weight * kl
            parts["kl"] = (kl.detach().double(), 1.0)
    parts["loss"] = (loss.detach().double(), 1.0)
    return loss, parts


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, in float32 (teacher broadcast over leading student dims)."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1)


class _Weights:
    """What save_checkpoint needs of a model: its config and a (full, CPU) state dict."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor]):
        self.cfg, self._state = cfg, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def check_run_dir(out: Path, cfg: TrainConfig, say: Callable[[str], None]) -> None:
    """Refuse to resume a run of another model config; note other changed settings."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError too
        raise UserError(f"{path} is corrupt ({e}); use another --out") from None
    diff = changed_settings(saved.get("model", {}), cfg.to_dict()["model"])
    if diff:
        raise UserError(f"{out} holds a run of a different model config ({', '.join(diff[:4])}); "
                        "resume with the same [model] section or use another --out")
    note_changed_settings(out, cfg.to_dict(), say, skip=("model",))


def prepare(cfg: TrainConfig, out: Path, d: distributed.Dist, say: Callable[[str], None]) -> PreparedData:
    """Tokenizer and shards: rank 0 builds (or finds them cached), then the other ranks read them."""
    dc = cfg.data
    own_tok = out / "tokenizer"
    kw = dict(vocab_size=cfg.model.vocab_size, seq_len=dc.seq_len, heldout_frac=dc.heldout_frac,
              tokenizer_sample_mb=dc.tokenizer_sample_mb, jsonl_field=dc.jsonl_field, max_bytes=dc.max_bytes,
              cache_dir=dc.cache_dir)
    data, err = None, None
    if d.is_main:
        try:
            # the run's own tokenizer once it has trained (resume); one left by a run that failed before its
            # first checkpoint (e.g. on another corpus) is not reused
            started = (own_tok / "tokenizer.json").is_file() and latest_checkpoint(out) is not None
            data = prepare_data(dc.path, None, tokenizer=own_tok if started else None, progress=cfg.train.progress,
                                log=say, **kw)
            check_data(cfg, data, d.world_size)
            if not started:  # only once the data passed its checks: a refused run leaves nothing behind
                data.tokenizer.save(own_tok)
        except UserError as e:
            err = str(e)
    err = distributed.broadcast_object(err, d)
    if err:
        raise UserError(err)
    if not d.is_main:
        data = prepare_data(dc.path, None, tokenizer=own_tok, progress=False, log=lambda _: None, **kw)
    return data


def check_data(cfg: TrainConfig, data: PreparedData, world_size: int) -> None:
    tok, dc = data.tokenizer, cfg.data
    windows = data.train.num_windows(dc.seq_len)
    if cfg.train.batch_size * world_size > windows:
        raise UserError(f"train.batch_size {cfg.train.batch_size} x {world_size} rank(s) is more than the "
                        f"{windows:,} training sequences of seq_len {dc.seq_len} in the data")
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens, more than model.vocab_size = {cfg.model.vocab_size}")
    ids = (tok.pad_id, tok.bos_id, tok.eos_id)
    if ids != (cfg.model.pad_token_id, cfg.model.bos_token_id, cfg.model.eos_token_id):
        raise UserError(f"model pad/bos/eos ids must match the tokenizer's {ids}")


@torch.no_grad()
def evaluate(model: ElasticMoE, root: nn.Module, batches, specs: list[SubModelSpec], d: distributed.Dist,
             fsdp: bool, amp) -> dict[str, float]:
    """Mean held-out token cross-entropy of each sub-model. Batches are split over ranks (FSDP: every rank runs
    every batch, because its forward is collective)."""
    model.eval()
    results = {}
    try:
        for spec in specs:
            tot = torch.zeros(2, dtype=torch.float64, device=d.device)
            for i, (x, y) in enumerate(batches):
                if not fsdp and i % d.world_size != d.rank:
                    continue
                x, y = x.to(d.device), y.to(d.device)
                with amp():
                    logits = root(x, Rows(spec))[0] if fsdp else model(x, spec).logits
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
                tot += torch.stack([ce.double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=d.device)])
            if not fsdp:
                distributed.all_reduce(tot, d)
            results[spec_name(spec)] = float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")
    finally:
        model.train()
    return results


def submodel_rows(model: ElasticMoE, specs: list[SubModelSpec], seq_len: int, losses: dict[str, float]) -> list[dict]:
    cfg, rows = model.cfg, []
    for spec in specs:
        rs = model.resolve(spec)
        kept_moe = [i for i in rs.layers if i in cfg.moe_layers]
        # one number when every kept MoE layer has the same, else per layer ("2.1.1")
        m = _per_layer([rs.num_experts(i, cfg) for i in kept_moe]) if kept_moe else cfg.moe_num_experts
        k = _per_layer([rs.top_k[i] for i in kept_moe]) if kept_moe else cfg.moe_k
        rows.append({"name": spec_name(spec), "layers": len(rs.layers), "experts": m, "top_k": k,
                     "active_params": param_counts(cfg, rs)[1],
                     "flops_per_token": model.flops_per_token(seq_len, spec), "loss": losses.get(spec_name(spec), float("nan"))})
    return rows


def _per_layer(values: list[int]) -> int | str:
    return values[0] if len(set(values)) == 1 else ".".join(map(str, values))


# -------------------------------------------------------------------------------------------------------- loop


def train(cfg: TrainConfig, out_dir: str | Path, log: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) the run in `out_dir`; returns a summary dict (see the end of `_train`).

    Sets up and tears down the process group under torchrun (an already initialised one is used and kept).
    """
    cfg.validate()
    if cfg.data.path:  # saved absolute (a symlink kept as one), so that a resume from another directory finds it
        cfg.data.path = str(Path(cfg.data.path).expanduser().absolute())
        refuse_inside_corpus(out_dir, cfg.data.path)
    dump_toml(cfg.to_dict())  # settings config.toml cannot hold are refused before anything is written
    d = distributed.setup(cfg.train.device)
    try:
        with contextlib.ExitStack() as lock:
            err = None
            if d.is_main:  # rank 0 writes the run folder; a refusal is every rank's, or the others hang or crash
                try:
                    lock.enter_context(run_lock(out_dir))
                except UserError as e:
                    err = str(e)
                except OSError as e:
                    err = f"{e.filename}: {e.strerror}"
            err = distributed.broadcast_object(err, d)
            if err:
                raise UserError(err)
            return _train(cfg, Path(out_dir), d, (log or tqdm.write) if d.is_main else (lambda _: None))
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, out: Path, d: distributed.Dist, say: Callable[[str], None]) -> dict:
    tc, ec = cfg.train, cfg.elastic
    fsdp = d.active and tc.parallel == "fsdp"
    if tc.threads:
        torch.set_num_threads(tc.threads)
    check_run_dir(out, cfg, say)
    ckpt = latest_checkpoint(out)
    state = None
    if ckpt is not None:
        state_path = ckpt / TRAINER_STATE
        with resuming_from(ckpt):
            model, _ = load_checkpoint(ckpt, "cpu", expect=cfg.model)
        if not state_path.is_file():
            raise UserError(f"{ckpt} has no {TRAINER_STATE}: not a training checkpoint")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    data = prepare(cfg, out, d, say)
    if state is None:
        torch.manual_seed(tc.seed)
        model = ElasticMoE(cfg.model)
        model.scale_init(cfg.init.residual_scaled, cfg.init.embedding_std)
    model.to(d.device).train()
    if tc.activation_checkpointing:  # before compiling, so that the compiled region holds the checkpoint
        gpu.apply_activation_checkpointing(model)
    if tc.compile:  # per-sequence sub-models change a layer's row count from step to step: dynamic after the first
        gpu.compile_blocks(model, backend=tc.compile_backend, dynamic=None)
    sampler = ElasticSampler(ec, cfg.model, tc.seed)
    importance = Importance(model, ec)
    token_ce = lm_head_cross_entropy
    if tc.compile:  # the LM head, the float32 cast and the loss as one region
        token_ce = torch.compile(token_ce, backend=tc.compile_backend, dynamic=None)
    root = distributed.wrap(TrainForward(model, token_ce), d, tc.parallel)
    optimizer = make_optimizer(model, cfg.optim, d.device)
    stream = data.train_stream(tc.batch_size, d.rank, d.world_size, tc.seed)
    step, tokens, elapsed = 0, 0, 0.0
    if state is not None:
        load_optimizer_state(optimizer, state["optimizer"],
                             lambda s: distributed.load_optimizer(root, optimizer, s, d, tc.parallel))
        stream.load_state_dict(state["data"])
        importance.load_state_dict(state["elastic"], d.rank, d.world_size)
        set_rng_state(state["rng"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        say(f"resuming {out} from step {step} ({ckpt.name})")
        ranks = state.get("world_size", d.world_size)
        if ranks != d.world_size:  # not a setting in config.toml, so the changed-settings note cannot name it
            was = state.get("global_batch")  # absent in checkpoints before session 25
            now = tc.batch_size * tc.grad_accum * d.world_size
            change = (f"stays at {now}" if was == now else f"goes from {was} to {now}") if was else f"is now {now}"
            say(f"note: {d.world_size} rank(s) now, {ranks} when the checkpoint was written: the global batch "
                f"{change} sequences per step")
        was_total = (state.get("schedule") or {}).get("schedule_steps")
        now_total = cfg.optim.schedule_steps or tc.max_steps
        o = cfg.optim
        lr_was, lr_now = (lr_at(step, o.lr, o.warmup_steps, n, o.min_lr_ratio) for n in (was_total or now_total, now_total))
        if was_total and was_total != now_total and lr_was != lr_now:
            say(f"note: the learning-rate schedule now spans {now_total} steps instead of {was_total}: at step "
                f"{step} the lr goes from {lr_was:.3g} to {lr_now:.3g} (set optim.schedule_steps = {was_total} to "
                "keep the old schedule)")
        say_if_finished(step, tc.max_steps, say)
    if d.is_main:  # only once the checkpoint has resumed: a refused resume leaves the run's own settings in place
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
        atomic_write_text(out / "config.toml", dump_toml(cfg.to_dict()))
    heldout = data.heldout_batches(cfg.eval.batch_size, cfg.eval.max_batches)
    eval_specs = list(cfg.eval.submodels or default_eval_specs(sampler))
    amp = autocast_for(tc.dtype, d.device)
    moe_layers = model.moe_layers
    schedule_steps = cfg.optim.schedule_steps or tc.max_steps
    if step < tc.max_steps and cfg.optim.warmup_steps > schedule_steps:  # schedule_steps unset: a later session may
        # raise max_steps, and a short first session (or a smoke run) is not refused, but said
        say(f"note: optim.warmup_steps = {cfg.optim.warmup_steps} is more than the {schedule_steps} steps of the "
            f"schedule (train.max_steps): the learning rate stays below optim.lr = {cfg.optim.lr:g} (set "
            "optim.schedule_steps or lower optim.warmup_steps)")
    step_tokens = tc.batch_size * cfg.data.seq_len * d.world_size * tc.grad_accum
    want_aux = tc.aux_loss_weight > 0
    reorder = ec.expert_policy == "importance" or ec.layer_policy == "importance"
    if d.is_main:
        say(f"model: {model.num_params() / 1e6:.2f} M parameters ({cfg.model.num_params(active=True) / 1e6:.2f} M active), "
            f"{d.world_size} process(es) on {d.device.type}, {step_tokens:,} tokens/step, "
            f"elastic {ec.scheme}: {sampler.ranges}")
        if tc.compile:
            say(f"train.compile: the first steps compile the layers ({tc.compile_backend}); later steps reuse the graphs")

    def forward_full(x: torch.Tensor):
        return root(x.to(d.device), Rows(None)) if fsdp else model(x.to(d.device))

    kd = ec.distill_weight > 0
    kd_per_sample = kd and sampler.groups == 1

    @torch.no_grad()
    def distill_teacher(x: torch.Tensor, specs: list[SubModelSpec]) -> torch.Tensor | None:
        """The full model's logits on this micro-batch's sub-model rows, in eval mode (no load counting, no
        routing-mass hooks). Under FSDP every rank runs it on all its rows (the shards are gathered collectively,
        so the ranks must agree on the number of forwards); elsewhere only on the sub-model rows."""
        sub = [i for i, s in enumerate(specs) if s != FULL]
        if not sub and not fsdp:
            return None
        model.eval()
        try:
            with amp():
                logits = forward_full(x if fsdp else x[sub])
        finally:
            model.train()
        logits = logits[0] if isinstance(logits, tuple) else logits.logits
        return logits[sub] if fsdp else logits

    def save() -> Path:
        model_sd, optim_sd = distributed.full_state(root, optimizer, d, tc.parallel)
        path = out / "checkpoints" / f"step_{step:08d}"
        elastic_state = importance.state_dict()  # each rank's routing mass is its own until the next reorder
        elastic_state["mass_by_rank"] = distributed.all_gather_object(elastic_state["mass"], d)
        if d.is_main:
            model_sd = {k.removeprefix("model."): v.detach().cpu() for k, v in model_sd.items()}
            trainer = {"step": step, "tokens": tokens, "elapsed_s": elapsed, "optimizer": optim_sd, "world_size": d.world_size,
                       "global_batch": tc.batch_size * tc.grad_accum * d.world_size,
                       "data": stream.state_dict(), "elastic": elastic_state, "rng": rng_state(),
                       "schedule": {"step": step, "schedule_steps": schedule_steps}}
            save_checkpoint(path, _Weights(cfg.model, model_sd), meta={"step": step, "tokens": tokens},
                            tokenizer_dir=out / "tokenizer",
                            extra={TRAINER_STATE: torch_state(trainer)})
            prune_checkpoints(out, tc.keep_checkpoints)
        distributed.barrier(d)
        return path

    sink = MetricsSink(out, step, tc.tensorboard) if d.is_main else None
    stop = StopSignal()
    bar = tqdm(total=tc.max_steps, initial=step, unit="step", dynamic_ncols=True, smoothing=0.1,
               disable=not (d.is_main and tc.progress) or step >= tc.max_steps)  # nothing to train: no bar
    last_ckpt, last_eval = ckpt, {}
    recent: list[float] = []
    part_names: list[str] = []
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, schedule_steps, cfg.optim.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            acc: dict[str, list[float]] = {}
            for micro in range(tc.grad_accum):
                x, y = stream.next_batch()
                specs = sampler.step_specs(step, micro, tc.batch_size, d.rank, d.world_size)
                if sampler.groups > 1:
                    x, y = x.repeat(sampler.groups, 1), y.repeat(sampler.groups, 1)
                x, y = x.to(d.device), y.to(d.device)
                rows = Rows(sampler.resolve(model, specs))
                teacher = distill_teacher(x, specs) if kd_per_sample else None
                with distributed.grad_sync(root, d, tc.parallel, micro == tc.grad_accum - 1):
                    with amp():  # distillation needs the logits; otherwise the forward ends in the loss
                        result, aux, touch = root(x, rows, want_aux, None if kd else y)
                    loss, parts = objective(result if kd else None, y, specs, sampler.groups, ec.distill_weight,
                                            teacher, token_ce=None if kd else result)
                    if want_aux and aux is not None:
                        loss = loss + tc.aux_loss_weight * aux
                    ((loss + touch) / tc.grad_accum).backward()
                for k, (s, n) in parts.items():
                    a = acc.setdefault(k, [0.0, 0.0])
                    a[0], a[1] = a[0] + float(s), a[1] + n
            grad_norm = distributed.clip_grad_norm(model, cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # One all-reduce per step: logging sums, the stop flag and the expert loads for router balancing.
            part_names = sorted(acc)
            loads = [t for i in moe_layers for t in (model.moe(i).load, model.moe(i).fair_load)]
            vec = torch.tensor([v for k in part_names for v in acc[k]] + [float(stop.signum is not None)],
                               dtype=torch.float64)
            vec = torch.cat([vec.to(d.device)] + [ld.double() for ld in loads])
            distributed.all_reduce(vec, d)
            n_parts = 2 * len(part_names)
            for j, ld in enumerate(loads):
                E = ld.numel()
                ld.copy_(vec[n_parts + 1 + j * E: n_parts + 1 + (j + 1) * E])
            load_stats = model.load_stats()
            model.update_router_bias(tc.router_bias_rate)
            stopping = bool(vec[n_parts] > 0)
            sums = vec[:n_parts].cpu().view(-1, 2)
            step += 1
            tokens += step_tokens
            if reorder and step % ec.reorder_every == 0:
                # the layer order is measured on this step's training rows, not on held-out ones the evaluations score
                importance.reorder(lambda t: distributed.all_reduce(t, d), forward_full, x[: tc.batch_size])
                sampler.clear_cache()

            dt = time.perf_counter() - t0
            elapsed += dt
            row = {"step": step, "tokens": tokens, "lr": lr}
            for k, (s, n) in zip(part_names, sums.tolist()):
                if n > 0:
                    row[k] = s / n
            if "loss_full" in acc:
                tot = sums[part_names.index("loss_full"), 1] + sums[part_names.index("loss_sub"), 1]
                row["frac_full"] = float(sums[part_names.index("loss_full"), 1] / tot)
            row.update({"grad_norm": grad_norm, "tokens_per_s": step_tokens / dt, "step_s": dt, "elapsed_s": elapsed})
            vals = [v for k, v in load_stats.items() if k.endswith("max_over_mean")]
            if vals:
                row["load/max_over_mean"] = max(vals)
                row["load/unused"] = sum(v for k, v in load_stats.items() if k.endswith("unused"))
            row.update(load_stats)
            recent = (recent + [row["loss"]])[-20:]

            final = step == tc.max_steps
            evaluated = bool(heldout) and (final or bool(cfg.eval.every and step % cfg.eval.every == 0))
            if evaluated:
                t_eval = time.perf_counter()
                last_eval = evaluate(model, root, heldout, eval_specs, d, fsdp, amp)
                for name, v in last_eval.items():
                    row[f"eval/{name}/loss"] = v
                elapsed += time.perf_counter() - t_eval
                say(f"step {step}: held-out loss " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if sink is not None and (step % tc.log_every == 0 or final or evaluated):
                sink.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
            if final or stopping or (tc.save_every and step % tc.save_every == 0):
                last_ckpt = save()
            if stopping:
                if step < tc.max_steps:  # a signal during the last step changes nothing: the run is complete
                    say(f"stopped at step {step}; checkpoint {last_ckpt}; run the same command again to resume")
                break
    finally:
        bar.close()
        stop.restore()
        importance.remove_hooks()
        if sink is not None:
            sink.close()

    interrupted = step < tc.max_steps
    if not interrupted and not last_eval and heldout:
        last_eval = evaluate(model, root, heldout, eval_specs, d, fsdp, amp)
    if not interrupted and last_ckpt is None:
        last_ckpt = save()
    # from the whole run's metrics, so that a resumed (or finished and re-run) run reports all of its steps
    rows = read_metrics(out) if d.is_main else []
    final_loss, window = recent_mean(rows) if rows else (sum(recent) / max(len(recent), 1), len(recent))
    summary = {
        "run_dir": str(out), "step": step, "tokens": tokens, "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "final_loss": final_loss if window else float("nan"), "loss_window": window,
        "eval": last_eval, "interrupted": interrupted, "stopped_by": stop.signum, "checkpoint": str(last_ckpt) if last_ckpt else None,
        "params": model.num_params(), "active_params": cfg.model.num_params(active=True),
        "elastic": f"{ec.scheme}, p_full={ec.p_full}, ranges: {sampler.ranges}; layer policy {ec.layer_policy}, "
                   f"expert policy {ec.expert_policy}",
        "max_steps": tc.max_steps,
        "data": f"{cfg.data.path or 'Python standard-library sources (the embedded default)'}: "
                f"{data.train.num_tokens:,} train tokens, {data.heldout.num_tokens:,} held-out tokens; "
                + Corpus.stats_from_meta(data.train.meta).line().removeprefix("corpus: "),
        "batch": f"{tc.batch_size} sequences x {cfg.data.seq_len} tokens x {d.world_size} rank(s) x {tc.grad_accum} "
                 f"accumulation = {step_tokens:,} tokens per step; AdamW lr {cfg.optim.lr:g}, {cfg.optim.warmup_steps} "
                 f"warm-up steps, cosine to {cfg.optim.min_lr_ratio:g} x lr over {schedule_steps} steps",
    }
    if d.is_main and (rows or not interrupted):  # a stopped run gets its report so far; the same command resumes and rewrites it
        submodels = submodel_rows(model, eval_specs, cfg.data.seq_len, last_eval) if heldout and not interrupted else []
        summary["report"] = str(write_report(out, rows, summary, submodels))
        summary["submodels"] = submodels
        if not interrupted:
            say(f"done: {step} steps, {tokens:,} tokens in {elapsed:.0f} s; report {summary['report']}")
    return summary
