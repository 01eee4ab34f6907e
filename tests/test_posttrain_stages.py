"""Post-training stage bookkeeping: when a finished stage is reused and when it is refused, the evaluation cache,
the report's diversity figures, and quickstart finding the pipeline's report."""

import json
from pathlib import Path

import pytest
from helpers import policy_checkpoint, tiny_model

from elastic_moe.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_stages(monkeypatch, tmp_path) -> dict[str, list]:
    """The pipeline with every stage's training replaced by saving a small random model (one per call): what is
    tested is which stages run, not what they learn."""
    import elastic_moe.opd
    import elastic_moe.posttrain as pt
    import elastic_moe.sft
    from elastic_moe.checkpoint import save_checkpoint

    calls: dict[str, list] = {"sft": [], "expert": [], "opd": [], "grpo": []}

    def ckpt(d, kind):
        calls[kind].append(d)
        return save_checkpoint(d / "checkpoints" / "step_00000001", tiny_model(seed=sum(map(len, calls.values()))))

    monkeypatch.setattr(elastic_moe.sft, "train_sft",
                        lambda cfg, d, log=None: {"checkpoint": str(ckpt(d, "sft")), "stopped_by": None})
    monkeypatch.setattr(pt, "_train_expert", lambda rc, d, threads, log=None: (str(ckpt(Path(d), "expert")), 0.0, 1))
    monkeypatch.setattr(elastic_moe.opd, "train_opd", lambda cfg, s, t, tasks, d, **k: ckpt(d, "opd"))
    monkeypatch.setattr(pt, "run_grpo", lambda init, tasks, cfg, d, log=print, name="general": ckpt(d, "grpo"))
    monkeypatch.setattr(pt, "evaluate_stages", lambda out, cfg, stages, log: (
        {n: {d: 50.0 for d in cfg.domains} for n in stages}, {}))
    return calls


def _cfg(init, *sets):
    from elastic_moe.posttrain import load_pipeline_config

    return load_pipeline_config(None, ["eval.n_per_domain=2", "eval.diversity_prompts=2", "opd_train_size=4",
                                       "general.train_size=4", "mixed.train_size=4", "expert.task.train_size=4",
                                       "expert.task.test_size=0", "experts_parallel=1",
                                       f"init={json.dumps(str(init))}", *sets])


@pytest.mark.parametrize("change", [["domains=['reasoning','code','open_ended']"], ["opd_train_size=8"],
                                    ["eval.difficulty=2"]])
def test_a_finished_opd_stage_is_not_reused_for_other_training_prompts(tmp_path, monkeypatch, change):
    """OPD distils on prompts of every domain (opd_train_size per domain, at eval.difficulty): a finished OPD stage
    trained on other prompts (a domain added: its new expert was never distilled) was taken as done."""
    from elastic_moe.posttrain import run_pipeline

    calls = _fake_stages(monkeypatch, tmp_path)
    init = policy_checkpoint(tmp_path)
    base = ["domains=['reasoning','open_ended']"]
    run_pipeline(_cfg(init, *base), tmp_path / "pipe", log=lambda _: None)
    assert len(calls["opd"]) == 1
    with pytest.raises(UserError, match="stage opd in .* other settings"):
        run_pipeline(_cfg(init, *base, *change), tmp_path / "pipe", log=lambda _: None)
    assert len(calls["opd"]) == 1


def test_general_and_mixed_stages_are_not_reused_for_other_training_prompts(tmp_path, monkeypatch):
    from elastic_moe.posttrain import run_pipeline

    calls = _fake_stages(monkeypatch, tmp_path)
    init = policy_checkpoint(tmp_path)
    base = ["domains=['reasoning','open_ended']", "baselines.weight_average=false"]
    run_pipeline(_cfg(init, *base), tmp_path / "pipe", quick=False, log=lambda _: None)
    assert len(calls["grpo"]) == 2  # general and the mixed baseline
    # the other domain swapped: as many samples (the mixed run's steps unchanged), other prompts
    (tmp_path / "pipe" / "opd" / "STAGE.json").unlink()
    (tmp_path / "pipe" / "general" / "STAGE.json").unlink()
    with pytest.raises(UserError, match="stage baseline_mixed_rl in .* other settings"):
        run_pipeline(_cfg(init, "domains=['code','open_ended']", "baselines.weight_average=false"), tmp_path / "pipe",
                     quick=False, log=lambda _: None)


def test_eval_cache_scores_the_domains_it_has_not_scored(tmp_path, monkeypatch):
    """The evaluation cache is keyed by checkpoint and eval settings, not by domains: a pipeline re-run with a domain
    more (its later stages removed, SFT kept) took the SFT model's cached scores, which lack it (KeyError)."""
    import elastic_moe.posttrain_report as pr
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.posttrain import PipelineConfig

    asked = []

    def fake_eval(ckpt, domains, ec):
        asked.append(list(domains))
        return {d: 10.0 for d in domains}

    monkeypatch.setattr(pr, "evaluate_domains", fake_eval)
    sft = save_checkpoint(tmp_path / "sft", tiny_model())
    out = tmp_path / "pipe"
    out.mkdir()
    cfg = PipelineConfig(domains=["reasoning", "open_ended"])
    pr.evaluate_stages(out, cfg, {"expert_reasoning": sft}, lambda _: None)
    cfg.domains = ["reasoning", "code", "open_ended"]
    scores, _ = pr.evaluate_stages(out, cfg, {"expert_reasoning": sft}, lambda _: None)
    assert set(scores["expert_reasoning"]) == {"reasoning", "code", "open_ended"}
    assert asked[-1] == ["code"]  # only what is missing
    pr.evaluate_stages(out, cfg, {"expert_reasoning": sft}, lambda _: None)
    assert len(asked) == 2


def test_a_rerun_with_its_config_file_keeps_the_saved_quick(tmp_path, monkeypatch):
    """`--quick`: "a re-run keeps the saved choice"; a re-run that names its config file again (as the README's
    command does) without --quick trained the baselines (as much compute as stages 2 + 3) on top of a quick run."""
    import elastic_moe.posttrain as pt
    from elastic_moe.cli import main

    out = tmp_path / "pipe"
    seen = []
    monkeypatch.setattr(pt, "run_pipeline", lambda cfg, out_dir, quick, init: seen.append(quick) or out_dir)
    out.mkdir()
    (out / "pipeline.json").write_text(json.dumps({"config": pt.load_pipeline_config().to_dict(), "quick": True}))
    assert main(["posttrain", str(pt.DEFAULT_CONFIG), "--out", str(out)]) == 0
    assert main(["posttrain", str(pt.DEFAULT_CONFIG), "--out", str(out), "--no-quick"]) == 0
    assert seen == [True, False]


def test_a_domain_listed_twice_is_refused():
    """domains = [reasoning, open_ended, reasoning] trained two experts but counted three in the rollout samples the
    mixed baseline is matched to (and OPD drew the reasoning prompts twice)."""
    from elastic_moe.posttrain import load_pipeline_config

    with pytest.raises(UserError, match="reasoning.*more than once"):
        load_pipeline_config(None, ["domains=['reasoning','open_ended','reasoning']"])


def test_r3_without_recorded_routes_is_refused():
    """grpo.r3 replays the experts the rollout recorded; with rollout.return_routes = false nothing is recorded and
    the trainer silently ran without R3 (the report still said "R3 on")."""
    from elastic_moe.rl_train import RLConfig

    cfg = RLConfig()
    cfg.grpo.r3, cfg.rollout.return_routes = True, False
    with pytest.raises(UserError, match="return_routes"):
        cfg.validate()
    cfg.grpo.r3 = False  # routes recorded only for the router-flip metrics, or not at all: both fine
    cfg.validate()


def test_distinct_n_gain_se_pairs_the_prompts_both_stages_were_scored_on():
    """Both stages' diversity is measured on the same open-ended prompts, so per-prompt values share the prompt's
    own effect; adding the two SEs in squares (as if independent) made a gain of 0.1 on every prompt look like noise
    (SE 0.24 instead of 0)."""
    from elastic_moe.posttrain_report import summarize

    def div(per_prompt):
        import statistics

        return {"distinct_2": sum(per_prompt) / len(per_prompt), "distinct_2_per_prompt": per_prompt,
                "distinct_2_se": statistics.stdev(per_prompt) / len(per_prompt) ** 0.5}

    scores = {n: {"open_ended": 10.0} for n in ("sft", "expert_open_ended", "opd", "general")}
    s = summarize(["open_ended"], scores, {"opd": div([0.2, 0.5, 0.8]), "general": div([0.3, 0.6, 0.9])}, {})
    assert s["distinct_n_gain_stage4"] == pytest.approx(0.1)
    assert s["distinct_n_gain_stage4_se"] == pytest.approx(0.0, abs=1e-9)
    s = summarize(["open_ended"], scores, {"opd": div([0.2, 0.5, 0.8]), "general": div([0.4, 0.6, 0.8])}, {})
    assert s["distinct_n_gain_stage4_se"] == pytest.approx(0.1 / 3 ** 0.5)  # stdev of (0.2, 0.1, 0) / sqrt 3


def test_report_lists_per_prompt_diversity_only_in_report_json(tmp_path):
    """(With the fix above: the per-prompt values kept for the paired SE are no column of the table.)"""
    from elastic_moe.posttrain import PipelineConfig
    from elastic_moe.posttrain_report import write_report

    cfg = PipelineConfig(domains=["open_ended"])
    stages = {"sft": tmp_path, "opd": tmp_path}
    scores = {n: {"open_ended": 1.0} for n in (*stages, "expert_open_ended")}
    diversity = {n: {"distinct_2": 0.5, "distinct_2_se": 0.1, "distinct_2_per_prompt": [0.4, 0.6]} for n in stages}
    summary = {"compute": {"experts_samples": 1, "opd_samples": 1, "general_samples": 1},
               "retention": {"open_ended": None}}
    text = write_report(tmp_path, cfg, stages, scores, diversity, summary).read_text()
    assert "| checkpoint | distinct_2 | distinct_2_se |" in text


def test_quickstart_finds_its_post_training_report_however_out_is_spelled(tmp_path, capsys, monkeypatch):
    """The posttrain marker kept the report's path as --out was spelled: run again with --out spelled another way
    (or from another folder), the finished quickstart crashed in `relative_to`."""
    from helpers import tiny_model

    from elastic_moe import posttrain
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.cli import main
    from elastic_moe.commands import quickstart

    out = tmp_path / "qs"
    save_checkpoint(out / "pretrain" / "checkpoints" / "step_00000001", tiny_model())
    monkeypatch.setattr(quickstart, "_cli", lambda *argv: None)  # pre-training, family, extraction: stand-ins

    def pipeline(init, out_dir):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps({"scores": {"sft": {"code": 12.5}},
                                                         "order": {"stages": ["sft"], "domains": ["code"]}}))
        (out_dir / "report.md").write_text("# post-training\n")
        return out_dir / "report.md"

    monkeypatch.setattr(posttrain, "run_quickstart_posttrain", pipeline)
    monkeypatch.chdir(tmp_path)
    for spelled, cwd in (("qs", tmp_path), (str(out), tmp_path), ("..", out / "pretrain")):
        monkeypatch.chdir(cwd)
        assert main(["quickstart", "--out", spelled]) == 0, capsys.readouterr().err
        report = (out / "report.md").read_text()
        assert "[posttrain/report.md](posttrain/report.md)" in report and "| code | 12.5 |" in report


def test_a_finished_stage_with_a_new_or_removed_input_is_refused(tmp_path):
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.lineage import run_stage

    student = save_checkpoint(tmp_path / "student", tiny_model())
    teacher = save_checkpoint(tmp_path / "teacher", tiny_model(seed=1))
    made = []

    def train(stage_dir):
        made.append(stage_dir)
        return save_checkpoint(stage_dir / "checkpoints" / "step_00000001", tiny_model(seed=2))

    out, cfg = tmp_path / "pipe", {"lr": 0.1}
    inputs = {"student": student, "teacher_code": teacher}
    first = run_stage(out, "opd", inputs, cfg, train, print)
    assert run_stage(out, "opd", dict(inputs), cfg, train, print) == first and len(made) == 1  # same inputs: reused
    with pytest.raises(UserError, match=r"^stage opd in .* other settings \(input teacher_reasoning is new\): use"):
        run_stage(out, "opd", {**inputs, "teacher_reasoning": teacher}, cfg, train, print)
    with pytest.raises(UserError, match=r"\(input teacher_code is gone\)"):
        run_stage(out, "opd", {"student": student}, cfg, train, print)
    assert len(made) == 1


def test_the_general_stage_is_not_reused_after_the_opd_model_changed(tmp_path, monkeypatch):
    """Stage 4 (general RL) is built on the OPD model: its lineage names the OPD output as its input, and once OPD
    is trained again (another checkpoint) the finished general stage is refused rather than reused."""
    from elastic_moe.posttrain import run_pipeline

    calls = _fake_stages(monkeypatch, tmp_path)
    init = policy_checkpoint(tmp_path)
    cfg = _cfg(init, "domains=['reasoning','open_ended']")
    pipe = tmp_path / "pipe"
    run_pipeline(cfg, pipe, log=lambda _: None)
    lineage = {s["stage"]: s for s in json.loads((pipe / "lineage.json").read_text())["stages"]}
    assert lineage["general"]["inputs"]["init"] == lineage["opd"]["output"]
    (pipe / "opd" / "STAGE.json").unlink()
    with pytest.raises(UserError, match=r"stage general in .* other settings \(input init is another checkpoint\)"):
        run_pipeline(cfg, pipe, log=lambda _: None)
    assert len(calls["opd"]) == 2 and len(calls["grpo"]) == 1


def test_a_stage_trained_again_has_one_lineage_record(tmp_path):
    """A stage removed and trained again replaces its record in lineage.json (one record per stage, the new
    output), so the pipeline's stage time counts it once."""
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.lineage import STAGE_FILE, run_stage, stage_seconds

    init = save_checkpoint(tmp_path / "init", tiny_model())
    seeds = iter([1, 2])

    def train(stage_dir):
        return save_checkpoint(stage_dir / "checkpoints" / f"step_0000000{next(seeds)}", tiny_model(seed=3))

    out = tmp_path / "pipe"
    run_stage(out, "sft", {"init": init}, {"lr": 0.1}, train, lambda _: None)
    (out / "sft" / STAGE_FILE).unlink()
    second = run_stage(out, "sft", {"init": init}, {"lr": 0.1}, train, lambda _: None)
    stages = json.loads((out / "lineage.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["sft"] and stages[0]["output"]["path"] == str(second)
    assert stage_seconds(out) == stages[0]["time_s"]
