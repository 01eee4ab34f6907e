"""The `pretrain` command end to end: outputs, exact resume (also after SIGTERM and kill -9), gradient accumulation,
compiled layers and activation checkpointing, elastic schemes, torchrun with two ranks, and one-line errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import micro_config, sigterm_when_logged, tiny_model, write_micro_toml, write_synthetic_corpus

from elastic_moe import cli
from elastic_moe.checkpoint import load_checkpoint, save_checkpoint
from elastic_moe.distributed import fsdp2_runs_on_cpu
from elastic_moe.elastic import FULL
from elastic_moe.errors import UserError
from elastic_moe.metrics import MetricsSink, plot_losses, read_metrics
from elastic_moe.spec import SubModelSpec
from elastic_moe.tomlconfig import load_config
from elastic_moe.train import DEFAULT_CONFIG, TrainConfig, dump_toml, objective, train

ROOT = Path(__file__).resolve().parents[1]

# the shared micro config, smaller and checkpointing every 3 steps; device "cpu" because the bit-exact checks hold
# on CPU (CUDA's index_add_ is not deterministic)
MICRO = micro_config({"model.num_hidden_layers": 3, "data.heldout_frac": 0.1, "train.max_steps": 6,
                      "train.batch_size": 4, "train.save_every": 3, "elastic.layer_policy": "importance",
                      "elastic.reorder_every": 2, "eval.every": 3})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic corpus, a shared tokenizer/shard cache and the micro config pointing at both."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_synthetic_corpus(root / "corpus", docs=80, max_lines=40)
    toml = write_micro_toml(root / "micro.toml", MICRO, corpus, root / "cache")
    return {"root": root, "corpus": corpus, "toml": toml, "cache": root / "cache"}


pytestmark = pytest.mark.usefixtures("one_thread")


def micro(setup, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, setup["toml"], list(overrides))


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def evals(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["eval/full/loss"]) for r in read_metrics(run_dir) if "eval/full/loss" in r]


def final_weights(run_dir) -> dict:
    model, meta = load_checkpoint(run_dir)
    return {"step": meta["step"], **model.state_dict()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]) if k == "step" else torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------- in-process runs


def test_run_outputs_and_resume_is_exact(setup, tmp_path):
    ref = train(micro(setup), tmp_path / "ref")
    assert ref["step"] == 6 and not ref["interrupted"]
    rows = read_metrics(tmp_path / "ref")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "tokens", "lr", "grad_norm", "tokens_per_s", "load/max_over_mean", "frac_full", "loss_full"):
        assert key in rows[-1], key
    assert rows[-1]["tokens"] == 6 * 4 * 16
    assert "eval/full/loss" in rows[2] and "eval/L2-E2-k1/loss" in rows[5]
    assert rows[-1]["loss"] < rows[0]["loss"]
    out = tmp_path / "ref"
    assert (out / "report.md").is_file() and (out / "loss.png").is_file()
    assert "| full |" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert (out / "checkpoints" / "step_00000006" / "tokenizer" / "tokenizer.json").is_file()
    assert load_config(TrainConfig, out / "config.toml") == micro(setup)

    # stop after the first checkpoint (same schedule), then the same call again: identical trajectory and weights
    first = train(micro(setup, "train.max_steps=3", "optim.schedule_steps=6"), tmp_path / "two")
    assert first["step"] == 3
    again = train(micro(setup), tmp_path / "two")
    assert again["step"] == 6
    assert losses(tmp_path / "two") == losses(out)
    assert evals(tmp_path / "two") == evals(out)
    assert_same_weights(final_weights(tmp_path / "two"), final_weights(out))
    def loss_line(run):
        return next(line for line in (run / "report.md").read_text().splitlines() if "final training loss" in line)

    assert loss_line(tmp_path / "two") == loss_line(out)  # the resumed run reports all its steps, not its session's
    report = (out / "report.md").read_text()
    said = []  # the finished run again: nothing to train, and it says so; its report stays as it was
    assert train(micro(setup), out, log=said.append)["step"] == 6
    assert any("already at step 6, at or past max_steps 6" in line for line in said)
    assert (out / "report.md").read_text() == report
    said.clear()  # more steps stretch the cosine schedule: the learning rate jumps, and the resume says by how much
    assert train(micro(setup, "train.max_steps=8"), out, log=said.append)["step"] == 8
    assert any("schedule now spans 8 steps instead of 6: at step 6 the lr goes from" in line for line in said)


def test_resume_on_another_corpus_is_refused_and_keeps_the_runs_settings(setup, tmp_path):
    out = tmp_path / "run"
    train(micro(setup, "train.max_steps=3"), out)
    saved = {n: (out / n).read_bytes() for n in ("config.json", "config.toml")}
    other = write_synthetic_corpus(tmp_path / "other", docs=60, max_lines=30)
    with pytest.raises(UserError, match="data stream state does not match"):
        train(micro(setup, "train.max_steps=6", f"data.path={other}"), out)
    assert {n: (out / n).read_bytes() for n in saved} == saved  # still the settings its checkpoint was trained with


def test_a_corpus_path_that_is_not_utf8_is_a_one_line_error_before_anything_is_written(setup, tmp_path):
    # config.toml (UTF-8, as TOML is) cannot hold it: before, the run folder was left with config.json and a
    # tokenizer but no config.toml, after a UnicodeEncodeError traceback
    import os
    import shutil

    odd = os.fsdecode(bytes(tmp_path) + b"/corp\xff")
    shutil.copytree(setup["corpus"], odd)
    cfg = micro(setup)
    cfg.data.path = odd  # as `--data` gives it (argv is decoded with os.fsdecode)
    with pytest.raises(UserError, match="config key data.path: .* is not UTF-8 text"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sigterm_checkpoints_and_resumes(setup, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref"
    train(micro(setup, "train.save_every=0"), ref)
    signal_at = sigterm_when_logged(monkeypatch, 4)
    run = tmp_path / "run"
    # the signal lands while step 4 is logged: step 5 finishes, is checkpointed, and the command stops: 143
    code = cli.main(["pretrain", str(setup["toml"]), "--out", str(run), "--set", "train.save_every=0"])
    err = capsys.readouterr().err.strip()
    assert code == 143 and err == "elastic-moe pretrain: interrupted by SIGTERM (stopped at step 5 with a checkpoint; " \
        "run the same command again to resume)", err
    assert (run / "checkpoints" / "step_00000005").is_dir()
    assert "**Stopped at step 5 of 6**" in (run / "report.md").read_text()  # the report so far
    signal_at.clear()
    assert cli.main(["pretrain", "--out", str(run)]) == 0  # no CONFIG: the run's own config.toml
    assert losses(run) == losses(ref)
    assert_same_weights(final_weights(run), final_weights(ref))


def test_grad_accumulation_matches_a_bigger_batch(setup, tmp_path):
    a = train(micro(setup, "train.max_steps=3", "train.save_every=0", "elastic.p_full=1.0"), tmp_path / "a")
    b = train(micro(setup, "train.max_steps=3", "train.save_every=0", "elastic.p_full=1.0", "train.batch_size=2",
                    "train.grad_accum=2"), tmp_path / "b")
    assert a["tokens"] == b["tokens"]
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [s for s, _ in la] == [s for s, _ in lb]
    torch.testing.assert_close([x for _, x in la], [x for _, x in lb], rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_and_compiled_layers_follow_the_eager_trajectory(setup, tmp_path):
    """train.activation_checkpointing recomputes the same float32 ops (identical losses); train.compile traces the
    layers (aot_eager: the traced graphs without generated code) through per-sequence sub-models with their varying
    row counts and per-row top-k, expert-importance hooks, evaluation and a resume."""
    from torch._dynamo.utils import counters

    base = micro(setup, "train.max_steps=4", "train.save_every=2", "eval.every=2")
    train(base, tmp_path / "eager")
    train(micro(setup, "train.max_steps=4", "train.save_every=2", "eval.every=2", "train.activation_checkpointing=true"),
          tmp_path / "ac")
    assert losses(tmp_path / "ac") == losses(tmp_path / "eager")
    compiled = ("train.compile=true", "train.compile_backend='aot_eager'")
    counters.clear()
    said = []
    train(micro(setup, "train.max_steps=2", "train.save_every=2", "eval.every=2", "optim.schedule_steps=4", *compiled),
          tmp_path / "compiled", log=said.append)
    assert "train.compile: the first steps compile the layers (aot_eager); later steps reuse the graphs" in said
    train(micro(setup, "train.max_steps=4", "train.save_every=2", "eval.every=2", *compiled), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    got, want = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert [s for s, _ in got] == [s for s, _ in want]
    torch.testing.assert_close([x for _, x in got], [x for _, x in want], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close([x for _, x in evals(tmp_path / "compiled")], [x for _, x in evals(tmp_path / "eager")],
                               rtol=1e-5, atol=1e-5)
    # the expert importance scores (the hooks' routing mass, summed at each reorder) agree with the eager run's
    scores = [torch.load(run / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=True)["elastic"]["score"]
              for run in (tmp_path / "compiled", tmp_path / "eager")]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)


def test_compile_backend_is_checked(setup, tmp_path, capsys):
    assert cli.main(["pretrain", str(setup["toml"]), "--out", str(tmp_path / "x"), "--set", "train.compile=true",
                     "--set", "train.compile_backend='inductr'"]) == 2
    err = capsys.readouterr().err
    assert "train.compile_backend = 'inductr': not a torch.compile backend" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_baseline_and_sandwich_schemes(setup, tmp_path):
    train(micro(setup, "train.max_steps=2", "elastic.p_full=1.0", "eval.every=0"), tmp_path / "base")
    assert all(r["frac_full"] == 1.0 and "loss_sub" not in r for r in read_metrics(tmp_path / "base"))
    train(micro(setup, "train.max_steps=2", "elastic.scheme='sandwich'", "elastic.distill_weight=0.5",
                "eval.every=0"), tmp_path / "sw")
    rows = read_metrics(tmp_path / "sw")
    assert all(k in rows[-1] for k in ("loss_largest", "loss_smallest", "kl"))
    assert rows[-1]["kl"] > 0
    train(micro(setup, "train.max_steps=2", "elastic.distill_weight=0.5", "eval.every=0"), tmp_path / "kd")
    rows = read_metrics(tmp_path / "kd")
    assert all("kl" in r for r in rows) and any(r["kl"] > 0 for r in rows)


def test_per_sample_distillation_objective():
    torch.manual_seed(0)
    specs = [FULL, SubModelSpec(top_k=1), FULL, SubModelSpec(layers=1)]
    logits, y = torch.randn(4, 5, 7, requires_grad=True), torch.randint(0, 7, (4, 5))
    teacher = torch.randn(2, 5, 7)
    loss, parts = objective(logits, y, specs, 1, 0.5, teacher)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    p = teacher.softmax(-1)
    kl = (p * (p.log() - logits[[1, 3]].log_softmax(-1))).sum(-1).mean(1)
    torch.testing.assert_close(loss, ce + 0.5 * kl.sum() / 4)
    assert parts["kl"][1] == 2 and abs(float(parts["kl"][0]) - kl.sum().item()) < 1e-6
    loss.backward()
    assert logits.grad[[1, 3]].abs().sum() > 0
    no_rows, parts = objective(logits, y, [FULL] * 4, 1, 0.5, None)
    torch.testing.assert_close(no_rows, ce)
    assert parts["kl"][1] == 0.0


def test_metrics_sink_drops_rows_after_the_resumed_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
                                            + '{"step": 6, "lo')
    sink = MetricsSink(tmp_path, resume_step=3, tensorboard=False)
    sink.log({"step": 4, "loss": 2.0})
    sink.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0)]


def test_loss_plot_skipped_when_nothing_was_logged(tmp_path):
    # --max-steps 0 writes the initial checkpoint and a report; an empty plot (with matplotlib's empty-legend
    # warning) would only be noise
    assert plot_losses([], tmp_path / "empty.png") is False and not (tmp_path / "empty.png").exists()
    assert plot_losses([{"step": 1, "tokens": 64, "loss": 3.0}], tmp_path / "one.png")
    assert (tmp_path / "one.png").is_file()


def test_packaged_tiny_config():
    assert DEFAULT_CONFIG.read_text() == (ROOT / "configs" / "tiny.toml").read_text()
    cfg = load_config(TrainConfig, DEFAULT_CONFIG)
    assert cfg.elastic.scheme == "per_sample" and len(cfg.eval.submodels) == 5
    path = Path(__file__).parent / ".." / "configs" / "tiny.toml"
    assert load_config(TrainConfig, path) == cfg
    text = dump_toml(cfg.to_dict())
    assert "[[eval.submodels]]" in text and "[elastic.depth]" in text


# ------------------------------------------------------------------------------------------- one-line errors


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elastic-moe pretrain: error: ") and "\n" not in err, err
    return err


def test_unknown_set_key(setup, tmp_path, capsys):
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(tmp_path / "r"), "--set", "train.bogus=1"])
    assert "train.bogus" in err


@pytest.mark.parametrize("override, words", [
    ("elastic.width.min=1", "fewer than the largest top-k"),
    ("elastic.depth.max=5", "depth range [2, 5] is impossible"),
    ("elastic.distill_weight=-0.5", "distill_weight >= 0"),
    ("eval.submodels=[{layers=9}]", "eval.submodels"),
    ("init.embedding_std=0", "init.embedding_std = 0"),
    # values that used to fail late inside torch or numpy, or to train on NaN and exit 0
    ("optim.lr=inf", "optim.lr = inf: must be a finite number"),
    ("model.rms_norm_eps=nan", "model.rms_norm_eps = nan: must be a finite number"),
    ("model.rope_theta=0.0", "rope_theta must be > 0"),
    ("train.seed=99999999999999999999", "seeds must be in [0, 2**63)"),
    ("optim.beta1=2.0", "optim.beta1 and optim.beta2 must be in [0, 1)"),
    ("optim.grad_clip=-1.0", "weight_decay and grad_clip >= 0"),
    ("model.head_dim=-2", "head_dim must be positive"),
    ("model.vocab_size=10000000000", "vocab_size 10000000000 is above"),
    ("model.moe_layer_end_index=-7", "moe_layer_end_index -7"),
    ("data.tokenizer_sample_mb=0.0", "data.tokenizer_sample_mb = 0.0 must be a finite number of at least"),
    ("train.batch_size=100000000", "more than the"),
])
def test_impossible_elastic_config(setup, tmp_path, capsys, override, words):
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(tmp_path / "r"), "--set", override])
    assert words in err
    assert not (tmp_path / "r").exists()


def test_out_path_that_is_a_file(setup, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("keep me")
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(f), "--max-steps", "1"])
    assert "afile" in err and "Not a directory" in err
    assert f.read_text() == "keep me"


def test_out_inside_the_corpus_or_a_foreign_folder_is_refused(setup, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    shutil.copytree(setup["corpus"], corpus)
    before = sorted(p.name for p in corpus.iterdir())
    for out, words in ((corpus, "holds no run of"), (corpus / "run", "is inside the corpus")):
        err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(out), "--data", str(corpus)])
        assert words in err
    assert sorted(p.name for p in corpus.iterdir()) == before
    # a checkpoint (or any folder) that is not a run of `pretrain` is not trained into
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, tiny_model(seed=0))
    listing = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(ckpt), "--max-steps", "1"])
    assert "holds no run of `elastic-moe pretrain`" in err and "model.safetensors" in err
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == listing
    # but a first run may keep its own config file (and hidden files, a killed save's temporaries) in its folder
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(setup["toml"], mine / "my.toml")
    (mine / ".DS_Store").write_bytes(b"")
    assert cli.main(["pretrain", str(mine / "my.toml"), "--out", str(mine), "--max-steps", "1"]) == 0
    # a relative --data is saved absolute: a resume from another directory finds the corpus
    monkeypatch.chdir(corpus.parent)
    assert cli.main(["pretrain", str(setup["toml"]), "--out", "run", "--data", "corpus", "--max-steps", "1"]) == 0
    assert load_config(TrainConfig, tmp_path / "run" / "config.toml").data.path == str(corpus)
    monkeypatch.chdir(corpus)
    assert cli.main(["pretrain", "--out", str(tmp_path / "run"), "--max-steps", "2"]) == 0


def test_flags_go_through_the_config_checks_and_win_over_set(setup, tmp_path, capsys):
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(tmp_path / "r"), "--seed", "-1"])
    assert "train.seed = -1: seeds must be in [0, 2**63)" in err and not (tmp_path / "r").exists()
    from argparse import Namespace

    from elastic_moe.commands.run_args import load_run_config

    args = Namespace(out=str(tmp_path / "r"), config=str(setup["toml"]), set=["train.max_steps=9", "train.seed=4"],
                     max_steps=2, seed=None)
    cfg = load_run_config(TrainConfig, DEFAULT_CONFIG, args, "pretrain")
    assert (cfg.train.max_steps, cfg.train.seed) == (2, 4)


def test_empty_corpus(setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(b"\x00\x01\x02")
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(tmp_path / "r"), "--data", str(empty)])
    assert "empty corpus" in err


def test_incompatible_model_config_refused(setup, tmp_path, capsys):
    run = tmp_path / "run"
    train(micro(setup, "train.max_steps=1", "eval.every=0"), run)
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(run), "--set", "model.hidden_size=48"])
    assert "different model config" in err and "hidden_size 32 -> 48" in err
    (run / "config.json").unlink()  # only the checkpoint left to tell
    err = one_line_error(capsys, ["pretrain", str(setup["toml"]), "--out", str(run), "--set", "model.hidden_size=48"])
    assert "incompatible model config" in err and "hidden_size" in err


# ------------------------------------------------------------------------------------------- subprocess runs


def run_cmd(args: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


KILL_AFTER = """
import os, signal, sys
from elastic_moe import cli
from elastic_moe.metrics import MetricsSink
log = MetricsSink.log
def log_then_die(self, row):
    log(self, row)
    if row["step"] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
MetricsSink.log = log_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill9_resume_matches_uninterrupted_ci_sample(setup, tmp_path):
    args = ["pretrain", str(setup["toml"]), "--max-steps", "10", "--save-every", "4", "--seed", "5"]
    ref = run_cmd([sys.executable, "-m", "elastic_moe.cli", *args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    # kill -9 at step 7, three steps after the checkpoint of step 4: rows 5-7 of metrics.jsonl are stale
    killed = run_cmd([sys.executable, "-c", KILL_AFTER, *args, "--out", str(tmp_path / "run")], {"KILL_AT_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 8))
    resumed = run_cmd([sys.executable, "-m", "elastic_moe.cli", *args, "--out", str(tmp_path / "run")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")  # bit-exact on CPU
    assert evals(tmp_path / "run") == evals(tmp_path / "ref")
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "ddp-compiled"])
def test_torchrun_two_ranks_match_single_process(setup, tmp_path, parallel):
    """ddp-compiled: the two ranks run their layers compiled (train.compile, aot_eager), the single process eagerly."""
    parallel, _, compiled = parallel.partition("-")
    if parallel == "fsdp" and not fsdp2_runs_on_cpu():
        pytest.skip(f"torch {torch.__version__} cannot run FSDP2 on a CPU (distributed.check_fsdp2)")
    common = [str(setup["toml"]), "--seed", "3", "--set", "optim.schedule_steps=6", "--set", f"train.parallel='{parallel}'",
              "--set", "elastic.distill_weight=0.5"]  # in-place distillation: ranks with and without sub-model rows
    single = run_cmd([sys.executable, "-m", "elastic_moe.cli", "pretrain", *common, "--out", str(tmp_path / "one"),
                      "--max-steps", "6", "--set", "train.batch_size=4"])
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "elastic_moe.cli", "pretrain", *common, "--out", str(tmp_path / "two"), "--set", "train.batch_size=2"]
    if compiled:
        torchrun += ["--set", "train.compile=true", "--set", "train.compile_backend='aot_eager'"]
    # stopped at 3, between two expert reorders (every 4 steps): each rank's routing mass since the last reorder
    # goes into the checkpoint and back to its rank, so the reorder at 4 sums what an uninterrupted run sums
    first = run_cmd([*torchrun, "--max-steps", "3"])
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_00000003"]
    second = run_cmd([*torchrun, "--max-steps", "6"])  # resumes from step 3
    assert second.returncode == 0, second.stderr
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["frac_full"] for r in a] == [r["frac_full"] for r in b]  # same per-row sub-models
    torch.testing.assert_close([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-6)
    ea, eb = dict(evals(tmp_path / "one")), dict(evals(tmp_path / "two"))
    assert list(ea) == list(eb) == [3, 6]
    torch.testing.assert_close([eb[s] for s in ea], list(ea.values()), rtol=1e-5, atol=1e-6)
    wa, wb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in wa:
        if k != "step":
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # the expert importance scores (routing mass summed over ranks at each reorder) agree too
    sa, sb = (torch.load(r / "checkpoints" / "step_00000006" / "trainer.pt", weights_only=True)["elastic"]["score"]
              for r in (tmp_path / "one", tmp_path / "two"))
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-9)


def test_errors_under_torchrun_name_the_rank(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["pretrain", str(setup["toml"]), "--out", str(tmp_path / "r"), "--set", "train.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("elastic-moe pretrain (rank 1): error: ") and "train.bogus" in err and "\n" not in err


def test_checkpoint_rotation_keeps_a_measured_family(tmp_path):
    from elastic_moe.runloop import prune_checkpoints

    ck = tmp_path / "checkpoints"
    for n in (1, 2, 3, 4):
        (ck / f"step_{n:08d}").mkdir(parents=True)
    (ck / "step_00000001" / "family").mkdir()
    (ck / "step_00000001" / "family" / "family.jsonl").write_text("{}\n")
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000001", "step_00000003", "step_00000004"]
