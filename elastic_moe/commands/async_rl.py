"""`elastic-moe async-rl CONFIG.toml --out RUN_DIR`: decoupled asynchronous GRPO (controller + role workers).

Without `init` it runs the toy job of `elastic_moe.async_rl.toy` (a tiny random MoE learning a token-share reward);
with `init` (an SFT checkpoint with its tokenizer) it trains on a task suite, verified by `tasks.verify`. Run the same
command again to resume from RUN_DIR's last checkpoint (RUN_DIR/config.toml holds the run's settings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "asynchronous GRPO with bounded staleness: rollout, reward and trainer workers (local threads or Ray)"


class TaskReward:
    """reward = tasks.verify(task, decoded completion).reward (None: infrastructure failure); picklable for Ray."""

    def __init__(self, tasks, tokenizer_dir: str, delay_s: float = 0.0):
        self.tasks, self.tokenizer_dir, self.delay_s = tasks, tokenizer_dir, delay_s
        self._tok = None

    def __call__(self, task_index: int, tokens: list[int]) -> float | None:
        import time

        from elastic_moe.tasks import verify
        from elastic_moe.tokenizer import Tokenizer

        if self._tok is None:
            self._tok = Tokenizer.load(self.tokenizer_dir)
        if self.delay_s:
            time.sleep(self.delay_s)
        return verify(self.tasks[task_index], self._tok.decode(tokens, skip_special_tokens=True)).reward

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}


class PoolTaskReward(TaskReward):
    """The same reward verified on a RewardPool (worker processes, a verifier past its timeout is killed): the
    reward workers become threads that wait on the pool. Local backend only (the pool is not picklable)."""

    def __init__(self, tasks, tokenizer_dir: str, pool, delay_s: float = 0.0):
        super().__init__(tasks, tokenizer_dir, delay_s)
        self.pool = pool

    def __call__(self, task_index: int, tokens: list[int]) -> float | None:
        import time

        from elastic_moe.tokenizer import Tokenizer

        if self._tok is None:
            self._tok = Tokenizer.load(self.tokenizer_dir)
        if self.delay_s:
            time.sleep(self.delay_s)
        text = self._tok.decode(tokens, skip_special_tokens=True)
        return self.pool.submit(self.tasks[task_index], text).result().reward


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: RUN_DIR/config.toml when resuming, else all "
                                             "defaults: the toy job)")
    p.add_argument("--out", required=True, help="run directory: config.toml, checkpoints/, metrics.jsonl, summary.json, "
                                            "report.md + curve.png")
    p.add_argument("--init", help="SFT checkpoint or run directory to train on the task suite (init)")
    p.add_argument("--max-steps", type=int, help="trainer steps (run.steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def run(args: argparse.Namespace) -> int:
    from elastic_moe.atomic import run_lock
    from elastic_moe.commands.run_args import note_cpu_only

    note_cpu_only("async-rl")
    with run_lock(args.out):  # one command at a time on a folder
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from elastic_moe.async_rl.config import AsyncRLConfig
    from elastic_moe.async_rl.controller import Controller, check_resume
    from elastic_moe.async_rl.toy import TokenShareReward, toy_model, toy_prompts
    from elastic_moe.commands.run_args import refuse_other_command
    from elastic_moe.errors import UserError
    from elastic_moe.rollout import check_fit
    from elastic_moe.runloop import StopSignal, raise_if_stopped
    from elastic_moe.tomlconfig import apply_overrides, from_dict, read_toml

    out = Path(args.out)
    path = args.config or (out / "config.toml" if (out / "config.toml").is_file() else None)
    overrides = list(args.set)  # the flags go last, so they win, through the same checks as --set
    if args.init is not None:
        overrides.append(f"init={json.dumps(args.init)}")
    if args.max_steps is not None:
        overrides.append(f"run.steps={args.max_steps}")
    def upgrade(data: dict) -> None:  # a run made when the trainer had its own temperature setting
        old_run = data.get("run")
        if isinstance(old_run, dict) and "temperature" in old_run:
            sampling = (data.get("rollout") or {}).get("temperature", 1.0)
            if old_run.pop("temperature") != sampling:
                raise UserError(f"{path}: run.temperature is gone (the trainer's log-probs use rollout.temperature, "
                                f"{sampling}); remove it from the file")

    refuse_other_command(out, "async-rl", AsyncRLConfig, upgrade, inputs=(args.config,))
    data = read_toml(path) if path else {}
    upgrade(data)
    cfg = from_dict(AsyncRLConfig, apply_overrides(data, overrides))
    if cfg.init:
        from elastic_moe.checkpoint import load_policy
        from elastic_moe.tasks import get_suite

        model, tok, meta = load_policy(cfg.init)
        t = cfg.task
        tasks = get_suite(t.domain, "train", t.train_size, t.seed, t.difficulty)
        prompts = [tok.encode_chat(x.messages, add_generation_prompt=True) for x in tasks]
        check_fit(prompts, cfg.rollout.max_new_tokens, model.cfg.max_position_embeddings, "rollout.max_new_tokens")
        reward, eos = TaskReward(tasks, str(Path(meta["path"]) / "tokenizer"), t.reward_delay_s), tok.eos_id
    else:
        model = toy_model(cfg.toy, cfg.run.seed)
        prompts = toy_prompts(cfg.toy, cfg.toy.num_prompts, cfg.run.seed)
        check_fit(prompts, cfg.rollout.max_new_tokens, model.cfg.max_position_embeddings, "rollout.max_new_tokens")
        reward, eos = TokenShareReward(cfg.toy.vocab_size, cfg.toy.reward_delay_s), model.cfg.eos_token_id
    if cfg.run.backend == "ray":
        from elastic_moe.async_rl.ray_backend import start_ray

        start_ray()
    # the run's settings go with it (config.toml is what a later `--set`-free re-run would need to reproduce it)
    from elastic_moe.atomic import atomic_write_json, atomic_write_text
    from elastic_moe.tomlconfig import note_changed_settings, to_dict
    from elastic_moe.train import dump_toml

    settings = json.loads(json.dumps(to_dict(cfg)))
    last = _last_checkpoint_meta(out)
    _refuse_another_model(out, last, model)  # before the saved settings are replaced
    if last is not None:
        check_resume(last, cfg.run, out)
    out.mkdir(parents=True, exist_ok=True)
    note_changed_settings(out, settings, print)
    atomic_write_json(out / "config.json", settings)
    atomic_write_text(out / "config.toml", dump_toml(settings))
    done_step = int(last.get("async_rl", {}).get("step", 0)) if last else None
    if done_step is not None and done_step >= cfg.run.steps:
        print(f"the run is already at step {done_step}, at or past run.steps {cfg.run.steps}: nothing to train "
              "(a larger --max-steps trains on)")
        if (out / "summary.json").is_file():
            print(f"its summary: {out / 'summary.json'}")
            return 0
    if cfg.init and cfg.task.reward_pool_workers > 0:  # started last: a refusal above leaves no worker process behind
        from elastic_moe.reward_pool import RewardPool

        t = cfg.task
        pool = RewardPool(t.reward_pool_workers, task_timeout_s=t.reward_timeout_s)
        reward = PoolTaskReward(reward.tasks, reward.tokenizer_dir, pool, t.reward_delay_s)
    stop = None
    try:
        ctl = Controller(cfg.run, model, prompts, reward, cfg.rollout, cfg.grpo, eos, out_dir=out, log=print)
        ctl.stop = stop = StopSignal()
        summary = ctl.run()
    finally:
        if stop is not None:
            stop.restore()
        if getattr(reward, "pool", None) is not None:
            reward.pool.close()
    summary.pop("params")
    rows = summary.pop("rows")
    # steps, groups and losses of the whole run (metrics.jsonl holds every step, resumed sessions included);
    # timings and queue figures are this session's
    from elastic_moe.metrics import read_metrics

    all_rows = read_metrics(out)
    summary.update({"session_steps": summary["steps"], "steps": len(all_rows),
                    "trained_gids": [g for r in all_rows for g in r.get("gids", [])],
                    "losses": [r.get("loss/pg_loss", float("nan")) for r in all_rows]})
    atomic_write_json(out / "summary.json", summary)
    from elastic_moe.async_rl.report import write_report

    report = write_report(out, all_rows, summary, cfg)
    raise_if_stopped(summary)  # after the summary and report of what was trained
    last_row = rows[-1] if rows else {}
    if not rows:
        print(f"summary {out / 'summary.json'}, report {report}")
        return 0
    print(f"done: {summary['samples']} samples in {summary['wall_s']:.1f} s, trainer idle "
          f"{summary['trainer_idle_frac']:.2f}, staleness {' '.join(f'{k}:{v}' for k, v in summary['staleness_hist'].items())}, last reward "
          f"{last_row.get('reward/mean', float('nan')):.3f}; report {report}")
    return 0


def _last_checkpoint_meta(out: Path) -> dict | None:
    from elastic_moe.checkpoint import read_meta
    from elastic_moe.runloop import latest_checkpoint

    ck = latest_checkpoint(out) if out.is_dir() else None
    return None if ck is None else read_meta(ck)


def _refuse_another_model(out: Path, last: dict | None, model) -> None:
    from elastic_moe.errors import UserError
    from elastic_moe.tomlconfig import changed_settings

    if last is None:
        return
    diff = changed_settings(last.get("model", {}), model.cfg.to_dict())
    if diff:
        raise UserError(f"{out} holds a run of another model ({'; '.join(diff[:4])}): resume with the same "
                        "settings, or use another --out")
