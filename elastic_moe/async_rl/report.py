"""RUN_DIR/report.md and curve.png of an `elastic-moe async-rl` run: reward, sample staleness and idle time.

Everything comes from RUN_DIR/metrics.jsonl (every step of the run, resumed sessions included) and the summary of
the last session (timings, queue figures and restarts are that session's).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from elastic_moe.atomic import atomic_write_text, write_figure


def _finite(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def staleness(rows: list[dict]) -> dict[int, int]:
    """Trained samples by their lag in weight versions, over the whole run."""
    hist: Counter = Counter()
    for r in rows:
        hist.update({int(k): v for k, v in (r.get("staleness_hist") or {}).items()})
    return dict(sorted(hist.items()))


def write_report(out: Path, rows: list[dict], summary: dict, cfg) -> Path:
    reward = _finite(rows, "reward/mean")
    idle = {k: _finite(rows, f"{k}_idle_frac") for k in ("trainer", "rollout")}
    lags = staleness(rows)

    def draw(ax) -> None:
        if reward:
            ax[0].plot(*zip(*reward), color="C0", lw=1)
        ax[0].set_title("mean reward of the trained groups", fontsize=9)
        ax[0].set_xlabel("step")
        if lags:
            ax[1].bar([str(k) for k in lags], list(lags.values()), color="C2")
        ax[1].set_title(f"trained samples by staleness (eta = {cfg.run.eta})", fontsize=9)
        ax[1].set_xlabel("weight versions behind the trainer")
        for i, (k, pts) in enumerate(idle.items()):
            if pts:
                ax[2].plot(*zip(*pts), color=f"C{i + 3}", lw=1, label=k)
        ax[2].set_ylim(0, 1)
        ax[2].set_title("idle fraction since the session started", fontsize=9)
        ax[2].set_xlabel("step")
        if any(idle.values()):
            ax[2].legend(fontsize=8)

    has_plot = write_figure(out / "curve.png", draw, 3, (12, 3.6))
    trained = sum(lags.values())
    job = f"task suite {cfg.task.domain} from `{cfg.init}`" if cfg.init else "the toy job (token-share reward)"
    lines = ["# Asynchronous GRPO report", "", f"- run: `{out}`; {job}",
             f"- steps: {rows[-1]['step'] if rows else 0}, {cfg.run.groups_per_step} groups x "
             f"{cfg.rollout.group_size} samples per step, eta {cfg.run.eta}, backend {cfg.run.backend}, "
             f"{cfg.run.rollout_workers} rollout / {cfg.run.reward_workers} reward worker(s)",
             f"- trained samples: {trained}; by staleness: "
             + (", ".join(f"{k}: {v} ({v / trained:.0%})" for k, v in lags.items()) if trained else "none")]
    if reward:
        lines.append(f"- mean reward: {reward[0][1]:.3f} at step {reward[0][0]} -> {reward[-1][1]:.3f} at step "
                     f"{reward[-1][0]}")
    lines.append(f"- last session: {summary.get('session_steps', 0)} steps in {summary.get('wall_s', 0):.1f} s, "
                 f"trainer idle {summary.get('trainer_idle_frac', math.nan):.2f}, rollout idle "
                 f"{summary.get('rollout_idle_frac', math.nan):.2f}, worker restarts "
                 f"{sum((summary.get('restarts') or {}).values())}")
    if has_plot:
        lines += ["", "![curves](curve.png)"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
