"""Post-training pipeline end to end on the tiny model (CPU): the domain x stage table, OPD retention of each
teacher's score, the mixed multi-task RL baseline at equal rollout samples, weight averaging, and diversity before and
after stage 4.

    .venv/bin/python benchmarks/posttrain_pipeline.py --init runs/tiny [--quick] [--work DIR] [--out DIR]

--init: a pre-trained checkpoint (default: pre-train configs/tiny.toml for --pretrain-steps into WORK/pretrain).
--quick: the packaged configs/posttrain_tiny.toml as is; otherwise a few more steps per stage and more eval tasks.
Every stage is resumable: run the same command again after an interruption.
Writes posttrain_pipeline.{md,json,png} under --out (default docs/benchmarks; with --quick runs/bench_quick) and
prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import QUICK, command_line, machine, md_table, report_dir, write_report  # noqa: E402

# stage 1 long enough that the tiny model solves a real share of code and open-ended tasks (60 steps left it at 0 on
# code), 256 held-out tasks per domain so that one task is 0.4 points (with 64, a stage that moved no domain still
# showed drops of 2-3 tasks = 3-5 points from noise: docs/LOG.md session 28)
SFT_STEPS, EVAL_N = 1200, 256
FULL = [f"sft.train.max_steps={SFT_STEPS}", "sft.data.n_per_domain=2000", "expert.train.max_steps=40", "opd.steps=24",
        "general.steps=40", f"eval.n_per_domain={EVAL_N}", "eval.diversity_prompts=128", "eval.diversity_samples=8"]


def pretrain(work: Path, steps: int) -> Path:
    from elastic_moe.tomlconfig import load_config
    from elastic_moe.train import DEFAULT_CONFIG, TrainConfig, train

    cfg = load_config(TrainConfig, DEFAULT_CONFIG, [f"train.max_steps={steps}"])
    train(cfg, work / "pretrain")
    return work / "pretrain"


def verdicts(s: dict) -> list[str]:
    out = []
    r = s["min_teacher_retention"]
    if r is None:
        out.append("- **OPD retention >= 90% of each teacher: not measurable** — every expert scores 0 on its domain.")
    else:
        ok = r >= 0.9
        zero = [d for d, v in s["retention"].items() if v is None]
        out.append(f"- **OPD retention >= 90% of each teacher: {'met' if ok else 'missed'}** — the lowest retention "
                   f"is {100 * r:.0f}%" + (f" (not defined for {', '.join(zero)}: its expert scores 0)" if zero else "")
                   + ".")
    if "seesaw_baseline_max_drop" in s:
        d = s["seesaw_baseline_max_drop"]
        om = s["opd_minus_mixed"]
        out.append(f"- **Mixed multi-task RL baseline seesaw: {'yes' if s['seesaw_baseline'] else 'no'}** — its "
                   f"largest drop below the SFT score is {d:.1f} points; OPD minus mixed RL per domain at equal "
                   "rollout samples: " + ", ".join(f"{k} {v:+.1f}" for k, v in om.items()) + ".")
    g, drop, se = s["distinct_n_gain_stage4"], s["max_domain_drop_stage4"], s.get("distinct_n_gain_stage4_se")
    raised = g is not None and g > 2 * (se or 0)  # a gain within two standard errors is not read as one
    out.append(f"- **Stage 4 raises distinct-n: {'met' if raised else 'missed'}** — distinct-2 {g:+.3f}"
               + (f" +- {se:.3f} (standard error over the prompts; met needs a gain above two)" if se else "")
               + " on open-ended prompts.")
    out.append(f"- **No domain drops more than 2 points in stage 4: {'met' if drop <= 2 else 'missed'}** — the "
               f"largest drop is {drop:.1f} points.")
    return out


def expert_reading(s: dict, n: int) -> list[str]:
    """What the retention figures can and cannot say: each expert's gain over the SFT model on its own domain."""
    sc, one = s["scores"], 100 / n
    gains = {d: sc[f"expert_{d}"][d] - sc["sft"][d] for d in s["retention"] if f"expert_{d}" in sc}
    better = [d for d, g in gains.items() if g > one + 1e-9]
    lines = ["Each expert against the SFT model on its own domain (points): "
             + ", ".join(f"{d} {g:+.1f}" for d, g in gains.items()) + "."]
    if better:
        lines.append("Retention is informative where the teacher is better than the student's starting point ("
                     + ", ".join(better) + "): there OPD had something to transfer, and the student's score after OPD "
                     "is " + ", ".join(f"{d} {sc['opd'][d]:.1f} vs teacher {sc[f'expert_{d}'][d]:.1f} and SFT "
                                       f"{sc['sft'][d]:.1f}" for d in better) + ".")
    flat = [d for d in gains if d not in better]
    if flat:
        lines.append("Where the expert is not better than SFT by more than one task (" + ", ".join(flat) + "), a "
                     "retention of ~100% only says that OPD did not lose what the student already had.")
    return [" ".join(lines)]


def rl_signal(pipeline: Path) -> list[list]:
    """Per RL stage: steps, steps that made an update (groups with unequal rewards), samples trained on."""
    from elastic_moe.metrics import read_metrics

    rows = []
    for d in sorted(pipeline.iterdir()):
        if not (d / "metrics.jsonl").is_file() or d.name in ("sft", "opd"):
            continue
        steps = [r for r in read_metrics(d) if "skipped" in r]
        rows.append([d.name, len(steps), sum(r["skipped"] == 0 for r in steps),
                     int(sum(r.get("samples/trained", 0) for r in steps))])
    return rows


def transfer_check(work: Path, init: str, teacher: Path, sft_steps: int, opd_steps: int) -> dict:
    """OPD where the teacher really is better: a student given only `sft_steps` of SFT distils the pipeline's SFT
    model (its teacher on every domain) for `opd_steps` steps. Scores and the teacher-student reverse KL on
    held-out prompts before and after."""
    import copy

    from elastic_moe.lineage import run_stage
    from elastic_moe.opd import train_opd
    from elastic_moe.posttrain import _mixed_tasks, load_pipeline_config
    from elastic_moe.posttrain_report import evaluate_domains
    from elastic_moe.sft import train_sft

    cfg = load_pipeline_config(None, FULL)
    out = work / "transfer"
    sft_cfg = cfg.sft
    sft_cfg.init, sft_cfg.train.max_steps = init, sft_steps
    sft_cfg.train.progress = sft_cfg.train.tensorboard = False
    weak = run_stage(out, "weak_sft", {"init": init}, sft_cfg.to_dict(),
                     lambda d: Path(train_sft(sft_cfg, d, log=lambda s: None)["checkpoint"]), print)
    opd_cfg = copy.deepcopy(cfg.opd)
    opd_cfg.steps = opd_steps
    tasks = _mixed_tasks(cfg.domains, cfg.opd_train_size, 0, 1)
    distilled = run_stage(out, "opd", {"student": weak, "teacher": teacher}, opd_cfg.to_dict(),
                          lambda d: train_opd(opd_cfg, weak, {}, tasks, d, fallback=str(teacher)), print)
    ec = cfg.eval
    res = {name: evaluate_domains(p, cfg.domains, ec) for name, p in
           (("student_before", weak), ("student_after", distilled), ("teacher", teacher))}
    res["kl_before_after"] = [held_out_kl(weak, teacher, ec), held_out_kl(distilled, teacher, ec)]
    return res


def held_out_kl(student_ckpt: Path, teacher_ckpt: Path, ec) -> float:
    """Exact reverse KL(student || teacher) per token on student samples of held-out mixed prompts."""
    import torch

    from elastic_moe.checkpoint import load_policy
    from elastic_moe.generate import SamplingParams, generate
    from elastic_moe.opd import OPDLossConfig, Teachers, opd_loss
    from elastic_moe.tasks import get_mixed_suite

    student, tok, _ = load_policy(student_ckpt)
    teacher, _, _ = load_policy(teacher_ckpt)
    tasks = [t for t in get_mixed_suite("test", 48, seed=11) if t.domain != "agent"]
    prompts = [tok.encode_chat(t.messages, add_generation_prompt=True) for t in tasks]
    with torch.no_grad():
        comps = generate(student.eval(), prompts, SamplingParams(ec.max_new_tokens, temperature=1.0, seed=0),
                         eos_id=tok.eos_id)
        loss, _ = opd_loss(student, Teachers({"t": teacher.eval()}, {}, fallback="t"), prompts,
                           [c.tokens for c in comps], ["x"] * len(comps), OPDLossConfig("full"), tok.pad_id)
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", help="pre-trained checkpoint or run directory")
    ap.add_argument("--work", help="stage outputs (default: runs/bench_posttrain; with --quick runs/bench_quick/"
                    "posttrain, so that a smoke run does not replace the full run's cached stages)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", help="where the report goes (default: docs/benchmarks; with --quick runs/bench_quick)")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-transfer-check", action="store_true", help="skip the OPD check with a better teacher")
    args = ap.parse_args()

    import torch

    from elastic_moe.posttrain import load_pipeline_config, run_pipeline

    torch.set_num_threads(1)
    work = Path(args.work) if args.work else QUICK / "posttrain" if args.quick else ROOT / "runs" / "bench_posttrain"
    out = report_dir(args.out, args.quick)
    init = args.init or str(pretrain(work, args.pretrain_steps))
    cfg = load_pipeline_config(None, ([] if args.quick else FULL) + args.set)
    report = run_pipeline(cfg, work / "pipeline", quick=False, init=init)
    s = json.loads((report.parent / "report.json").read_text())
    headline = {k: s.get(k) for k in ("min_teacher_retention", "seesaw_baseline_max_drop", "distinct_n_gain_stage4",
                                      "distinct_n_gain_stage4_se", "max_domain_drop_stage4", "seesaw_baseline")}
    headline.update({"retention": s["retention"], "scores": s["scores"], "diversity": s["diversity"],
                     "compute": s["compute"], "wall_s": s["wall_s"], "stages_s": s.get("stages_s"),
                     "quick": args.quick})
    transfer_md: list[str] = []
    if not args.no_transfer_check:
        sft_ckpt = Path(next(x for x in json.loads((report.parent / "lineage.json").read_text())["stages"]
                             if x["stage"] == "sft")["output"]["path"])
        tc = transfer_check(work, init, sft_ckpt, sft_steps=8, opd_steps=24)
        headline["transfer_check"] = tc
        doms = list(tc["teacher"])
        ret = {d: tc["student_after"][d] / tc["teacher"][d] for d in doms if tc["teacher"][d] > 0}
        transfer_md = [
            "## OPD with a teacher that is better", "",
            "The experts above start from the student's own SFT model, so most of them are not much better than it. "
            "Here the teacher is clearly better: the student is the "
            "pre-trained model after only 8 SFT steps and its teacher (every domain) is the pipeline's "
            f"{SFT_STEPS}-step SFT model; OPD runs 24 steps as stage 3 does. Scores (100 x mean reward, {EVAL_N} "
            "held-out tasks per domain) and "
            "the exact reverse KL(student || teacher) per token on student samples of held-out prompts:", "",
            md_table(["", *doms, "reverse KL / token"],
                     [["student before OPD", *[tc["student_before"][d] for d in doms], tc["kl_before_after"][0]],
                      ["student after OPD", *[tc["student_after"][d] for d in doms], tc["kl_before_after"][1]],
                      ["teacher", *[tc["teacher"][d] for d in doms], 0.0]]), "",
            "Retention after OPD (student / teacher): "
            + (", ".join(f"{d} {100 * r:.0f}%" for d, r in ret.items()) or "n/a (teacher scores 0)") + ".", ""]
    body = report.read_text().split("\n", 1)[1].replace("![report](report.png)", "![report](posttrain_pipeline.png)")
    md = "\n".join([
        "# Post-training pipeline (tiny model, CPU)", "",
        f"`{command_line()}` on {machine()}; pre-trained init `{init}`.", "",
        "## Targets", "", *verdicts(s), "",
        *transfer_md,
        "## What the RL stages had to learn from", "",
        "GRPO learns only from groups whose samples get different rewards; per RL stage, the steps that had at least "
        "one such group:", "",
        md_table(["stage", "steps", "steps with an update", "samples trained on"], rl_signal(report.parent)), "",
        *expert_reading(s, cfg.eval.n_per_domain), "",
        "## Caveats", "",
        "The model is the 2 M-parameter tiny model ("
        + (f"the given checkpoint `{args.init}`" if args.init else f"{args.pretrain_steps} pre-training steps")
        + ", then the stages above) on a 2-core CPU; one seed; every score is a mean over "
        f"{cfg.eval.n_per_domain} held-out tasks per domain, so one task is {100 / cfg.eval.n_per_domain:.1f} points "
        "and differences of a task or two are noise. Diversity is measured on "
        f"{cfg.eval.diversity_prompts} open-ended prompts x {cfg.eval.diversity_samples} samples.", "",
        body])
    out.mkdir(parents=True, exist_ok=True)
    if (report.parent / "report.png").is_file():
        shutil.copy(report.parent / "report.png", out / "posttrain_pipeline.png")
    write_report("posttrain_pipeline", md, headline, out)


if __name__ == "__main__":
    main()
