"""Post-training pipeline: config loading, the diversity bonus, weight averaging, the headline numbers, and the four
stages end to end on a tiny model with lineage, a report, baselines, and every stage skipped on a second run."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import policy_checkpoint, tiny_model

from elastic_moe.errors import UserError
from elastic_moe.posttrain import (
    DEFAULT_CONFIG,
    PipelineConfig,
    average_weights,
    load_pipeline_config,
    novelty,
    run_pipeline,
)
from elastic_moe.posttrain_report import summarize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_packaged_config_loads_and_matches_the_repo_copy():
    from pathlib import Path

    cfg = load_pipeline_config()
    assert isinstance(cfg, PipelineConfig) and cfg.opd.loss.kind == "full"
    repo = Path(__file__).parents[1] / "configs" / "posttrain_tiny.toml"
    assert repo.read_text() == DEFAULT_CONFIG.read_text()
    with pytest.raises(UserError, match="open_ended"):
        load_pipeline_config(None, ["domains=['reasoning']"])
    with pytest.raises(UserError, match="unknown config key"):
        load_pipeline_config(None, ["opd.nope=1"])
    # numbers first used hours later (OPD after the experts, evaluation after every stage) fail at load
    for override, words in (("opd_train_size=0", "opd_train_size"), ("eval.diversity_samples=1", "diversity_samples"),
                            ("eval.n_per_domain=0", "n_per_domain"), ("general.temperature=0", "temperature")):
        with pytest.raises(UserError, match=words):
            load_pipeline_config(None, [override])


def test_novelty_rewards_unlike_samples():
    same = novelty(["the cat sat on the mat"] * 3)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in same)
    mixed = novelty(["the cat sat on the mat", "the cat sat on the mat", "green ideas sleep furiously tonight"])
    assert mixed[2] > 0.9 and mixed[0] < mixed[2]


def test_summarize_retention_seesaw_and_stage4_drop():
    doms = ["reasoning", "open_ended"]
    scores = {"sft": {"reasoning": 10, "open_ended": 40}, "expert_reasoning": {"reasoning": 20, "open_ended": 30},
              "expert_open_ended": {"reasoning": 5, "open_ended": 0}, "opd": {"reasoning": 19, "open_ended": 45},
              "general": {"reasoning": 18, "open_ended": 47}, "mixed_rl": {"reasoning": 15, "open_ended": 35}}
    div = {"opd": {"distinct_2": 0.5, "distinct_2_se": 0.03}, "general": {"distinct_2": 0.6, "distinct_2_se": 0.04}}
    s = summarize(doms, scores, div, {})
    assert s["retention"] == {"reasoning": pytest.approx(0.95), "open_ended": None}
    assert s["min_teacher_retention"] == pytest.approx(0.95)
    assert s["max_domain_drop_stage4"] == pytest.approx(1.0)
    assert s["distinct_n_gain_stage4"] == pytest.approx(0.1)
    assert s["distinct_n_gain_stage4_se"] == pytest.approx(0.05)  # independent samples: SEs add in squares
    assert s["seesaw_baseline"] and s["seesaw_baseline_max_drop"] == pytest.approx(5.0)


def test_weight_average_is_the_mean(tmp_path):
    from helpers import tiny_model

    from elastic_moe.checkpoint import load_checkpoint, save_checkpoint

    a, b = tiny_model(seed=0), tiny_model(seed=1)
    (tmp_path / "tok").mkdir()
    pa = save_checkpoint(tmp_path / "a", a, tokenizer_dir=tmp_path / "tok")
    pb = save_checkpoint(tmp_path / "b", b, tokenizer_dir=tmp_path / "tok")
    avg, _ = load_checkpoint(average_weights([pa, pb], tmp_path / "avg"))
    torch.testing.assert_close(avg.embed.weight, (a.embed.weight + b.embed.weight) / 2)


def _tiny_pipeline(init) -> PipelineConfig:
    sets = ["sft.data.n_per_domain=8", "sft.data.heldout_per_domain=2", "sft.train.max_steps=2", "sft.train.batch_size=4",
            "expert.task.train_size=4", "expert.train.max_steps=1", "expert.train.prompts_per_step=2",
            "expert.rollout.group_size=2", "expert.rollout.max_new_tokens=6", "experts_parallel=1",
            "opd.steps=2", "opd.prompts_per_step=2", "opd.max_new_tokens=6", "opd_train_size=4",
            "general.steps=1", "general.prompts_per_step=2", "general.group_size=2", "general.max_new_tokens=6",
            "general.train_size=4", "mixed.prompts_per_step=2", "mixed.group_size=2", "mixed.max_new_tokens=6",
            "mixed.train_size=4", "eval.n_per_domain=2", "eval.max_new_tokens=6", "eval.diversity_prompts=2",
            "eval.diversity_samples=2", f"init={json.dumps(str(init))}"]
    return load_pipeline_config(None, sets)


@pytest.mark.slow
@pytest.mark.ci_sample  # `-m "... ci_sample"` selects by marker, not by name
def test_pipeline_ci_sample_end_to_end_lineage_and_skip(tmp_path):

    init = policy_checkpoint(tmp_path)
    cfg = _tiny_pipeline(init)
    logs: list[str] = []
    report = run_pipeline(cfg, tmp_path / "pt", quick=False, log=logs.append)
    out = tmp_path / "pt"
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    assert "| reasoning |" in text and "retention" in text and "mixed_rl" in text and "weight_avg" in text
    lineage = {s["stage"]: s for s in json.loads((out / "lineage.json").read_text())["stages"]}
    stages = ["sft", "expert_reasoning", "expert_code", "expert_open_ended", "opd", "general", "baseline_mixed_rl",
              "baseline_weight_average"]
    assert sorted(lineage) == sorted(stages)
    assert lineage["sft"]["inputs"]["init"]["path"] == str(init)
    assert lineage["opd"]["inputs"]["student"] == lineage["sft"]["output"]
    assert lineage["opd"]["inputs"]["teacher_code"] == lineage["expert_code"]["output"]
    assert lineage["general"]["inputs"]["init"] == lineage["opd"]["output"]
    assert all(len(s["output"]["sha256"]) == 64 and len(s["config_sha256"]) == 64 for s in lineage.values())
    summary = json.loads((out / "report.json").read_text())
    for k in ("min_teacher_retention", "seesaw_baseline_max_drop", "distinct_n_gain_stage4", "max_domain_drop_stage4"):
        assert k in summary
    assert all(f"Warning: `{n}` has exactly the weights" in text for n in summary["unchanged_stages"])
    # the mixed baseline gets the rollout samples of stages 2 + 3
    c = summary["compute"]
    assert c["mixed_samples"] >= c["experts_samples"] + c["opd_samples"]
    # a second run skips every stage and every evaluation; a stage left out of lineage.json (a kill between its
    # STAGE.json and the lineage) is put back; the stages' time is the one they took, not this session's
    lineage_file = out / "lineage.json"
    whole = json.loads(lineage_file.read_text())
    lineage_file.write_text(json.dumps({"stages": [x for x in whole["stages"] if x["stage"] != "sft"]}))
    logs.clear()
    run_pipeline(cfg, out, quick=False, log=logs.append)
    assert sum("done already" in x for x in logs) == len(stages) and not any("[eval]" in x for x in logs)
    assert sorted(x["stage"] for x in json.loads(lineage_file.read_text())["stages"]) == sorted(stages)
    assert json.loads((out / "report.json").read_text())["stages_s"] == summary["stages_s"] > 0


def test_posttrain_command_refuses_a_missing_init(tmp_path, capsys):
    from elastic_moe import cli

    assert cli.main(["posttrain", "--out", str(tmp_path / "x"), "--quick"]) == 2
    assert "no pre-trained checkpoint" in capsys.readouterr().err


def test_opd_and_grpo_stage_loops_resume_from_their_checkpoints(tmp_path):

    from elastic_moe.metrics import read_metrics
    from elastic_moe.opd import OPDStageConfig, train_opd
    from elastic_moe.posttrain import GRPOStageConfig, run_grpo
    from elastic_moe.tasks import get_suite

    init = policy_checkpoint(tmp_path)
    tasks = get_suite("open_ended", "train", 4, seed=0)
    logs: list[str] = []
    opd = OPDStageConfig(steps=1, prompts_per_step=2, max_new_tokens=4)
    train_opd(opd, init, {"open_ended": str(init)}, tasks, tmp_path / "opd", log=logs.append)
    opd.steps = 2  # as if the first run had been interrupted after step 1
    final = train_opd(opd, init, {"open_ended": str(init)}, tasks, tmp_path / "opd", log=logs.append)
    assert "resuming" in logs[-2] and final.name == "step_00000002"
    assert [r["step"] for r in read_metrics(tmp_path / "opd")] == [1, 2]
    # resumed again, saving at every step: the checkpoint it resumed from is pruned after the next save, and the
    # saves after that still carry the tokenizer
    opd.steps, opd.save_every = 4, 1
    final = train_opd(opd, init, {"open_ended": str(init)}, tasks, tmp_path / "opd", log=logs.append)
    assert final.name == "step_00000004" and (final / "tokenizer" / "tokenizer.json").is_file()
    report = (tmp_path / "opd" / "report.md").read_text()  # the whole run's curves, resumed sessions included
    assert "steps logged: 4" in report and "- KL, open_ended: " in report and "at step 4" in report
    g = GRPOStageConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, diversity_weight=0.5)
    run_grpo(init, tasks, g, tmp_path / "g", log=logs.append)
    g.steps = 2
    final = run_grpo(init, tasks, g, tmp_path / "g", log=logs.append)
    assert any("grpo: resuming" in x for x in logs) and final.name == "step_00000002"
    rows = read_metrics(tmp_path / "g")
    assert [r["step"] for r in rows] == [1, 2] and "div/distinct_2" in rows[0]
    assert sorted(p.name for p in (tmp_path / "g" / "checkpoints").iterdir()) == ["step_00000002"]
    g.steps, g.save_every = 4, 1
    final = run_grpo(init, tasks, g, tmp_path / "g", log=logs.append)
    assert final.name == "step_00000004" and (final / "tokenizer" / "tokenizer.json").is_file()
    report = (tmp_path / "g" / "report.md").read_text()
    assert "steps logged: 4" in report and "- task reward (mean): " in report and "- distinct-2: " in report
    assert (tmp_path / "g" / "curve.png").is_file() and (tmp_path / "opd" / "curve.png").is_file()


def test_stage_loops_resumed_past_their_steps_return_their_latest_checkpoint(tmp_path):
    """A stage resumed with fewer steps than its checkpoint has trains nothing and hands over that checkpoint: not a
    new one labelled with the smaller step (weights of the later one), which the pruning then removed at once."""
    from elastic_moe.opd import OPDStageConfig, train_opd
    from elastic_moe.posttrain import GRPOStageConfig, run_grpo
    from elastic_moe.tasks import get_suite

    init = policy_checkpoint(tmp_path)
    tasks = get_suite("open_ended", "train", 4, seed=0)
    logs: list[str] = []
    g = GRPOStageConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4)
    assert run_grpo(init, tasks, g, tmp_path / "g", log=logs.append).name == "step_00000002"
    g.steps = 1
    final = run_grpo(init, tasks, g, tmp_path / "g", log=logs.append)
    assert final.name == "step_00000002" and final.is_dir() and "nothing to train" in logs[-1]
    opd = OPDStageConfig(steps=2, prompts_per_step=2, max_new_tokens=4)
    train_opd(opd, init, {"open_ended": str(init)}, tasks, tmp_path / "opd", log=logs.append)
    opd.steps = 1
    final = train_opd(opd, init, {"open_ended": str(init)}, tasks, tmp_path / "opd", log=logs.append)
    assert final.name == "step_00000002" and final.is_dir() and "nothing to train" in logs[-1]


def test_grpo_stage_drops_failed_verifications_instead_of_scoring_them_zero(tmp_path, monkeypatch):
    from elastic_moe import grpo_trainer
    from elastic_moe.metrics import read_metrics
    from elastic_moe.posttrain import GRPOStageConfig, run_grpo
    from elastic_moe.tasks import Verdict, get_suite

    seen = []
    real_step = grpo_trainer.GRPOTrainer.step

    def step(self, batch, rewards):
        seen.append(list(rewards))
        return real_step(self, batch, rewards)

    monkeypatch.setattr(grpo_trainer.GRPOTrainer, "step", step)
    monkeypatch.setattr("elastic_moe.tasks.verify", lambda task, text: Verdict.infra_error("verifier crashed"))
    tasks = get_suite("open_ended", "train", 4, seed=0)
    g = GRPOStageConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4, diversity_weight=0.5)
    run_grpo(policy_checkpoint(tmp_path), tasks, g, tmp_path / "g", log=lambda _: None)
    assert seen == [[None] * 4]  # neither 0 nor a diversity bonus on top of a failed verification
    assert read_metrics(tmp_path / "g")[0]["reward/infra_errors"] == 4


def test_grpo_stage_kl_penalty_is_towards_its_init(tmp_path):
    from elastic_moe.metrics import read_metrics
    from elastic_moe.posttrain import GRPOStageConfig, run_grpo
    from elastic_moe.tasks import get_suite

    g = GRPOStageConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4, lr=1e-2, diversity_weight=0.5)
    g.grpo.kl_coef, g.grpo.kl_kind = 0.1, "k2"
    run_grpo(policy_checkpoint(tmp_path), get_suite("open_ended", "train", 4, seed=0), g, tmp_path / "g",
             log=lambda _: None)
    kl = [r.get("loss/kl_ref") for r in read_metrics(tmp_path / "g")]
    assert kl[0] == pytest.approx(0, abs=1e-9)  # the first step's policy is the reference itself


def test_a_finished_stage_is_reused_only_with_its_settings_and_inputs(tmp_path):
    """A stage finished with other settings, or from another input checkpoint, is refused in one line (the stages
    after it were built on it); a moved pipeline folder finds its stages' checkpoints in their new place."""
    import shutil

    from helpers import tiny_model

    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.lineage import run_stage

    init = save_checkpoint(tmp_path / "init", tiny_model())
    made = []

    def train(stage_dir):
        made.append(stage_dir)
        return save_checkpoint(stage_dir / "checkpoints" / "step_00000001", tiny_model(seed=2))

    out = tmp_path / "pipe"
    cfg = {"init": str(init), "lr": 0.1, "loss": {"kind": "full"}}
    first = run_stage(out, "sft", {"init": init}, cfg, train, print)
    assert run_stage(out, "sft", {"init": init}, cfg, train, print) == first and len(made) == 1
    with pytest.raises(UserError, match=r"^stage sft in .* other settings \(loss.kind full -> sampled\): use another"):
        run_stage(out, "sft", {"init": init}, {**cfg, "loss": {"kind": "sampled"}}, train, print)
    other = save_checkpoint(tmp_path / "other", tiny_model(seed=1))
    with pytest.raises(UserError, match=r"\(input init is another checkpoint\)"):
        run_stage(out, "sft", {"init": other}, {**cfg, "init": str(other)}, train, print)
    moved = out.rename(tmp_path / "moved")
    assert run_stage(moved, "sft", {"init": init}, cfg, train, print) == moved / "sft" / "checkpoints" / "step_00000001"
    shutil.rmtree(moved / "sft" / "checkpoints")
    with pytest.raises(UserError, match="marked finished but its checkpoint .* is missing"):
        run_stage(moved, "sft", {"init": init}, cfg, train, print)
    assert len(made) == 1


@pytest.mark.parametrize("override, words", [
    ("opd.lr=-1", "opd: lr and temperature must be > 0"),
    ("sft.train.max_steps=0", "each stage hands its trained model to the next"),
    ("opd.max_new_tokens=100000", "opd.max_new_tokens = 100000: with the longest prompt"),
    ("expert.rollout.max_new_tokens=100000", "expert.rollout.max_new_tokens = 100000"),
    ("general.max_new_tokens=100000", "general.max_new_tokens = 100000"),
    ("eval.max_new_tokens=100000", "eval.max_new_tokens = 100000"),
])
def test_settings_a_later_stage_would_fail_on_are_refused_before_stage_1(tmp_path, override, words):
    cfg = _tiny_pipeline(policy_checkpoint(tmp_path))
    with pytest.raises(UserError, match=words):
        run_pipeline(load_pipeline_config(None, [f"init={json.dumps(cfg.init)}", override]), tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def test_a_bad_init_checkpoint_is_refused_before_the_pipeline_folder_is_made(tmp_path):
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_a_checkpoint" / "config.json").write_text('{"model_type": "ernie4_5_moe"}')
    for init, words in ((tmp_path / "not_a_checkpoint", "is neither a checkpoint"),
                        (tmp_path / "missing", "checkpoint not found")):
        with pytest.raises(UserError, match=words):
            run_pipeline(DEFAULT_CONFIG, tmp_path / "pipe", init=init)
        assert not (tmp_path / "pipe").exists()


def test_unchanged_stages_are_those_with_their_inputs_weights(tmp_path):
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.posttrain import unchanged_stages

    a, b = tiny_model(seed=0), tiny_model(seed=1)
    ck = {name: save_checkpoint(tmp_path / name, model) for name, model in
          (("sft", a), ("expert_code", a), ("expert_reasoning", b), ("opd", b), ("general", b))}
    assert unchanged_stages(ck) == ["expert_code", "general"]
    ck["general"] = save_checkpoint(tmp_path / "general2", a)
    assert unchanged_stages(ck) == ["expert_code"]


def test_a_rerun_with_out_alone_takes_the_pipelines_own_settings(tmp_path, capsys):
    from elastic_moe.cli import main

    out = tmp_path / "pipe"
    out.mkdir()
    cfg = _tiny_pipeline(tmp_path / "gone").to_dict()  # its init has gone: the error shows whose settings were read
    (out / "pipeline.json").write_text(json.dumps({"config": cfg, "quick": True}))
    seen = {}

    def fake_run_pipeline(cfg, out_dir, quick, init):
        seen.update(init=cfg.init, quick=quick)
        return out_dir

    import elastic_moe.posttrain as pt

    orig = pt.run_pipeline
    pt.run_pipeline = fake_run_pipeline
    try:
        assert main(["posttrain", "--out", str(out)]) == 0  # the saved --quick too
        assert seen == {"init": str(tmp_path / "gone"), "quick": True}
        assert main(["posttrain", "--out", str(out), "--no-quick"]) == 0 and seen["quick"] is False
    finally:
        pt.run_pipeline = orig
    assert main(["posttrain", "--out", str(out), "--quick"]) == 2
    captured = capsys.readouterr()
    assert f"settings from {out / 'pipeline.json'}" in captured.out and "checkpoint not found" in captured.err
    (out / "pipeline.json").write_text("[1]")
    assert main(["posttrain", "--out", str(out), "--quick"]) == 2
    assert "pipeline.json is corrupt" in capsys.readouterr().err


def test_a_resumed_pipeline_says_which_settings_changed(tmp_path, monkeypatch):
    """An unfinished stage (OPD, general RL) goes on from its checkpoint with the settings of the new session: the
    pipeline says which settings differ from the last session's, as the training commands do."""
    import elastic_moe.sft

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(elastic_moe.sft, "train_sft", stop)  # the note comes before stage 1
    cfg = _tiny_pipeline(policy_checkpoint(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "pipe", log=lambda _: None)
    cfg.general.lr, logs = 1e-3, []
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "pipe", log=logs.append)
    assert any(x.startswith("note: settings changed") and "general.lr 0.0002 -> 0.001" in x for x in logs)


def test_summarize_min_retention_is_the_worst_domain_and_seesaw_needs_a_gain_and_a_drop():
    """min_teacher_retention is the lowest retention over the domains; the mixed baseline "seesaws" only when it
    improves some domain over SFT while another falls below SFT."""
    from elastic_moe.posttrain_report import summarize

    doms = ["reasoning", "code"]

    def scores(mixed):
        return {"sft": {"reasoning": 10, "code": 10}, "expert_reasoning": {"reasoning": 20, "code": 0},
                "expert_code": {"reasoning": 0, "code": 10}, "opd": {"reasoning": 19, "code": 5},
                "general": {"reasoning": 19, "code": 5}, "mixed_rl": mixed}

    s = summarize(doms, scores({"reasoning": 15, "code": 12}), {}, {})  # better everywhere: no seesaw
    assert s["retention"] == {"reasoning": pytest.approx(0.95), "code": pytest.approx(0.5)}
    assert s["min_teacher_retention"] == pytest.approx(0.5)
    assert s["seesaw_baseline"] is False
    assert summarize(doms, scores({"reasoning": 8, "code": 9}), {}, {})["seesaw_baseline"] is False  # worse everywhere
    assert summarize(doms, scores({"reasoning": 15, "code": 9}), {}, {})["seesaw_baseline"] is True


def test_weight_average_of_three_experts_is_their_mean(tmp_path):
    """The weight-average baseline is the element-wise mean of every expert's weights (three domains: three)."""
    from elastic_moe.checkpoint import load_checkpoint, save_checkpoint
    from elastic_moe.posttrain import average_weights

    (tmp_path / "tok").mkdir()
    models = [tiny_model(seed=s) for s in range(3)]
    paths = [save_checkpoint(tmp_path / f"e{i}", m, tokenizer_dir=tmp_path / "tok") for i, m in enumerate(models)]
    avg, _ = load_checkpoint(average_weights(paths, tmp_path / "avg"))
    torch.testing.assert_close(avg.embed.weight, sum(m.embed.weight for m in models) / 3)
    i = avg.moe_layers[0]
    torch.testing.assert_close(avg.moe(i).bias, sum(m.moe(i).bias for m in models) / 3)
