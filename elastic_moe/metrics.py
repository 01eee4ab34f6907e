"""Training metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, mirrored to TensorBoard when it is
installed, and the end-of-run report (RUN_DIR/report.md with a loss-curve PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from elastic_moe.atomic import atomic_savefig, atomic_write_text, naming

METRICS = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a killed run), or any line that is not a JSON object, is left
    out."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    rows = []
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def recent_mean(rows: list[dict], key: str = "loss", n: int = 20) -> tuple[float, int]:
    """Mean of the last `n` finite values of `key` in metrics rows (the whole run's, resumed sessions included)
    and how many there were; (nan, 0) when none."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])][-n:]
    return (sum(vals) / len(vals), len(vals)) if vals else (float("nan"), 0)


class MetricsSink:
    """Appends rows to metrics.jsonl. On resume from `resume_step`, rows of later steps (written by the run that was
    interrupted after its last checkpoint) are dropped first, so the file reads like one uninterrupted run. A fresh
    start (step 0) keeps none: a step-0 row (RL's first evaluation) is logged again."""

    def __init__(self, out_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(out_dir) / METRICS
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step > 0 else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a", encoding="utf-8")  # closed in close()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        with naming(self.path):
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        if self._tb is not None:
            step = row["step"]
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        with naming(self.path):
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def plot_losses(rows: list[dict], path: Path) -> bool:
    """Training loss (raw and smoothed) and held-out losses per sub-model against tokens. False without
    matplotlib or without anything to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    names = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/") and k.endswith("/loss")})
    if not train and not names:  # nothing logged yet (e.g. --max-steps 0): no empty plot
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="0.75", lw=0.8, label="train (per step)")
        ema, sm = None, []
        for y in ys:
            ema = y if ema is None else 0.9 * ema + 0.1 * y
            sm.append(ema)
        ax.plot(xs, sm, color="k", lw=1.4, label="train (EMA 0.9)")
    for name in names:
        pts = [(r["tokens"], r[f"eval/{name}/loss"]) for r in rows if f"eval/{name}/loss" in r]
        ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=f"held-out {name}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return True


def write_report(out_dir: str | Path, rows: list[dict], summary: dict, submodels: list[dict]) -> Path:
    """RUN_DIR/report.md: run summary, the final held-out table of the sub-model list, the loss curve."""
    out = Path(out_dir)
    has_plot = plot_losses(rows, out / "loss.png")
    lines = [
        "# Elastic pre-training report",
        "",
        f"- run: `{out}`",
        f"- steps: {summary['step']}, tokens: {summary['tokens']:,}, wall time: {summary['elapsed_s']:.0f} s "
        f"({summary['tokens_per_s']:,.0f} tokens/s overall)",
        f"- model: {summary['params'] / 1e6:.2f} M parameters, {summary['active_params'] / 1e6:.2f} M active per token",
        f"- elastic: {summary['elastic']}",
        f"- final training loss (mean of the last {summary['loss_window']} steps): {summary['final_loss']:.4f}",
    ]
    lines += [f"- {k}: {summary[k]}" for k in ("data", "batch") if summary.get(k)]
    lines.append("")
    if summary.get("interrupted"):
        from elastic_moe.runloop import stopped_note

        lines += [stopped_note(summary["step"], summary["max_steps"]) + " The held-out evaluation of the sub-models "
                  "comes when the run completes.", ""]
    elif submodels:
        lines += ["## Held-out evaluation of the sub-models", "",
                  "| sub-model | layers | experts | top-k | active params (M) | MFLOPs/token (train) | loss | ppl |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in submodels:
            lines.append(f"| {s['name']} | {s['layers']} | {s['experts']} | {s['top_k']} | {s['active_params'] / 1e6:.2f} "
                         f"| {s['flops_per_token'] / 1e6:.1f} | {s['loss']:.4f} | {math.exp(min(s['loss'], 50)):.1f} |")
        lines.append("")
    else:
        lines += ["No held-out evaluation (no held-out sequence).", ""]
    if has_plot:
        lines += ["## Loss", "", "![loss curve](loss.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def write_curve_report(out_dir: str | Path, title: str, facts: list[str],
                       panels: list[tuple[str, list[tuple[str, str]]]]) -> Path:
    """RUN_DIR/report.md and curve.png from RUN_DIR/metrics.jsonl, for the stage loops without a report of their
    own: `facts` as bullet lines, then one panel per (title, [(metric key, label), ...]) against steps, and each
    key's first and last logged value."""
    from elastic_moe.atomic import write_figure

    out = Path(out_dir)
    rows = read_metrics(out)

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                and not isinstance(r.get(key), bool) and math.isfinite(r[key]) and "step" in r]

    lines = [f"# {title}", "", f"- run: `{out}`", *[f"- {f}" for f in facts],
             f"- steps logged: {rows[-1].get('step', len(rows)) if rows else 0}"]
    for _, keys in panels:
        for key, label in keys:
            pts = series(key)
            if pts:
                lines.append(f"- {label}: {pts[0][1]:.4g} at step {pts[0][0]} -> {pts[-1][1]:.4g} at step {pts[-1][0]}")

    def draw(axes) -> None:
        for ax, (name, keys) in zip(axes, panels):
            for key, label in keys:
                pts = series(key)
                if pts:
                    ax.plot(*zip(*pts), lw=1.1, marker="o" if len(pts) < 30 else None, ms=2.5, label=label)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)

    if rows and panels and write_figure(out / "curve.png", draw, len(panels), (4.2 * len(panels), 3.6)):
        lines += ["", "![curves](curve.png)"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
