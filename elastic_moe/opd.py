"""Multi-teacher on-policy distillation (OPD): post-training stage 3.

The student samples responses with the rollout engine; each sample is graded token by token by the teacher of its
prompt's domain (a domain expert from stage 2, or the fallback teacher), and the student moves towards it:

    teachers = load_teachers({"reasoning": "runs/expert_reasoning", ...}, fallback="runs/sft", student_dir=...)
    trainer = OPDTrainer(student, teachers, OPDLossConfig(kind="full"), optimizer, pad_id=tok.pad_id)
    stats = trainer.step(samples, domains)              # one optimizer step on rollout samples

Loss kinds (all estimate the per-token reverse KL(student || teacher) at the states the student's own samples visit;
the gradient treats those states as given, as GKD and on-policy distillation do, not the sequence-level KL's):
    full     exact full-vocabulary KL per response token, chunked (rl.kl.chunked_reverse_kl): [chunk, V] at most
    sampled  log pi_s(y) - log pi_t(y) of the sampled token, negated, used as a per-token advantage in the PPO loss
    topk     the student's top-k tokens plus one tail bucket (rl.kl.topk_tail_reverse_kl), chunked
`reward_coef` > 0 mixes in the task reward: its group-relative advantage through the PPO loss.
Both distributions are taken at the sampling temperature T (logits / T), so the student's log-probs are those it
sampled with and the loss stays on-policy at any T; `mismatch/k3` logs how far they are from the rollout's.

A teacher is refused (one-line UserError) when its tokenizer, chat template or end-of-sequence token differs from
the student's: per-token KL between two vocabularies that do not mean the same thing is noise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from elastic_moe.errors import UserError
from elastic_moe.model import ElasticMoE
from elastic_moe.rl.grpo import group_advantages, grpo_loss
from elastic_moe.rl.kl import aggregate, chunked_reverse_kl_and_logp, masked_mean, topk_tail_reverse_kl
from elastic_moe.rl.mismatch import mismatch_metrics

LOSS_KINDS = ("full", "sampled", "topk")


@dataclass
class OPDLossConfig:
    kind: str = "full"  # full | sampled | topk
    chunk_size: int = 1024  # rows of [chunk, V] logits at a time (full, topk)
    topk: int = 32  # topk: buckets = the student's top-k tokens + 1 tail
    reward_coef: float = 0.0  # > 0: add coef * (task-reward group advantage) through the PPO loss
    clip_low: float = 0.2  # PPO clip for the sampled kind and the reward term
    clip_high: float = 0.28

    def validate(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise UserError(f"opd.loss.kind = {self.kind!r}: expected one of {', '.join(LOSS_KINDS)}")
        if self.chunk_size < 1 or self.topk < 1 or self.reward_coef < 0:
            raise UserError("opd.loss: chunk_size and topk must be >= 1, reward_coef >= 0")


# ----------------------------------------------------------------------------------------- teacher checks


@dataclass(frozen=True)
class TokenizerIdentity:
    """What must agree between a teacher and its student for per-token distillation to make sense."""

    fingerprint: str  # sha256 of tokenizer.json
    chat_template: str
    eos_id: int
    vocab_rows: int  # the model's LM head rows

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> TokenizerIdentity:
        from elastic_moe.checkpoint import find_checkpoint, read_meta
        from elastic_moe.tokenizer import Tokenizer

        ckpt = find_checkpoint(path)
        tok_dir = ckpt / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            raise UserError(f"checkpoint {ckpt} has no tokenizer/: cannot check it against the student")
        tok = Tokenizer.load(tok_dir)
        conf = tok_dir / "tokenizer_config.json"
        template = json.loads(conf.read_text()).get("chat_template", "") if conf.is_file() else ""
        return cls(tok.fingerprint(), template, tok.eos_id, int(read_meta(ckpt)["model"]["vocab_size"]))


def check_compatible(student: TokenizerIdentity, teacher: TokenizerIdentity, name: str) -> None:
    """Raise a one-line UserError naming the first thing the teacher `name` does not share with the student."""
    if teacher.fingerprint != student.fingerprint:
        raise UserError(f"teacher {name}: tokenizer differs from the student's "
                        f"({teacher.fingerprint[:12]} vs {student.fingerprint[:12]})")
    if teacher.chat_template != student.chat_template:
        raise UserError(f"teacher {name}: chat template differs from the student's")
    if teacher.eos_id != student.eos_id:
        raise UserError(f"teacher {name}: end-of-sequence token {teacher.eos_id} differs from the student's "
                        f"{student.eos_id}")
    if teacher.vocab_rows != student.vocab_rows:
        raise UserError(f"teacher {name}: vocabulary of {teacher.vocab_rows} rows, the student has "
                        f"{student.vocab_rows}")


@dataclass
class Teachers:
    """Frozen teacher models by name, and which one grades each domain."""

    models: dict[str, ElasticMoE]
    by_domain: dict[str, str]  # domain -> name in models
    fallback: str | None = None  # name in models for any other domain

    def teacher_of(self, domain: str) -> str:
        name = self.by_domain.get(domain, self.fallback)
        if name is None:
            raise UserError(f"no teacher for domain {domain!r} and no fallback teacher")
        return name

    def route(self, domains: Sequence[str]) -> list[str]:
        return [self.teacher_of(d) for d in domains]


def load_teachers(by_domain: dict[str, str], fallback: str = "", student_dir: str | Path | None = None) -> Teachers:
    """Teachers from checkpoints (domain -> checkpoint or run directory; the fallback for other domains). The same
    path serves several domains with one model. With `student_dir`, each is checked against the student first."""
    from elastic_moe.checkpoint import load_checkpoint

    student = TokenizerIdentity.of_checkpoint(student_dir) if student_dir is not None else None
    paths = {str(p) for p in by_domain.values()} | ({str(fallback)} if fallback else set())
    models = {}
    for p in sorted(paths):
        if student is not None:
            check_compatible(student, TokenizerIdentity.of_checkpoint(p), p)
        model, _ = load_checkpoint(p, "cpu")
        models[p] = model.eval().requires_grad_(False)
    return Teachers(models, {d: str(p) for d, p in by_domain.items()}, str(fallback) if fallback else None)


# -------------------------------------------------------------------------------------------------- loss


def response_hidden(model: ElasticMoE, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict each response token.

    Each prompt + response is one right-padded row (causal attention: padding after a token never reaches it).
    Returns hidden [B, R, H] (grad follows the model's), response ids [B, R] and mask [B, R]; R = `width` when
    given (>= the longest response), else the longest response."""
    B = len(prompts)
    R = width or max(max((len(r) for r in responses), default=0), 1)
    S = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.bool)
    pos = torch.zeros(B, R, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        resp[b, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[b, :len(r)] = True
        pos[b] = len(p) - 1 + torch.arange(R).clamp(max=max(len(r) - 1, 0))
    dev = next(model.parameters()).device
    hidden = model(ids.to(dev), return_logits=False, track_load=False).hidden
    h_BRH = hidden.gather(1, pos.to(dev)[:, :, None].expand(-1, -1, hidden.shape[-1]))
    return h_BRH, resp.to(dev), mask.to(dev)


def _head(model: ElasticMoE) -> torch.Tensor:
    if model.lm_head is not None and model.lm_head.bias is not None:
        raise UserError("OPD needs an LM head without bias (logits = hidden @ head.T)")
    return model.head_weight()


def _chunked_logits(h_NH: torch.Tensor, W_VH: torch.Tensor, chunk: int):
    for i in range(0, h_NH.shape[0], chunk):
        yield i, (h_NH[i:i + chunk] @ W_VH.T).float()


def token_logp(h_NH: torch.Tensor, W_VH: torch.Tensor, ids_N: torch.Tensor, chunk: int) -> torch.Tensor:
    """log softmax(h @ W.T)[ids] per row, [chunk, V] logits at a time in the forward pass."""
    out = [torch.log_softmax(z, -1).gather(1, ids_N[i:i + z.shape[0], None])[:, 0]
           for i, z in _chunked_logits(h_NH, W_VH, chunk)]
    return torch.cat(out) if out else h_NH.new_zeros(0, dtype=torch.float32)


def opd_loss(student: ElasticMoE, teachers: Teachers, prompts: Sequence[Sequence[int]],
             responses: Sequence[Sequence[int]], domains: Sequence[str], cfg: OPDLossConfig, pad_id: int,
             advantages_B: torch.Tensor | None = None, temperature: float = 1.0,
             rollout_logp: Sequence[Sequence[float]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation loss of the student on its own samples, each graded by its domain's teacher.

    advantages_B: task-reward advantages per sample, mixed in with weight cfg.reward_coef (None: pure OPD).
    temperature: the one the samples were drawn at; both student and teacher logits are divided by it.
    rollout_logp: the rollout's log-prob of each response token (adds the mismatch/* stats against the student's).
    Returns (scalar loss, stats): kl (exact or bucketed reverse KL per token, or the sampled estimate), n_tokens,
    and kl/<domain> per domain of the batch. The token-mean over all response tokens of the batch."""
    h_s, resp, mask = response_hidden(student, prompts, responses, pad_id)
    W_s = _head(student) / temperature  # logits / T = h @ (W / T).T, for every loss kind at once
    names = teachers.route(domains)
    kl_BT = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    logp_s_BT = torch.zeros_like(kl_BT)
    logp_t_BT = torch.zeros_like(kl_BT)
    grad_logp = cfg.kind == "sampled" or (cfg.reward_coef > 0 and advantages_B is not None)  # in the loss
    need_logp = grad_logp or rollout_logp is not None  # else only for the mismatch stats: no graph
    stats: dict[str, float] = {}
    for name in sorted(set(names)):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=mask.device)
        teacher = teachers.models[name]
        with torch.no_grad():
            h_t, _, _ = response_hidden(teacher, [prompts[i] for i in rows.tolist()],
                                        [responses[i] for i in rows.tolist()], pad_id, mask.shape[1])
        m = mask[rows]
        hs_NH, ht_NH, ids_N = h_s[rows][m], h_t[m], resp[rows][m]
        W_t = _head(teacher) / temperature
        sel = torch.zeros_like(mask)
        sel[rows] = m
        logp_s_N = None  # the student's log-probs of the sampled tokens, when the KL pass yields them
        if cfg.kind == "full":
            kl_N, logp_s_N = chunked_reverse_kl_and_logp(hs_NH, W_s, ht_NH, W_t, ids_N if need_logp else None,
                                                         cfg.chunk_size)
            kl_BT = kl_BT.masked_scatter(sel, kl_N)
        elif cfg.kind == "topk":
            k = min(cfg.topk, W_s.shape[0])
            parts, logp_parts = [], []
            for i, z in _chunked_logits(hs_NH, W_s, cfg.chunk_size):
                parts.append(topk_tail_reverse_kl(z, (ht_NH[i:i + z.shape[0]] @ W_t.T).float(), k))
                if need_logp:
                    logp_parts.append(torch.log_softmax(z.detach(), -1).gather(1, ids_N[i:i + z.shape[0], None])[:, 0])
            kl_BT = kl_BT.masked_scatter(sel, torch.cat(parts))
            logp_s_N = torch.cat(logp_parts) if logp_parts else None
        if grad_logp and torch.is_grad_enabled():  # in the loss: a pass of its own, with a graph
            logp_s_N = token_logp(hs_NH, W_s, ids_N, cfg.chunk_size)
        elif need_logp and logp_s_N is None:
            with torch.no_grad():
                logp_s_N = token_logp(hs_NH, W_s, ids_N, cfg.chunk_size)
        if logp_s_N is not None:
            logp_s_BT = logp_s_BT.masked_scatter(sel, logp_s_N)
        if cfg.kind == "sampled":
            with torch.no_grad():
                logp_t_BT = logp_t_BT.masked_scatter(sel, token_logp(ht_NH, W_t, ids_N, cfg.chunk_size))
    per_token = (logp_s_BT - logp_t_BT).detach() if cfg.kind == "sampled" else kl_BT.detach()
    for d in sorted(set(domains)):  # per domain, not per teacher: experts' checkpoint folders share names
        of_d = torch.tensor([x == d for x in domains], device=mask.device)[:, None] & mask
        stats[f"kl/{d}"] = float(masked_mean(per_token, of_d))
    if cfg.kind == "sampled":
        adv_BT = -(logp_s_BT - logp_t_BT).detach()
        if cfg.reward_coef > 0 and advantages_B is not None:
            adv_BT = adv_BT + cfg.reward_coef * advantages_B.to(adv_BT)[:, None]
        loss, st = grpo_loss(logp_s_BT, adv_BT, mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        stats["kl"] = float(masked_mean((logp_s_BT - logp_t_BT).detach(), mask))
    else:
        loss = aggregate(kl_BT, mask)
        stats["kl"] = float(loss.detach())
        if cfg.reward_coef > 0 and advantages_B is not None:
            pg, _ = grpo_loss(logp_s_BT, advantages_B.to(logp_s_BT), mask, clip_low=cfg.clip_low,
                              clip_high=cfg.clip_high)
            loss = loss + cfg.reward_coef * pg
    if rollout_logp is not None:
        q_BT = torch.zeros_like(logp_s_BT)
        for b, lp in enumerate(rollout_logp):
            q_BT[b, :len(lp)] = torch.tensor(list(lp), dtype=torch.float32)
        mm = mismatch_metrics(q_BT, logp_s_BT.detach(), mask)
        stats.update({f"mismatch/{k}": v for k, v in mm.items() if k in ("k3", "max_abs_dlogp")})
    stats["n_tokens"] = float(mask.sum())
    return loss, stats


# ------------------------------------------------------------------------------------------------ trainer


class OPDTrainer:
    """One optimizer step of on-policy distillation on rollout samples (rollout.Sample: prompt, tokens)."""

    def __init__(self, student: ElasticMoE, teachers: Teachers, cfg: OPDLossConfig, optimizer: torch.optim.Optimizer,
                 pad_id: int, grad_clip: float = 1.0, group_size: int = 1, temperature: float = 1.0):
        cfg.validate()
        if any(m.cfg.vocab_size != student.cfg.vocab_size for m in teachers.models.values()):
            raise UserError("a teacher's vocabulary size differs from the student's")
        self.student, self.teachers, self.cfg, self.optimizer = student, teachers, cfg, optimizer
        self.pad_id, self.grad_clip, self.group_size, self.temperature = pad_id, grad_clip, group_size, temperature
        self.version = 0

    def step(self, samples: Sequence, domains: Sequence[str], rewards: Sequence[float | None] | None = None
             ) -> dict[str, float]:
        """rewards (with loss.reward_coef > 0): per sample, group-major; a None (the verifier failed) gives its whole
        group no reward term, rather than scoring it 0."""
        t0 = time.perf_counter()
        adv = None
        if rewards is not None and self.cfg.reward_coef > 0:
            r = torch.tensor([math.nan if x is None else x for x in rewards], dtype=torch.float32)
            failed = r.isnan().view(-1, self.group_size).any(-1).repeat_interleave(self.group_size)
            adv = group_advantages(r.nan_to_num(0.0), self.group_size).masked_fill(failed, 0.0)
        self.student.train()
        loss, stats = opd_loss(self.student, self.teachers, [s.prompt for s in samples], [s.tokens for s in samples],
                               domains, self.cfg, self.pad_id, adv, self.temperature, [s.logprobs for s in samples])
        ok = bool(torch.isfinite(loss))
        gn = math.nan
        if ok:
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip or math.inf))
            ok = math.isfinite(gn)
        if ok:
            self.optimizer.step()
            self.version += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {**stats, "loss": float(loss.detach()), "grad_norm": gn, "skipped": float(not ok),
                "samples": float(len(samples)), "train/time_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------- stage config


@dataclass
class OPDStageConfig:
    """Stage 3 of `elastic-moe posttrain`: teachers come from stage 2 (domain -> expert), the fallback is the SFT
    model unless `fallback` names a checkpoint."""

    loss: OPDLossConfig = field(default_factory=OPDLossConfig)
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 2  # samples per prompt (>= 2 when loss.reward_coef > 0)
    max_new_tokens: int = 48
    temperature: float = 1.0
    lr: float = 1e-4
    grad_clip: float = 1.0
    fallback: str = ""
    seed: int = 0
    save_every: int = 5  # steps between resumable checkpoints (0: only at the end)

    def validate(self) -> None:
        self.loss.validate()
        if self.steps < 0 or self.prompts_per_step < 1 or self.group_size < 1 or self.max_new_tokens < 1:
            raise UserError("opd: steps >= 0, prompts_per_step, group_size and max_new_tokens >= 1")
        if self.lr <= 0 or self.temperature <= 0 or self.grad_clip < 0:
            raise UserError("opd: lr and temperature must be > 0, grad_clip >= 0")
        if self.loss.reward_coef > 0 and self.group_size < 2:
            raise UserError("opd.loss.reward_coef > 0 needs group_size >= 2 (group-relative advantages)")

    def to_dict(self) -> dict:
        return asdict(self)


def train_opd(cfg: OPDStageConfig, student_ckpt: str | Path, teachers_by_domain: dict[str, str], tasks: list,
              out_dir: str | Path, fallback: str = "", log=print) -> Path:
    """Distil the teachers into the student on `tasks` (mixed domains; each prompt's domain picks its teacher).
    Writes out_dir/metrics.jsonl, report.md + curve.png and the final checkpoint out_dir/checkpoints/step_XXXXXXXX;
    returns its path."""
    from elastic_moe.checkpoint import find_checkpoint, load_optimizer_state, load_policy
    from elastic_moe.metrics import MetricsSink, write_curve_report
    from elastic_moe.rl_train import rollout_seed, rollout_step
    from elastic_moe.rollout import RolloutEngine, RolloutParams, check_fit
    from elastic_moe.tasks import verify

    cfg.validate()
    out = Path(out_dir)
    ckpt, state = resume_point(out, student_ckpt)
    student, tok, _ = load_policy(ckpt)
    teachers = load_teachers(teachers_by_domain, cfg.fallback or fallback, student_dir=student_ckpt)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    trainer = OPDTrainer(student, teachers, cfg.loss, optimizer, tok.pad_id, cfg.grad_clip, cfg.group_size,
                         cfg.temperature)
    start = 0
    if state is not None:
        load_optimizer_state(optimizer, state["optimizer"])
        start, trainer.version = state["step"], state["version"]
        log(f"opd: resuming {out} from step {start}")
        if start > cfg.steps:
            log(f"opd: {out} is already at step {start}, past steps = {cfg.steps}: nothing to train")

    def save(step: int) -> Path:
        st = {"optimizer": optimizer.state_dict(), "step": step, "version": trainer.version}
        return save_stage_checkpoint(out, step, student, tok, st,
                                     {"stage": "opd", "init": str(find_checkpoint(student_ckpt)),
                                      "teachers": teachers_by_domain})

    engine = RolloutEngine(student)
    params = RolloutParams(group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, return_routes=False)
    prompts = [tok.encode_chat(t.messages, add_generation_prompt=True) for t in tasks]
    check_fit(prompts, cfg.max_new_tokens, student.cfg.max_position_embeddings, "opd.max_new_tokens")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(rollout_seed(cfg.seed, start))
    sink = MetricsSink(out, start, False)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch, picked = rollout_step(engine, student, trainer.version, prompts, tasks, step, cfg.prompts_per_step,
                                         cfg.seed, params, tok.eos_id)
            rewards = None
            if cfg.loss.reward_coef > 0:
                texts = [tok.decode(s.tokens, skip_special_tokens=True) for s in batch.samples]
                rewards = [verify(t, x).reward for t, x in zip(picked, texts)]
            m = trainer.step(batch.samples, [t.domain for t in picked], rewards)
            m.update({"step": step + 1, "step_s": time.perf_counter() - t0, **batch.stats})
            sink.log(m)
            if (step + 1) % 5 == 0 or step + 1 == cfg.steps:
                log(f"opd step {step + 1}/{cfg.steps}: reverse KL {m['kl']:.4f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
    finally:
        sink.close()
    final = ckpt if start > cfg.steps else save(cfg.steps)  # a save labelled cfg.steps would be pruned at once
    domains = sorted({t.domain for t in tasks})
    teachers_of = ", ".join(f"{d} <- `{teachers.teacher_of(d)}`" for d in domains)
    write_curve_report(out, "On-policy distillation report", [
        f"student: `{student_ckpt}`", f"teachers by domain: {teachers_of}",
        f"loss: {cfg.loss.kind} reverse KL, {cfg.prompts_per_step} prompts x {cfg.group_size} samples per step, "
        f"lr {cfg.lr:g}", f"final checkpoint: `{final}`"],
        [("reverse KL(student || teacher) per token", [("kl", "KL, all domains"), *[(f"kl/{d}", f"KL, {d}") for d in domains]]),
         ("student samples", [("rollout/response_len", "response length (tokens)")]),
         ("student log-probs: loss vs rollout", [("mismatch/k3", "K3 KL(rollout || loss)")])])
    return final


# ------------------------------------------------------------------------------------------- stage resume

LOOP_STATE = "trainer.pt"


def resume_point(out: Path, init: str | Path) -> tuple[Path, dict | None]:
    """Where a stage loop starts: its own latest checkpoint and saved loop state, or `init` and None."""
    from elastic_moe.checkpoint import verify
    from elastic_moe.runloop import latest_checkpoint, resuming_from

    ckpt = latest_checkpoint(out)
    if ckpt is not None and (ckpt / LOOP_STATE).is_file():
        with resuming_from(ckpt):
            verify(ckpt)  # a damaged loop state is named in one line, not by torch.load's traceback
        return ckpt, torch.load(ckpt / LOOP_STATE, map_location="cpu", weights_only=True)
    return Path(init), None


def save_stage_checkpoint(out: Path, step: int, model: ElasticMoE, tok, state: dict, meta: dict) -> Path:
    """out/checkpoints/step_XXXXXXXX with the loop state (optimizer, step); older ones pruned. The tokenizer is
    copied from out/tokenizer (written on the first save), never from the checkpoint the stage resumed from, which
    this pruning removes."""
    from elastic_moe.checkpoint import save_checkpoint, torch_state
    from elastic_moe.runloop import prune_checkpoints

    tok_dir = out / "tokenizer"
    tok.save_if_missing(tok_dir)
    path = save_checkpoint(out / "checkpoints" / f"step_{step:08d}", model, meta={"step": step, **meta},
                           tokenizer_dir=tok_dir, extra={LOOP_STATE: torch_state(state)})
    prune_checkpoints(out, 1)
    return path
