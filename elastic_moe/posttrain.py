"""The four-stage post-training pipeline (`elastic-moe posttrain PIPELINE.toml --out DIR`): its config and stages
(lineage in lineage.py, evaluation and report in posttrain_report.py).

    stage 1  sft          SFT on mixed demonstrations of every domain                 (sft.train_sft)
    stage 2  expert_<d>   one GRPO expert per domain from the SFT model, in parallel  (rl_train.train_rl)
                          processes when `experts_parallel` > 1
    stage 3  opd          multi-teacher on-policy distillation into the SFT model     (opd.train_opd)
    stage 4  general      GRPO on open-ended prompts with a diversity-aware reward    (run_grpo)
    baselines             mixed multi-task GRPO (all domains in one run, the rollout samples of stages 2 + 3)
                          and the weight average of the experts

DIR/<stage>/ holds each stage's run (metrics.jsonl, and report.md + a figure for every stage that trains);
DIR/<stage>/STAGE.json is written when the stage is complete and makes a second run skip it; an interrupted stage
resumes from its own latest checkpoint (every `save_every` steps). DIR/lineage.json records, for every stage, the
checkpoints it read and wrote (paths and sha256), its config and the config's hash. DIR/report.md + report.png +
report.json: the domain x stage score table (score = 100 x mean task reward, greedy, on held-out tasks), each
domain's student/teacher retention after OPD, and diversity (distinct-n, self-BLEU, pass@k over sampled groups of
open-ended prompts) before and after stage 4.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from elastic_moe.atomic import atomic_write_json
from elastic_moe.errors import UserError, require, threads_check
from elastic_moe.grpo_trainer import GRPOConfig
from elastic_moe.lineage import checkpoint_record, run_stage, stage_done, stage_seconds
from elastic_moe.opd import OPDStageConfig
from elastic_moe.posttrain_report import evaluate_stages, summarize, write_report
from elastic_moe.rl_train import RLConfig
from elastic_moe.runloop import raise_if_stopped
from elastic_moe.sft import SFTConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "posttrain_tiny.toml"
RL_DOMAINS = ("reasoning", "code", "open_ended")  # single-turn domains (agent tasks need a multi-turn driver)


# ------------------------------------------------------------------------------------------------ config


@dataclass
class GRPOStageConfig:
    """A GRPO run driven here (stage 4 and the mixed baseline), with rewards computed per group."""

    steps: int = 20
    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    lr: float = 5e-5
    train_size: int = 256  # train-split tasks per domain
    diversity_weight: float = 0.0  # > 0: reward += weight * (1 - BLEU of the sample against the rest of its group)
    grpo: GRPOConfig = field(default_factory=lambda: GRPOConfig(r3=False, mask_truncated=False))
    seed: int = 0
    save_every: int = 5  # steps between resumable checkpoints (0: only at the end)

    def validate(self) -> None:
        if self.steps < 0 or self.prompts_per_step < 1 or self.group_size < 2 or self.max_new_tokens < 1:
            raise UserError("steps >= 0, prompts_per_step >= 1, group_size >= 2, max_new_tokens >= 1")
        if self.diversity_weight < 0 or self.lr <= 0 or self.temperature <= 0 or self.train_size < 1:
            raise UserError("diversity_weight must be >= 0, lr and temperature > 0, train_size >= 1")


@dataclass
class EvalConfig:
    n_per_domain: int = 32  # held-out (test-split) tasks per domain, greedy
    max_new_tokens: int = 48
    difficulty: int = 1
    seed: int = 1
    diversity_prompts: int = 8  # open-ended prompts for the diversity metrics
    diversity_samples: int = 8  # samples per prompt (pass@k up to this k)
    diversity_temperature: float = 1.0

    def validate(self) -> None:  # checked at load: these numbers are only used after every stage has trained
        if min(self.n_per_domain, self.max_new_tokens, self.difficulty, self.diversity_prompts) < 1:
            raise UserError("eval: n_per_domain, max_new_tokens, difficulty and diversity_prompts must be >= 1")
        if self.diversity_samples < 2 or self.diversity_temperature <= 0:
            raise UserError("eval: diversity_samples >= 2 (diversity compares samples) and diversity_temperature > 0")


@dataclass
class BaselineConfig:
    mixed_rl: bool = True  # all domains in one GRPO run, with the rollout samples of stages 2 + 3
    weight_average: bool = True  # the mean of the experts' weights


@dataclass
class PipelineConfig:
    init: str = ""  # the pre-trained checkpoint (or run directory)
    domains: list[str] = field(default_factory=lambda: list(RL_DOMAINS))
    threads: int = 1  # torch CPU threads per process
    experts_parallel: int = 1  # stage-2 experts trained at once, one process each
    sft: SFTConfig = field(default_factory=SFTConfig)
    expert: RLConfig = field(default_factory=RLConfig)  # template; task.domain and init are set per expert
    opd: OPDStageConfig = field(default_factory=OPDStageConfig)
    opd_train_size: int = 256  # train-split prompts per domain for OPD
    general: GRPOStageConfig = field(default_factory=lambda: GRPOStageConfig(lr=2e-4, diversity_weight=4.0))
    mixed: GRPOStageConfig = field(default_factory=GRPOStageConfig)  # baseline; steps matched to stages 2 + 3
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        bad = [d for d in self.domains if d not in RL_DOMAINS]
        if not self.domains or bad:
            raise UserError(f"domains: {bad or 'empty'} (post-training RL domains: {', '.join(RL_DOMAINS)})")
        twice = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if twice:
            raise UserError(f"domains: {', '.join(twice)} listed more than once")
        if "open_ended" not in self.domains:
            raise UserError("domains must include open_ended (stage 4 trains on it)")
        require([threads_check(self.threads, "threads"),
                 (self.experts_parallel >= 1, f"experts_parallel = {self.experts_parallel} must be >= 1")])
        if self.opd_train_size < 1:
            raise UserError(f"opd_train_size = {self.opd_train_size}: OPD needs at least one prompt per domain")
        if self.sft.train.max_steps < 1 or self.expert.train.max_steps < 1:
            raise UserError("sft.train.max_steps and expert.train.max_steps must be >= 1: each stage hands its trained "
                            "model to the next")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    from elastic_moe.tomlconfig import load_config

    return load_config(PipelineConfig, path or DEFAULT_CONFIG, overrides)


# ------------------------------------------------------------------------------------------ GRPO driver


def novelty(texts: list[str]) -> list[float]:
    """1 - BLEU of each text against the others of its group: 0 for a copy of another sample, ~1 when unlike all."""
    from elastic_moe.tasks.diversity import bleu, tokenize

    toks = [tokenize(t) for t in texts]
    if len(toks) < 2:
        return [0.0] * len(toks)
    return [1.0 - bleu(h, toks[:i] + toks[i + 1:]) for i, h in enumerate(toks)]


def run_grpo(init: str | Path, tasks: list, cfg: GRPOStageConfig, out_dir: str | Path,
             log: Callable[[str], None] = print, name: str = "general") -> Path:
    """GRPO from `init` on `tasks` (any single-turn domains mixed); rewards are the task verifier's, plus the
    diversity bonus when cfg.diversity_weight > 0. Logs the diversity metrics of every step's groups and writes
    out_dir/report.md + curve.png. Returns the final checkpoint. `name`: its config section, for error messages."""
    from elastic_moe.checkpoint import find_checkpoint, load_policy
    from elastic_moe.grpo_trainer import GRPOTrainer
    from elastic_moe.metrics import MetricsSink, write_curve_report
    from elastic_moe.opd import resume_point, save_stage_checkpoint
    from elastic_moe.rl_train import rollout_seed, rollout_step
    from elastic_moe.rollout import RolloutEngine, RolloutParams, check_fit
    from elastic_moe.tasks import verify
    from elastic_moe.tasks.diversity import group_metrics

    cfg.validate()
    out = Path(out_dir)
    ckpt, state = resume_point(out, init)
    model, tok, _ = load_policy(ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ref = load_policy(init)[0].requires_grad_(False) if cfg.grpo.kl_coef > 0 else None  # the stage's start, frozen
    trainer = GRPOTrainer(model, opt, cfg.grpo, cfg.temperature, ref_model=ref, pad_id=tok.pad_id)
    start = 0
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        start = state["step"]
        log(f"grpo: resuming {out} from step {start}")
        if start > cfg.steps:
            log(f"grpo: {out} is already at step {start}, past steps = {cfg.steps}: nothing to train")

    def save(step: int) -> Path:
        return save_stage_checkpoint(out, step, model, tok, {"trainer": trainer.state_dict(), "step": step},
                                     {"stage": "grpo", "init": str(find_checkpoint(init))})

    engine = RolloutEngine(model)
    params = RolloutParams(group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, return_routes=cfg.grpo.r3)
    prompts = [tok.encode_chat(t.messages, add_generation_prompt=True) for t in tasks]
    check_fit(prompts, cfg.max_new_tokens, model.cfg.max_position_embeddings, f"{name}.max_new_tokens")
    G = cfg.group_size
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(rollout_seed(cfg.seed, start))
    sink = MetricsSink(out, start, False)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            batch, picked = rollout_step(engine, model, trainer.version, prompts, tasks, step, cfg.prompts_per_step,
                                         cfg.seed, params, tok.eos_id)
            texts = [tok.decode(s.tokens, skip_special_tokens=True) for s in batch.samples]
            verdicts = [verify(t, x) for t, x in zip(picked, texts)]
            # None = the verifier failed (infrastructure): GRPOTrainer drops that group rather than scoring it 0
            rewards: list[float | None] = [v.reward for v in verdicts]
            base = [r for r in rewards if r is not None]
            div: dict[str, list[float]] = {}
            for g in range(0, len(texts), G):
                gm = group_metrics(texts[g:g + G], [v.correct for v in verdicts[g:g + G]], ks=(1, G))
                for k in ("distinct_1", "distinct_2", "self_bleu", f"pass@{G}"):
                    div.setdefault(k, []).append(gm[k])
                if cfg.diversity_weight > 0:
                    for j, nv in enumerate(novelty(texts[g:g + G])):
                        if rewards[g + j] is not None:
                            rewards[g + j] += cfg.diversity_weight * nv
            m = trainer.step(batch, rewards)
            m.pop("skip_reason", None)
            m.update({f"div/{k}": sum(v) / len(v) for k, v in div.items()})
            m.update({"step": step + 1, "task_reward/mean": sum(base) / max(len(base), 1),
                      "reward/infra_errors": len(rewards) - len(base),
                      "step_s": time.perf_counter() - t0, **batch.stats})
            sink.log(m)
            if (step + 1) % 5 == 0 or step + 1 == cfg.steps:
                log(f"grpo step {step + 1}/{cfg.steps}: task reward {m['task_reward/mean']:.3f}, "
                    f"distinct-2 {m.get('div/distinct_2', math.nan):.3f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
    finally:
        sink.close()
    final = ckpt if start > cfg.steps else save(cfg.steps)  # a save labelled cfg.steps would be pruned at once
    write_curve_report(out, "GRPO stage report", [
        f"init: `{init}`", f"tasks: {len(tasks)} ({', '.join(sorted({t.domain for t in tasks}))})",
        f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples per step, diversity bonus weight "
        f"{cfg.diversity_weight:g}, R3 {'on' if cfg.grpo.r3 else 'off'}", f"final checkpoint: `{final}`"],
        [("task reward", [("task_reward/mean", "task reward (mean)")]),
         ("diversity within groups", [("div/distinct_2", "distinct-2"), ("div/self_bleu", "self-BLEU")])])
    return final


def average_weights(paths: list[str | Path], out_dir: str | Path) -> Path:
    """The element-wise mean of the experts' weights (same architecture), saved with the first one's tokenizer."""
    from elastic_moe.checkpoint import load_checkpoint, save_checkpoint

    models = [load_checkpoint(p)[0] for p in paths]
    _, meta = load_checkpoint(paths[0])
    avg = models[0]
    with torch.no_grad():
        states = [m.state_dict() for m in models]
        for k, v in avg.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype))
    path = Path(out_dir) / "checkpoints" / "step_00000000"
    return save_checkpoint(path, avg, meta={"step": 0, "stage": "weight_average", "of": [str(p) for p in paths]},
                           tokenizer_dir=Path(meta["path"]) / "tokenizer")


_PARENT_GONE = threading.Event()  # set in a pool worker whose pipeline process has died


def _stop_with_parent(parent_pid: int) -> None:
    """In a pool worker: if the pipeline process dies (even by SIGKILL), stop training at the next step with a
    checkpoint, as on SIGTERM, rather than train on as an orphan."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the pipeline, which stops the workers once

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        _PARENT_GONE.set()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()


def _train_expert(rl_cfg: RLConfig, out: str, threads: int, log: Callable[[str], None] | None = None
                  ) -> tuple[str, float, int]:
    """Stage 2 for one domain (a top-level function so that a process pool can run it); its lines (evaluations,
    the end, a warning when no step updated the model) go to `log`, in a pool to stdout, as `[expert_<domain>] ...`."""
    tag = f"[expert_{rl_cfg.task.domain}]"
    say = (lambda s: log(f"{tag} {s}")) if log is not None else (lambda s: print(f"{tag} {s}", flush=True))
    from elastic_moe.grpo_trainer import FunctionScorer
    from elastic_moe.rl_train import train_rl
    from elastic_moe.tasks import verify

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        summary = train_rl(rl_cfg, out, log=say, scorer=FunctionScorer(verify))
    finally:
        if _PARENT_GONE.is_set():  # the checkpoint is written; nobody is left to take the result or more work
            os._exit(1)
    raise_if_stopped(summary)
    if summary["interrupted"] or not summary["checkpoint"]:
        raise UserError(f"expert run {out} did not finish")
    return summary["checkpoint"], time.perf_counter() - t0, summary["updated_steps"]


# --------------------------------------------------------------------------------------------- pipeline


def run_pipeline(cfg: PipelineConfig | str | Path, out_dir: str | Path, quick: bool = True, *,
                 init: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the four stages into `out_dir`; returns the path of report.md.

    cfg: a PipelineConfig or the path of a pipeline TOML. init: the pre-trained checkpoint (overrides cfg.init).
    quick: skip the baselines (mixed RL, weight averaging), for the README's end-to-end path."""
    from elastic_moe.atomic import run_lock

    with run_lock(out_dir):
        return _run_pipeline(cfg, out_dir, quick, init=init, log=log)


def _run_pipeline(cfg: PipelineConfig | str | Path, out_dir: str | Path, quick: bool = True, *,
                  init: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    from elastic_moe.tasks import get_suite

    if not isinstance(cfg, PipelineConfig):
        cfg = load_pipeline_config(cfg)
    cfg = copy.deepcopy(cfg)
    if init is not None:
        cfg.init = str(init)
    cfg.validate()
    if not cfg.init:
        raise UserError("no pre-trained checkpoint: set init = \"RUN_DIR\" in the pipeline config or pass --init")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    checkpoint_record(cfg.init)  # a missing or foreign init checkpoint is refused before the folder is made
    _check_lengths(cfg, quick)  # and settings that would only fail when their stage comes, after the ones before it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _note_changed_settings(out / "pipeline.json", cfg, log)
    atomic_write_json(out / "pipeline.json", {"config": cfg.to_dict(), "quick": quick})
    t_start = time.perf_counter()

    # stage 1: SFT on mixed demonstrations
    sft_cfg = copy.deepcopy(cfg.sft)
    sft_cfg.init = cfg.init
    sft_cfg.train.progress = sft_cfg.train.tensorboard = False

    def stage_sft(d: Path) -> Path:
        from elastic_moe.sft import train_sft

        s = train_sft(sft_cfg, d, log=log)
        raise_if_stopped(s)  # a signal stops the pipeline here, even one that came during SFT's last step
        return Path(s["checkpoint"])

    sft = run_stage(out, "sft", {"init": cfg.init}, sft_cfg.to_dict(), stage_sft, log)

    # stage 2: one GRPO expert per domain
    experts = _run_experts(cfg, out, sft, log)

    # stage 3: multi-teacher OPD into the SFT model
    opd_tasks = _mixed_tasks(cfg.domains, cfg.opd_train_size, cfg.opd.seed, cfg.eval.difficulty)

    def stage_opd(d: Path) -> Path:
        from elastic_moe.opd import train_opd

        return train_opd(cfg.opd, sft, {k: str(v) for k, v in experts.items()}, opd_tasks, d, fallback=str(sft),
                         log=log)

    # the prompts a stage trains on are part of its settings: a finished stage is not reused for others
    opd = run_stage(out, "opd", {"student": sft, **{f"teacher_{k}": v for k, v in experts.items()}},
                    {**cfg.opd.to_dict(), "tasks": {"domains": list(cfg.domains), "train_size": cfg.opd_train_size,
                                                    "difficulty": cfg.eval.difficulty}}, stage_opd, log)

    # stage 4: general RL on open-ended prompts, diversity-aware reward
    general_tasks = get_suite("open_ended", "train", cfg.general.train_size, cfg.general.seed, cfg.eval.difficulty)
    general = run_stage(out, "general", {"init": opd},
                        {**asdict(cfg.general), "tasks": {"difficulty": cfg.eval.difficulty}},
                        lambda d: run_grpo(opd, general_tasks, cfg.general, d, log), log)

    stages = {"sft": sft, **{f"expert_{k}": v for k, v in experts.items()}, "opd": opd, "general": general}
    compute = _compute(cfg)
    if not quick and cfg.baselines.mixed_rl:
        mixed_cfg = copy.deepcopy(cfg.mixed)
        per_step = mixed_cfg.prompts_per_step * mixed_cfg.group_size
        mixed_cfg.steps = math.ceil((compute["experts_samples"] + compute["opd_samples"]) / per_step)
        compute["mixed_samples"] = mixed_cfg.steps * per_step
        mixed_tasks = _mixed_tasks(cfg.domains, mixed_cfg.train_size, mixed_cfg.seed, cfg.eval.difficulty)
        mixed_settings = {**asdict(mixed_cfg), "tasks": {"domains": list(cfg.domains), "difficulty": cfg.eval.difficulty}}
        stages["mixed_rl"] = run_stage(out, "baseline_mixed_rl", {"init": sft}, mixed_settings,
                                       lambda d: run_grpo(sft, mixed_tasks, mixed_cfg, d, log, "mixed"), log)
    if not quick and cfg.baselines.weight_average:
        stages["weight_avg"] = run_stage(out, "baseline_weight_average", {f"expert_{k}": v for k, v in experts.items()},
                                         {"experts": sorted(experts)},
                                         lambda d: average_weights(list(experts.values()), d), log)

    scores, diversity = evaluate_stages(out, cfg, stages, log)
    summary = summarize(cfg.domains, scores, diversity, compute)
    summary["wall_s"] = time.perf_counter() - t_start  # this session's
    summary["stages_s"] = stage_seconds(out)  # every stage's, whichever session trained it
    summary["order"] = {"stages": list(stages), "domains": list(cfg.domains)}  # the report's columns and rows
    summary["unchanged_stages"] = unchanged_stages(stages)
    atomic_write_json(out / "report.json", summary)
    return write_report(out, cfg, stages, scores, diversity, summary)


def _note_changed_settings(saved: Path, cfg: PipelineConfig, log: Callable[[str], None]) -> None:
    """A resumed pipeline: say which settings differ from the last session's (a finished stage refuses other
    settings; an unfinished one, e.g. OPD or general RL, goes on from its checkpoint with the new ones)."""
    from elastic_moe.atomic import read_json
    from elastic_moe.tomlconfig import changed_settings

    old = read_json(saved).get("config") if saved.is_file() else None
    changed = changed_settings(old, cfg.to_dict()) if isinstance(old, dict) else []
    if changed:
        log("note: settings changed since the last session: " + "; ".join(changed))


def _check_lengths(cfg: PipelineConfig, quick: bool) -> None:
    """Every stage's prompts plus its new tokens fit the model's context (rollout.check_fit, with the tasks each
    stage will draw), before stage 1 trains."""
    from elastic_moe.checkpoint import find_checkpoint, read_meta
    from elastic_moe.rollout import check_fit
    from elastic_moe.tasks import get_suite
    from elastic_moe.tokenizer import Tokenizer

    ckpt = find_checkpoint(cfg.init)
    context = int(read_meta(ckpt)["model"]["max_position_embeddings"])
    if not (ckpt / "tokenizer" / "tokenizer.json").is_file():
        return  # the SFT stage refuses a checkpoint without a tokenizer, in one line

    tok = Tokenizer.load(ckpt / "tokenizer")
    ec, e = cfg.eval, cfg.expert

    def prompts(tasks: list) -> list[list[int]]:
        return [tok.encode_chat(t.messages, add_generation_prompt=True) for t in tasks]

    def expert_suite(split: str, n: int) -> list:
        return [t for d in cfg.domains for t in get_suite(d, split, n, e.task.seed, e.task.difficulty,
                                                          families=e.task.families)]

    eval_key = "expert.train.eval_max_new_tokens" if e.train.eval_max_new_tokens else "expert.rollout.max_new_tokens"
    checks = [("expert.rollout.max_new_tokens", e.rollout.max_new_tokens, expert_suite("train", e.task.train_size)),
              (eval_key, e.train.eval_max_new_tokens or e.rollout.max_new_tokens, expert_suite("test", e.task.test_size)),
              ("opd.max_new_tokens", cfg.opd.max_new_tokens,
               _mixed_tasks(cfg.domains, cfg.opd_train_size, cfg.opd.seed, ec.difficulty)),
              ("general.max_new_tokens", cfg.general.max_new_tokens,
               get_suite("open_ended", "train", cfg.general.train_size, cfg.general.seed, ec.difficulty)),
              ("eval.max_new_tokens", ec.max_new_tokens,
               [t for d in cfg.domains for t in get_suite(d, "test", ec.n_per_domain, ec.seed, ec.difficulty)]
               + get_suite("open_ended", "test", ec.diversity_prompts, ec.seed + 7, ec.difficulty))]
    if not quick and cfg.baselines.mixed_rl:
        checks.append(("mixed.max_new_tokens", cfg.mixed.max_new_tokens,
                       _mixed_tasks(cfg.domains, cfg.mixed.train_size, cfg.mixed.seed, ec.difficulty)))
    for key, new_tokens, tasks in checks:
        check_fit(prompts(tasks), new_tokens, context, key)


def unchanged_stages(stages: dict[str, Path]) -> list[str]:
    """The experts and the general-RL stage whose weights are exactly the ones they started from (e.g. GRPO where
    every group's rewards were equal): their scores, and a teacher's "retention", say nothing about training."""
    sha = {name: checkpoint_record(p)["sha256"] for name, p in stages.items()}
    out = [n for n in stages if n.startswith("expert_") and sha[n] == sha["sft"]]
    return out + (["general"] if sha["general"] == sha["opd"] else [])


def _mixed_tasks(domains: list[str], n: int, seed: int, difficulty: int) -> list:
    from elastic_moe.tasks import get_suite

    suites = [get_suite(d, "train", n, seed, difficulty) for d in domains]
    return [s[i] for i in range(n) for s in suites]  # interleaved, so every step sees every domain


def _run_experts(cfg: PipelineConfig, out: Path, sft: Path, log) -> dict[str, Path]:
    rl_cfgs = {}
    for d in cfg.domains:
        rc = copy.deepcopy(cfg.expert)
        rc.init, rc.task.domain = str(sft), d
        rc.train.progress = rc.train.tensorboard = False
        rl_cfgs[d] = rc
    pending = [d for d in cfg.domains if stage_done(out, f"expert_{d}", {"init": sft}, rl_cfgs[d].to_dict()) is None]
    results: dict[str, tuple[str, float]] = {}
    if cfg.experts_parallel > 1 and len(pending) > 1:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        log(f"[experts] training {', '.join(pending)}, {cfg.experts_parallel} at a time")
        ex = ProcessPoolExecutor(min(cfg.experts_parallel, len(pending)), mp_context=mp.get_context("spawn"),
                                 initializer=_stop_with_parent, initargs=(os.getpid(),))
        queue, running = list(pending), {}
        try:  # submitted one per free worker, so that nothing sits in the pool's queue when the pipeline stops
            while queue or running:
                while queue and len(running) < cfg.experts_parallel:
                    d = queue.pop(0)
                    log(f"[expert_{d}] starting")
                    running[ex.submit(_train_expert, rl_cfgs[d], str(out / f"expert_{d}"), cfg.threads)] = d
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    results[running.pop(f)] = f.result()
        except BaseException:
            # running experts get one SIGTERM: they checkpoint after their step and stop; queued ones never start
            for proc in list(getattr(ex, "_processes", {}).values()):
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)
            raise
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    experts = {}
    for d in cfg.domains:
        def fn(stage_dir: Path, d=d) -> Path:
            return Path(_train_expert(rl_cfgs[d], str(stage_dir), cfg.threads, log)[0])

        if d in results:  # trained in the pool: record it
            experts[d] = run_stage(out, f"expert_{d}", {"init": sft}, rl_cfgs[d].to_dict(),
                                   lambda _, d=d: Path(results[d][0]), log, elapsed_s=results[d][1])
        else:
            experts[d] = run_stage(out, f"expert_{d}", {"init": sft}, rl_cfgs[d].to_dict(), fn, log)
    return experts


def _compute(cfg: PipelineConfig) -> dict[str, int]:
    e = cfg.expert
    return {"experts_samples": len(cfg.domains) * e.train.max_steps * e.train.prompts_per_step * e.rollout.group_size,
            "opd_samples": cfg.opd.steps * cfg.opd.prompts_per_step * cfg.opd.group_size,
            "general_samples": cfg.general.steps * cfg.general.prompts_per_step * cfg.general.group_size}


def run_quickstart_posttrain(init: str | Path, out_dir: str | Path) -> Path:
    """The README's path: the packaged tiny pipeline, quick (no baselines), from the pre-trained `init`."""
    return run_pipeline(DEFAULT_CONFIG, out_dir, quick=True, init=init)
