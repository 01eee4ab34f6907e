"""The post-training pipeline's evaluation and report: every stage's checkpoint scored on every domain (cached by
checkpoint hash), diversity before and after stage 4, the headline numbers (retention, seesaw, stage-4 drop), and
report.md + report.png."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from elastic_moe.atomic import atomic_savefig, atomic_write_json, atomic_write_text, read_json
from elastic_moe.lineage import checkpoint_record, config_hash

if TYPE_CHECKING:
    from elastic_moe.posttrain import EvalConfig, PipelineConfig

DIVERSITY_STAGES = ("sft", "opd", "general", "mixed_rl")


def evaluate_domains(ckpt: str | Path, domains: list[str], ec: EvalConfig) -> dict[str, float]:
    """Score per domain: 100 x mean task reward of greedy answers on `n_per_domain` test tasks."""
    from elastic_moe.checkpoint import load_policy
    from elastic_moe.rollout import evaluate_accuracy
    from elastic_moe.tasks import get_suite

    model, tok, _ = load_policy(ckpt)
    model.eval()
    out = {}
    for d in domains:
        tasks = get_suite(d, "test", ec.n_per_domain, ec.seed, ec.difficulty)
        out[d] = 100.0 * evaluate_accuracy(model, tok, tasks, ec.max_new_tokens)["reward"]
    return out


def evaluate_diversity(ckpt: str | Path, ec: EvalConfig) -> dict:
    """distinct-1/2, self-BLEU and pass@1/pass@k over `diversity_samples` samples of each open-ended test prompt."""
    from elastic_moe.checkpoint import load_policy
    from elastic_moe.generate import SamplingParams, generate
    from elastic_moe.tasks import get_suite, verify
    from elastic_moe.tasks.diversity import group_metrics

    model, tok, _ = load_policy(ckpt)
    model.eval()
    tasks = get_suite("open_ended", "test", ec.diversity_prompts, ec.seed + 7, ec.difficulty)
    prompts = [tok.encode_chat(t.messages, add_generation_prompt=True) for t in tasks]
    k = ec.diversity_samples
    sp = SamplingParams(ec.max_new_tokens, temperature=ec.diversity_temperature, seed=ec.seed)
    with torch.no_grad():
        comps = generate(model, prompts, sp, eos_id=tok.eos_id, n=k)
    acc: dict[str, list[float]] = {}
    for i, t in enumerate(tasks):
        texts = [tok.decode(c.tokens, skip_special_tokens=True) for c in comps[i * k:(i + 1) * k]]
        gm = group_metrics(texts, [verify(t, x).correct for x in texts], ks=(1, k))
        for key in ("distinct_1", "distinct_2", "self_bleu", "pass@1", f"pass@{k}"):
            acc.setdefault(key, []).append(gm[key])
    out: dict = {key: sum(v) / len(v) for key, v in acc.items()}
    d2 = acc["distinct_2"]  # the standard error of its mean over prompts: what a change between stages is read against
    out["distinct_2_se"] = statistics.stdev(d2) / math.sqrt(len(d2)) if len(d2) > 1 else float("nan")
    out["distinct_2_per_prompt"] = d2  # every stage is scored on the same prompts: a change's SE pairs them
    return out


def evaluate_stages(out: Path, cfg: PipelineConfig, stages: dict[str, Path], log) -> tuple[dict, dict]:
    """Scores of every stage's checkpoint on every domain, and diversity before/after stage 4; cached in
    out/eval.json by checkpoint hash, so a resumed run evaluates only what changed."""
    path = out / "eval.json"
    cache = read_json(path) if path.is_file() else {}
    ec = cfg.eval
    key_cfg = config_hash(asdict(ec))[:12]
    scores, diversity = {}, {}
    for name, ckpt in stages.items():
        key = f"{checkpoint_record(ckpt)['sha256']}/{key_cfg}"
        entry = cache.setdefault(key, {})
        missing = [d for d in cfg.domains if d not in entry.get("scores", {})]  # the key does not hold the domains
        if missing:
            log(f"[eval] {name}: domain scores")
            entry["scores"] = {**entry.get("scores", {}), **evaluate_domains(ckpt, missing, ec)}
            atomic_write_json(path, cache)
        scores[name] = {d: entry["scores"][d] for d in cfg.domains}
        if name in DIVERSITY_STAGES:
            if "distinct_2_per_prompt" not in entry.get("diversity", {}):  # also an entry from before it was kept
                log(f"[eval] {name}: diversity")
                entry["diversity"] = evaluate_diversity(ckpt, ec)
                atomic_write_json(path, cache)
            diversity[name] = entry["diversity"]
    return scores, diversity


def summarize(domains: list[str], scores: dict, diversity: dict, compute: dict) -> dict:
    """The headline numbers. Retention = OPD score / the domain expert's score on its domain (None when the
    expert scores 0); a drop is in score points (positive = worse)."""
    retention = {}
    for d in domains:
        teacher = scores[f"expert_{d}"][d]
        retention[d] = scores["opd"][d] / teacher if teacher > 0 else None
    known = [r for r in retention.values() if r is not None]
    out = {"scores": scores, "diversity": diversity, "compute": compute, "retention": retention,
           "min_teacher_retention": min(known) if known else None,
           "max_domain_drop_stage4": max(scores["opd"][d] - scores["general"][d] for d in domains),
           "distinct_n_gain_stage4": (diversity["general"]["distinct_2"] - diversity["opd"]["distinct_2"]
                                      if "general" in diversity and "opd" in diversity else None)}
    if out["distinct_n_gain_stage4"] is not None:
        out["distinct_n_gain_stage4_se"] = _gain_se(diversity["opd"], diversity["general"])
    if "mixed_rl" in scores:
        drops = {d: scores["sft"][d] - scores["mixed_rl"][d] for d in domains}
        gains = {d: scores["mixed_rl"][d] - scores["sft"][d] for d in domains}
        out["seesaw_baseline_max_drop"] = max(drops.values())
        # seesaw: the mixed run improves some domain while another falls below its SFT score
        out["seesaw_baseline"] = max(gains.values()) > 0 and max(drops.values()) > 0
        out["opd_minus_mixed"] = {d: scores["opd"][d] - scores["mixed_rl"][d] for d in domains}
    return out


def _gain_se(before: dict, after: dict) -> float:
    """The standard error of after - before in mean distinct-2. Both were measured on the same prompts, whose own
    effect on diversity cancels in the per-prompt differences; without per-prompt values (a summary from an older
    eval.json) the two SEs are added in squares, as if independent, which overstates it."""
    a, b = after.get("distinct_2_per_prompt"), before.get("distinct_2_per_prompt")
    if a and b and len(a) == len(b):
        diffs = [x - y for x, y in zip(a, b)]
        return statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return math.hypot(after["distinct_2_se"], before["distinct_2_se"])


def write_report(out: Path, cfg: PipelineConfig, stages: dict[str, Path], scores: dict, diversity: dict,
                 summary: dict) -> Path:
    domains = cfg.domains
    cols = list(stages)
    lines = ["# Post-training pipeline report", "",
             f"- run: `{out}`; pre-trained init `{cfg.init}`; time in the stages {summary.get('stages_s', 0):.0f} s (this session {summary.get('wall_s', 0):.0f} s)",
             "- score = 100 x mean task reward, greedy, on "
             f"{cfg.eval.n_per_domain} held-out tasks per domain (difficulty {cfg.eval.difficulty})",
             f"- rollout samples: experts {summary['compute']['experts_samples']}, OPD "
             f"{summary['compute']['opd_samples']}, general RL {summary['compute']['general_samples']}"
             + (f", mixed-RL baseline {summary['compute']['mixed_samples']}" if "mixed_samples" in summary["compute"]
                else ""), "",
             "## Domain x stage", "", "| domain | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(f"{scores[c][d]:.1f}" for c in cols) + " |")
    for n in summary.get("unchanged_stages", []):
        lines += ["", f"**Warning: `{n}` has exactly the weights it started from** (no step updated the model; "
                  f"see `{n}/report.md`): its scores measure {'the SFT model' if n != 'general' else 'the OPD model'}."]
    lines += ["", "## Student / teacher retention after OPD", "", "| domain | expert | OPD student | retention |",
              "|---|---|---|---|"]
    for d in domains:
        r = summary["retention"][d]
        lines.append(f"| {d} | {scores[f'expert_{d}'][d]:.1f} | {scores['opd'][d]:.1f} | "
                     f"{'n/a (expert scores 0)' if r is None else f'{100 * r:.0f}%'} |")
    if diversity:
        first = ("distinct_1", "distinct_2", "distinct_2_se", "self_bleu", "pass@1")  # one order, fresh or read back from eval.json
        keys = sorted((k for k, v in next(iter(diversity.values())).items() if not isinstance(v, list)),
                      key=lambda k: (first.index(k) if k in first else len(first), k))
        lines += ["", "## Diversity on open-ended prompts (sampled groups)", "",
                  "| checkpoint | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for n, v in diversity.items()]
    lines += ["", "## Headline", ""]
    for k in ("min_teacher_retention", "max_domain_drop_stage4", "distinct_n_gain_stage4", "seesaw_baseline_max_drop",
              "seesaw_baseline"):
        if k in summary:
            v = summary[k]
            lines.append(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}")
    if _plot(out / "report.png", domains, cols, scores, diversity):
        lines += ["", "![report](report.png)"]
    lines += ["", "Lineage (inputs, outputs, config hashes): `lineage.json`.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _plot(path: Path, domains: list[str], cols: list[str], scores: dict, diversity: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the report is written without the figure
        return False
    fig, ax = plt.subplots(1, 2, figsize=(12, 4), dpi=110, gridspec_kw={"width_ratios": [3, 1]})
    w = 0.8 / len(cols)
    for j, c in enumerate(cols):
        ax[0].bar([i + j * w for i in range(len(domains))], [scores[c][d] for d in domains], w, label=c)
    ax[0].set_xticks([i + 0.4 - w / 2 for i in range(len(domains))], domains)
    ax[0].set_ylabel("score (100 x mean reward)")
    ax[0].legend(fontsize=7, ncol=2)
    ax[0].set_title("domain x stage", fontsize=9)
    if diversity:
        names = list(diversity)
        ax[1].bar(names, [diversity[n]["distinct_2"] for n in names], color="C2")
        ax[1].set_title("distinct-2 on open-ended prompts", fontsize=9)
        ax[1].tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return True
