"""`elastic-moe rl`: the synchronous GRPO loop that trains one domain expert from an SFT checkpoint.

Each step: the step's prompts (a pure function of the step, so resume needs no sampler state) are sampled by the
rollout engine with the current weights, scored by the reward pool (or a given scorer), and one GRPO update is
made (`grpo_trainer.GRPOTrainer`); greedy test accuracy every `eval_every` steps.

RUN_DIR/ (same layout as pre-training): config.toml/json, tokenizer/, metrics.jsonl, tb/,
checkpoints/step_XXXXXXXX/ (model + trainer.pt: optimizer, step, RNG), report.md + curve.png at the end.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from elastic_moe.atomic import atomic_write_json, atomic_write_text, write_figure
from elastic_moe.checkpoint import TRAINER_STATE, load_policy, save_checkpoint, torch_state
from elastic_moe.errors import UserError, require, threads_check
from elastic_moe.grpo_trainer import GRPOConfig, GRPOTrainer, NumericsConfig, PoolScorer
from elastic_moe.model import ElasticMoE
from elastic_moe.rollout import (
    NonFiniteError,
    RolloutEngine,
    RolloutParams,
    all_finite,
    check_fit,
    evaluate_accuracy,
)
from elastic_moe.runloop import resume_or_seed, save_or_stop, stopped_note
from elastic_moe.schedule import epoch_slice, lr_at
from elastic_moe.spec import SubModelSpec
from elastic_moe.tasks import get_suite
from elastic_moe.tomlconfig import note_changed_settings
from elastic_moe.train import OptimConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "rl_reasoning.toml"


@dataclass
class RLTaskConfig:
    domain: str = "reasoning"  # reasoning | code | open_ended (single-turn domains)
    difficulty: int = 1
    train_size: int = 2000
    test_size: int = 200
    seed: int = 0
    families: list[str] = field(default_factory=list)  # only these task families (e.g. ["arith"]); empty: all


@dataclass
class RewardConfig:
    num_workers: int = 1
    queue_size: int = 256
    timeout_s: float = 10.0  # per verification; a verifier past it is killed and the reward is None
    backend: str = "process"  # process | ray


@dataclass
class RLLoopConfig:
    max_steps: int = 100
    prompts_per_step: int = 16  # x rollout.group_size samples per step
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: torch's default (on a busy machine 1 is often faster)
    eval_every: int = 25  # greedy test accuracy; 0: only before the first and after the last step
    eval_max_new_tokens: int = 0  # 0: rollout.max_new_tokens
    eval_batch_size: int = 64
    log_every: int = 1
    save_every: int = 25  # 0: only at the end and on SIGINT/SIGTERM
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # consecutive steps lost to non-finite values or failed rewards before the run stops
    progress: bool = True
    tensorboard: bool = True


@dataclass
class RLConfig:
    init: str = ""  # the SFT checkpoint (or run directory) to start from
    spec: SubModelSpec | None = None  # train (and roll out) this sub-model; None: the full model
    task: RLTaskConfig = field(default_factory=RLTaskConfig)
    rollout: RolloutParams = field(default_factory=RolloutParams)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, warmup_steps=5, min_lr_ratio=1.0,
                                                                   weight_decay=0.0))
    train: RLLoopConfig = field(default_factory=RLLoopConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> None:
        from elastic_moe.tasks import DIFFICULTIES

        t, r, lc = self.task, self.rollout, self.train
        self.grpo.validate()
        self.numerics.validate()
        checks = [
            (t.domain in ("reasoning", "code", "open_ended"),
             f"task.domain = {t.domain!r}: RL runs single-turn domains (reasoning, code, open_ended)"),
            (t.difficulty in DIFFICULTIES, f"task.difficulty must be one of {DIFFICULTIES}"),
            (t.train_size >= 1 and t.test_size >= 0, "task.train_size must be >= 1, test_size >= 0"),
            (r.group_size >= 2, "rollout.group_size must be >= 2 (advantages are relative to the group)"),
            (r.max_new_tokens >= 1 and r.batch_size >= 1, "rollout.max_new_tokens and batch_size must be >= 1"),
            (r.temperature > 0 and 0 < r.top_p <= 1, "rollout.temperature must be > 0 and top_p in (0, 1]"),
            (r.return_routes or not self.grpo.r3,
             "grpo.r3 replays the rollout's routes: it needs rollout.return_routes = true"),
            (lc.max_steps >= 0 and lc.prompts_per_step >= 1, "train.max_steps >= 0, prompts_per_step >= 1"),
            (lc.eval_every >= 0 and lc.save_every >= 0 and lc.log_every >= 1 and lc.keep_checkpoints >= 1,
             "train: eval_every/save_every >= 0, log_every/keep_checkpoints >= 1"),
            threads_check(lc.threads, "train.threads"),
            (lc.max_bad_steps >= 0, f"train.max_bad_steps = {lc.max_bad_steps} must be >= 0"),
            (self.reward.backend in ("process", "ray"), "reward.backend must be process or ray"),
            (self.reward.num_workers >= 1 and self.reward.queue_size >= 1 and self.reward.timeout_s > 0,
             "reward: num_workers and queue_size >= 1, timeout_s > 0"),
            (lc.eval_batch_size >= 1 and lc.eval_max_new_tokens >= 0,
             "train.eval_batch_size must be >= 1 and eval_max_new_tokens >= 0"),
        ]
        self.optim.validate()
        require(checks)

    def to_dict(self) -> dict:
        return asdict(self)


SEED_STRIDE = 2_147_483_647  # a prime above any run's step count: (seed, step) pairs give distinct rollout seeds


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of step `step` in a run seeded `seed` (a pure function of both, so resume repeats it). Seed 0
    gives the step itself, the rollout seed from before the run's seed took part: seed-0 runs sample as they did."""
    return step + seed * SEED_STRIDE


def prompt_indices(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """The task indices of step `step` (a pure function of the step: resume needs no sampler state)."""
    return epoch_slice(step, per_step, n, f"rl/{seed}")


def rollout_step(engine, model, version: int, prompts: list, tasks: list, step: int, per_step: int, seed: int,
                 params, eos_id: int):
    """Step `step`'s on-policy batch: its prompts (`prompt_indices`) sampled with the model's current weights;
    returns (RolloutBatch, the task of every sample)."""
    idx = prompt_indices(step, per_step, len(tasks), seed)
    engine.load_weights(model.state_dict(), version)
    batch = engine.rollout([prompts[i] for i in idx], params, seed=rollout_seed(seed, step), eos_id=eos_id)
    return batch, [tasks[idx[s.group]] for s in batch.samples]


def train_rl(cfg: RLConfig, out_dir: str | Path, log: Callable[[str], None] | None = None,
             scorer=None) -> dict:
    """Train (or resume) the GRPO run in `out_dir`; returns a summary. `scorer` (FunctionScorer-like) replaces the
    reward pool for the training reward; test accuracy is then verified in-process with the task verifiers."""
    from elastic_moe.atomic import run_lock

    with run_lock(out_dir):
        return _train_rl(cfg, out_dir, log, scorer)


def _train_rl(cfg: RLConfig, out_dir: str | Path, log: Callable[[str], None] | None = None,
              scorer=None) -> dict:
    from elastic_moe.metrics import MetricsSink, read_metrics
    from elastic_moe.reward_pool import RewardPool
    from elastic_moe.runloop import StopSignal, latest_checkpoint, prune_checkpoints, resuming_from, rng_state
    from elastic_moe.train import dump_toml

    cfg.validate()
    say = log or tqdm.write
    out = Path(out_dir)
    lc = cfg.train
    if lc.threads:
        torch.set_num_threads(lc.threads)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        with resuming_from(ckpt):
            model, tok, _ = load_policy(ckpt)
        state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    else:
        if not cfg.init:
            raise UserError("no init checkpoint: set init = \"RUN_DIR_OF_SFT\" in the config or pass --init")
        model, tok, _ = load_policy(cfg.init)
        state = None
    t = cfg.task
    train_tasks = get_suite(t.domain, "train", t.train_size, t.seed, t.difficulty, families=t.families)
    test_tasks = get_suite(t.domain, "test", t.test_size, t.seed, t.difficulty, families=t.families)
    prompts = [tok.encode_chat(t.messages, add_generation_prompt=True) for t in train_tasks]
    eval_tokens = lc.eval_max_new_tokens or cfg.rollout.max_new_tokens
    context = model.cfg.max_position_embeddings
    check_fit(prompts, cfg.rollout.max_new_tokens, context, "rollout.max_new_tokens")
    check_fit([tok.encode_chat(t.messages, add_generation_prompt=True) for t in test_tasks], eval_tokens, context,
              "train.eval_max_new_tokens" if lc.eval_max_new_tokens else "rollout.max_new_tokens")

    model.set_numerics(cfg.numerics.trainer())
    ref = None
    if cfg.grpo.kl_coef > 0:
        ref, _, _ = load_policy(cfg.init) if cfg.init else (None, None, None)
        if ref is None:
            raise UserError("grpo.kl_coef > 0 needs the init checkpoint as the reference policy")
        ref.set_numerics(cfg.numerics.trainer())
        ref.requires_grad_(False)
    optimizer = make_rl_optimizer(model, cfg.optim)
    o = cfg.optim
    schedule = o.schedule_steps or max(lc.max_steps, 1)
    trainer = GRPOTrainer(model, optimizer, cfg.grpo, cfg.rollout.temperature, cfg.spec, ref, tok.pad_id,
                          o.grad_clip, lambda v: lr_at(v, o.lr, o.warmup_steps, schedule, o.min_lr_ratio))
    engine = RolloutEngine(model, cfg.numerics.rollout(), cfg.spec)
    step, elapsed, samples_total = 0, 0.0, 0
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        step, elapsed, samples_total = state["step"], state["elapsed_s"], state["samples"]
    resume_or_seed(state, out, ckpt, lc.max_steps, lc.seed, say)
    # the run's settings are written once they have been found usable (tasks, spec, reference model): a refused
    # run leaves no config.toml that a plain re-run would pick up
    out.mkdir(parents=True, exist_ok=True)
    note_changed_settings(out, cfg.to_dict(), say)
    atomic_write_json(out / "config.json", _jsonable(cfg.to_dict()))
    atomic_write_text(out / "config.toml", dump_toml(_jsonable(cfg.to_dict())))
    tok.save_if_missing(out / "tokenizer")

    own_scorer = scorer is None
    if own_scorer:
        rc = cfg.reward
        scorer = PoolScorer(RewardPool(rc.num_workers, rc.queue_size, rc.timeout_s, rc.backend))

    def save(tag: str = "") -> Path:
        path = out / "checkpoints" / f"step_{step:08d}"
        extra_state = {"trainer": trainer.state_dict(), "rng": rng_state(), "step": step, "elapsed_s": elapsed,
                       "samples": samples_total}
        save_checkpoint(path, model, meta={"step": step, "stage": "rl", "domain": cfg.task.domain, "note": tag},
                        tokenizer_dir=out / "tokenizer", extra={TRAINER_STATE: torch_state(extra_state)})
        prune_checkpoints(out, lc.keep_checkpoints)
        return path

    def evaluate() -> dict[str, float]:
        if not test_tasks:
            return {}
        # test accuracy is always the task verifier's (a custom training reward may be shaped differently)
        res = evaluate_accuracy(model, tok, test_tasks, eval_tokens, lc.eval_batch_size, cfg.spec,
                                scorer if own_scorer else None)
        return {"eval/accuracy": res["accuracy"], "eval/reward": res["reward"], "eval/n": res["n"]}

    sink = MetricsSink(out, step, lc.tensorboard)
    stop = StopSignal()
    bar = tqdm(total=lc.max_steps, initial=step, unit="step", disable=not lc.progress, dynamic_ncols=True)
    bad, last_ckpt, stopped_reason, first_eval = 0, ckpt, None, {}
    try:
        if step == 0:
            first_eval = evaluate()
            sink.log({"step": 0, "samples": 0, **first_eval})
            if first_eval:
                say(f"step 0: test accuracy {first_eval['eval/accuracy']:.3f} on {first_eval['eval/n']:.0f} tasks")
        while step < lc.max_steps:
            t0 = time.perf_counter()
            row: dict = {"step": step + 1}
            idx = prompt_indices(step, lc.prompts_per_step, len(train_tasks), lc.seed)
            failure = None
            try:
                engine.load_weights(model.state_dict(), trainer.version)
                batch = engine.rollout([prompts[i] for i in idx], cfg.rollout, seed=rollout_seed(lc.seed, step),
                                       eos_id=tok.eos_id,
                                       decode=tok.decode if cfg.rollout.stop_strings else None)
            except NonFiniteError as e:
                failure, batch = f"rollout: {e}", None
            if batch is not None:
                row.update(batch.stats)
                texts = [tok.decode(s.tokens, skip_special_tokens=True) for s in batch.samples]
                t_r = time.perf_counter()
                rewards, correct, info = scorer.score([train_tasks[idx[s.group]] for s in batch.samples], texts)
                row.update(info)
                row["reward/time_s"] = time.perf_counter() - t_r
                row["train/accuracy"] = sum(correct) / max(len(correct), 1)
                m = trainer.step(batch, rewards)
                reason = m.pop("skip_reason", None)
                row.update(m)
                if m.get("nonfinite_skip"):
                    failure = f"trainer: {reason}"
                elif rewards and all(r is None for r in rewards):
                    failure = "reward: every verification failed (infrastructure)"
                samples_total += len(batch.samples)
            if failure is not None:
                bad += 1
                row["bad_steps"] = bad
                say(f"step {step + 1}: {failure} (update skipped; {bad} in a row)")
            else:
                bad = 0
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            row.update({"step_s": dt, "elapsed_s": elapsed, "samples": samples_total,
                        "samples_per_s": row.get("rollout/samples", 0) / dt})
            final = step == lc.max_steps
            if final or (lc.eval_every and step % lc.eval_every == 0):
                t_e = time.perf_counter()
                row.update(evaluate())
                elapsed += time.perf_counter() - t_e
                if "eval/accuracy" in row:
                    say(f"step {step}: test accuracy {row['eval/accuracy']:.3f}")
            if step % lc.log_every == 0 or final or "eval/accuracy" in row:
                sink.log(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row.get('reward/mean', float('nan')):.3f}",
                            k3=f"{row.get('mismatch/k3', float('nan')):.1e}", refresh=False)
            if bad > lc.max_bad_steps:
                stopped_reason = f"{bad} bad steps in a row, the last: {failure}"
                if all_finite(model):
                    last_ckpt = save("stopped")
                break
            last_ckpt, stopping = save_or_stop(step, lc.max_steps, lc.save_every, stop, save, last_ckpt, say)
            if stopping:
                break
    finally:
        bar.close()
        stop.restore()
        sink.close()
        if own_scorer:  # unwinding from an error or a second Ctrl-C: queued verifications are dropped, not run
            scorer.close(wait=sys.exc_info()[0] is None)
    if stopped_reason:
        raise UserError(f"stopped: {stopped_reason}; last checkpoint: {last_ckpt}")
    rows = read_metrics(out)
    summary = {"run_dir": str(out), "step": step, "elapsed_s": elapsed, "samples": samples_total,
               "interrupted": step < lc.max_steps, "stopped_by": stop.signum, "checkpoint": str(last_ckpt) if last_ckpt else None,
               "eval": {k: r[k] for r in rows for k in r if k.startswith("eval/")},
               "updated_steps": trainer.version}
    if rows or not summary["interrupted"]:  # a stopped run gets its report so far; the same command resumes and rewrites it
        stopped = (step, lc.max_steps) if summary["interrupted"] else None
        summary["report"] = str(write_rl_report(out, rows, cfg, trainer.version, stopped))
    if not summary["interrupted"]:
        say(f"done: {step} steps ({trainer.version} updated the model), {samples_total} samples in {elapsed:.0f} s; "
            f"report {summary['report']}")
        if step and not trainer.version:
            say(f"warning: {NO_UPDATE}")
    return summary


def make_rl_optimizer(model: ElasticMoE, o) -> torch.optim.AdamW:
    from elastic_moe.train import make_optimizer

    return make_optimizer(model, o, next(model.parameters()).device)


def _jsonable(v):
    return json.loads(json.dumps(v))


NO_UPDATE = ("no step updated the model: in every step each group's samples got equal rewards (nothing to learn "
             "from) or the update was skipped; the checkpoint is the init's weights. Try more samples per group, a "
             "higher temperature or easier tasks")


def write_rl_report(out: Path, rows: list[dict], cfg: RLConfig, updated_steps: int | None = None,
                    stopped: tuple[int, int] | None = None) -> Path:
    """RUN_DIR/report.md and curve.png: training reward, test accuracy and engine mismatch against steps."""
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    train = [(r["step"], r["reward/mean"]) for r in rows if isinstance(r.get("reward/mean"), float)
             and math.isfinite(r["reward/mean"])]
    k3 = [(r["step"], r["mismatch/k3"]) for r in rows if "mismatch/k3" in r]

    def draw(ax) -> None:
        if train:
            ax[0].plot(*zip(*train), color="0.6", lw=0.8, label="train reward (mean)")
        if evals:
            ax[0].plot(*zip(*evals), marker="o", ms=3, color="C0", label="test accuracy (greedy)")
        ax[0].set_xlabel("step")
        ax[0].legend(fontsize=8)
        if k3:
            ax[1].semilogy(*zip(*k3), color="C3", lw=1)
        else:  # measured on trained samples only
            ax[1].text(0.5, 0.5, "not measured: no step trained on any sample", ha="center", va="center",
                       transform=ax[1].transAxes, fontsize=9, color="0.4")
        ax[1].set_title("engine mismatch K3 KL(rollout||trainer)", fontsize=9)
        ax[1].set_xlabel("step")

    has_plot = write_figure(out / "curve.png", draw, 2, (10, 3.8))
    last = stopped[0] if stopped is not None else rows[-1]["step"] if rows else 0  # log_every may skip the last
    lines = ["# GRPO report", "", f"- run: `{out}`", f"- domain: {cfg.task.domain} (difficulty {cfg.task.difficulty})",
             f"- steps: {last}, group size {cfg.rollout.group_size}, "
             f"{cfg.train.prompts_per_step} prompts per step, R3 {'on' if cfg.grpo.r3 else 'off'}, numerics "
             f"{cfg.numerics.mode} (trainer {cfg.numerics.trainer()}, rollout {cfg.numerics.rollout()})"]
    if updated_steps is not None and last > 0:
        lines.append(f"- steps that updated the model: {updated_steps} of {last}"
                     + (f" (**{NO_UPDATE}**)" if not updated_steps else ""))
    if evals:
        lines.append(f"- test accuracy: {evals[0][1]:.3f} at step {evals[0][0]} -> {evals[-1][1]:.3f} at step "
                     f"{evals[-1][0]}")
    if k3:
        lines.append(f"- mean engine mismatch K3: {sum(v for _, v in k3) / len(k3):.3g}")
    if stopped is not None:
        lines += ["", stopped_note(*stopped)]
    if has_plot:
        lines += ["", "![curves](curve.png)"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
