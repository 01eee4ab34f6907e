"""SFT: examples with the loss on assistant tokens only, long examples skipped and counted, batches a function of
the step, and the `sft` command end to end (loss goes down, checkpoints, resume)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    policy_checkpoint,
    sigterm_when_logged,
    small_tokenizer,
    tiny_config,
)

from elastic_moe import cli, sft
from elastic_moe import train as train_mod
from elastic_moe.errors import UserError
from elastic_moe.metrics import read_metrics
from elastic_moe.model import ElasticMoE
from elastic_moe.sft import IGNORE, batch_rows, build_examples, make_batch, sft_loss
from elastic_moe.tasks import get_suite

pytestmark = pytest.mark.usefixtures("one_thread")


def test_examples_learn_assistant_tokens_only():
    tok = small_tokenizer()
    tasks = get_suite("reasoning", "train", 4, seed=0)
    ex = build_examples(tok, tasks, max_len=10_000)
    assert ex.skipped == 0 and len(ex.ids) == 4
    x, y = make_batch(ex, [0, 1], tok.pad_id)
    for b in range(2):
        ids, mask = ex.ids[b], ex.masks[b]
        learned = [t for t, m in zip(ids[1:], mask[1:]) if m]
        assert y[b][y[b] != IGNORE].tolist() == learned
        assert tok.decode(learned) == tasks[b].demonstration()[-1]["content"] + "</s>"
        assert x[b, : len(ids) - 1].tolist() == ids[:-1]
    # an example longer than max_len is skipped and counted, never cut
    short = build_examples(tok, tasks, max_len=min(len(i) for i in ex.ids) - 1)
    assert short.skipped == 4 and not short.ids


def test_loss_ignores_prompt_and_padding():
    tok = small_tokenizer()
    ex = build_examples(tok, get_suite("reasoning", "train", 3, seed=0), max_len=10_000)
    model = ElasticMoE(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=1024)).eval()
    x, y = make_batch(ex, [0, 1, 2], tok.pad_id)
    loss, n = sft_loss(model, x, y)
    assert n == sum(sum(m[1:]) for m in ex.masks)
    logits = model(x).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    assert torch.allclose(loss, ref, atol=1e-5)


def test_batches_are_a_function_of_the_step():
    a = [batch_rows(s, 4, 10, 0) for s in range(6)]
    assert a == [batch_rows(s, 4, 10, 0) for s in range(6)]
    assert sorted(sum(a[:2], []) + a[2][:2]) == list(range(10))


@pytest.mark.slow
def test_sft_command_end_to_end_and_resume(tmp_path, monkeypatch):
    from elastic_moe.checkpoint import find_checkpoint
    from elastic_moe.metrics import read_metrics

    init = policy_checkpoint(tmp_path)
    out = tmp_path / "sft"
    args = ["sft", "--out", str(out), "--init", str(init), "--max-steps", "30",
            "--set", "data.domains=['reasoning', 'agent']", "--set", "data.n_per_domain=40",
            "--set", "data.heldout_per_domain=4", "--set", "train.batch_size=8", "--set", "train.eval_every=0",
            "--set", "train.accuracy_n=2", "--set", "train.accuracy_max_new_tokens=8", "--set", "train.save_every=20",
            "--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "optim.lr=3e-3"]
    # SIGTERM while step 4 is logged: a checkpoint there, the report so far, exit 143; the same command goes on
    signal_at = sigterm_when_logged(monkeypatch, 4)
    assert cli.main(args[:6] + ["10"] + args[7:]) == 143
    assert find_checkpoint(out).name == "step_00000004"
    assert "**Stopped at step 4 of 10**" in (out / "report.md").read_text()
    signal_at.clear()
    assert cli.main(args[:6] + ["10"] + args[7:]) == 0
    assert find_checkpoint(out).name == "step_00000010"
    assert cli.main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert "eval/reasoning/loss" in rows[-1] and "eval/reasoning/accuracy" in rows[-1]
    assert (out / "checkpoints" / "step_00000030" / "tokenizer" / "tokenizer.json").is_file()
    # the finished run run again leaves its report as it was (the held-out table, the whole run's final loss)
    report = (out / "report.md").read_text()
    assert "| reasoning/accuracy |" in report and "nan" not in report
    assert cli.main(args) == 0
    assert (out / "report.md").read_text() == report


def test_a_resumed_run_keeps_counting_skipped_steps(tmp_path, monkeypatch):
    """`skipped_steps` counts the whole run's non-finite steps: a resumed run goes on from the saved count, as an
    uninterrupted one does, rather than from 0."""
    from elastic_moe import sft
    from elastic_moe.metrics import read_metrics

    lrs = []
    real_lr, real_loss = sft.lr_at, sft.sft_loss

    def lr_at(step, *a):
        lrs.append(step)
        return real_lr(step, *a)

    def loss_nan_at_step_0(model, x, y):
        loss, n = real_loss(model, x, y)
        return (loss * float("nan"), n) if lrs[-1] == 0 else (loss, n)

    monkeypatch.setattr(sft, "lr_at", lr_at)
    monkeypatch.setattr(sft, "sft_loss", loss_nan_at_step_0)
    init = policy_checkpoint(tmp_path)
    runs = {}
    for name, sessions in (("whole", [3]), ("resumed", [2, 3])):
        for steps in sessions:
            cfg = sft.SFTConfig(init=str(init))
            cfg.data.domains, cfg.data.n_per_domain, cfg.data.heldout_per_domain = ["reasoning"], 8, 0
            cfg.train.batch_size, cfg.train.eval_every, cfg.train.accuracy_n = 4, 0, 0
            cfg.train.max_steps, cfg.train.save_every = steps, 1
            cfg.train.progress = cfg.train.tensorboard = False
            sft.train_sft(cfg, tmp_path / name, log=lambda _: None)
        runs[name] = [r["skipped_steps"] for r in read_metrics(tmp_path / name)]
    assert runs["whole"] == [1, 1, 1] and runs["resumed"] == runs["whole"]


@pytest.mark.parametrize("command", ["sft", "rl", "posttrain", "async-rl"])
def test_post_training_commands_say_they_train_on_the_cpu_when_a_gpu_is_there(tmp_path, monkeypatch, capsys, command):

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # a refused run (unknown setting) still says it first, before its one-line error
    assert cli.main([command, "--out", str(tmp_path / "run"), "--set", "bogus_key=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"note: `elastic-moe {command}` trains on the CPU (the GPU is used by pretrain, family, "
                      "extract and generate)")
    assert err[1].startswith(f"elastic-moe {command}: error: ") and "bogus_key" in err[1] and len(err) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([command, "--out", str(tmp_path / "run"), "--set", "bogus_key=1"]) == 2
    assert "note:" not in capsys.readouterr().err


def test_sft_config_refuses_accuracy_max_new_tokens_below_one():
    cfg = sft.SFTConfig(init="x")
    cfg.train.accuracy_max_new_tokens = 0
    with pytest.raises(UserError, match="accuracy_max_new_tokens"):
        cfg.validate()


def test_sft_skips_demonstrations_longer_than_the_model_context(short_context_ckpt, tmp_path):
    # before: data.max_len (512) above the model's context kept them, and the first batch holding one failed with
    # "position N exceeds max_position_embeddings" after the run folder was written
    cfg = sft.SFTConfig(init=str(short_context_ckpt))
    cfg.data.domains, cfg.data.n_per_domain, cfg.data.heldout_per_domain = ["reasoning"], 8, 2
    cfg.train.batch_size, cfg.train.eval_every, cfg.train.accuracy_n = 8, 0, 0
    cfg.train.max_steps, cfg.train.save_every = 1, 0
    cfg.train.progress = cfg.train.tensorboard = False
    lines = []
    summary = sft.train_sft(cfg, tmp_path / "run", log=lines.append)
    assert summary["step"] == 1 and 0 < summary["skipped_examples"] < 8
    assert any("skipped as longer than 161 tokens" in line for line in lines)


def _sft_runs(tmp_path, monkeypatch, sessions: dict[str, list[int]]) -> dict:
    from elastic_moe import sft

    counted = []
    real_loss = sft.sft_loss

    def spy(model, x, y):
        loss, n = real_loss(model, x, y)
        counted.append(n)
        return loss, n

    monkeypatch.setattr(sft, "sft_loss", spy)
    init = policy_checkpoint(tmp_path)
    out = {}
    for name, steps in sessions.items():
        counted.clear()
        for max_steps in steps:
            cfg = sft.SFTConfig(init=str(init))
            cfg.data.domains, cfg.data.n_per_domain, cfg.data.heldout_per_domain = ["reasoning"], 8, 0
            cfg.train.batch_size, cfg.train.eval_every, cfg.train.accuracy_n = 4, 0, 0
            cfg.train.max_steps, cfg.train.save_every = max_steps, 1
            cfg.optim.warmup_steps = 1
            cfg.train.progress = cfg.train.tensorboard = False
            sft.train_sft(cfg, tmp_path / name, log=lambda _: None)
        out[name] = {"rows": read_metrics(tmp_path / name), "counted": list(counted)}
    return out


def test_sft_resume_follows_the_uninterrupted_trajectory(tmp_path, monkeypatch):
    """An SFT run stopped after a checkpoint and resumed gets its optimizer moments back: its losses and final
    weights are those of the run trained in one go."""
    from elastic_moe.checkpoint import load_checkpoint

    runs = _sft_runs(tmp_path, monkeypatch, {"whole": [3], "resumed": [2, 3]})
    assert [r["loss"] for r in runs["resumed"]["rows"]] == [r["loss"] for r in runs["whole"]["rows"]]
    a, _ = load_checkpoint(tmp_path / "whole")
    b, _ = load_checkpoint(tmp_path / "resumed")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sft_counts_assistant_tokens_as_its_tokens(tmp_path, monkeypatch):
    """SFT's `tokens` metric counts the tokens the loss is on (assistant tokens), step by step, not the padded
    batch."""
    runs = _sft_runs(tmp_path, monkeypatch, {"run": [3]})
    tokens = [r["tokens"] for r in runs["run"]["rows"]]
    counted = runs["run"]["counted"]
    assert tokens == [sum(counted[: i + 1]) for i in range(len(counted))]


def test_sft_heldout_loss_is_the_mean_over_assistant_tokens():
    """sft.heldout_loss averages the cross-entropy over the assistant tokens only (prompt and padding count
    neither in the sum nor in the number of tokens), per domain and overall."""
    from helpers import small_tokenizer, tiny_config

    from elastic_moe.model import ElasticMoE
    from elastic_moe.sft import IGNORE, build_examples, heldout_loss, make_batch
    from elastic_moe.tasks import get_suite

    tok = small_tokenizer()
    ex = build_examples(tok, get_suite("reasoning", "test", 3, seed=0), max_len=10_000)
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=1024)).train()
    got = heldout_loss(model, ex, tok.pad_id, batch_size=2)
    assert model.training
    x, y = make_batch(ex, [0, 1, 2], tok.pad_id)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model.eval()(x).logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    assert got["eval/reasoning/loss"] == pytest.approx(float(ref), rel=1e-5)
    assert got["eval/all/loss"] == pytest.approx(float(ref), rel=1e-5)


def test_sft_clips_the_gradient_before_the_optimizer_step(tmp_path, monkeypatch):
    """SFT's optim.grad_clip bounds the norm of the gradient the optimizer steps with (the logged grad_norm is the
    norm before clipping)."""
    from elastic_moe import sft

    norms = []
    real_make = train_mod.make_optimizer

    def make(*a):
        opt = real_make(*a)
        real_step = opt.step

        def step(*sa, **kw):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            return real_step(*sa, **kw)

        opt.step = step
        return opt

    monkeypatch.setattr(train_mod, "make_optimizer", make)
    cfg = sft.SFTConfig(init=str(policy_checkpoint(tmp_path)))
    cfg.data.domains, cfg.data.n_per_domain, cfg.data.heldout_per_domain = ["reasoning"], 8, 0
    cfg.train.batch_size, cfg.train.eval_every, cfg.train.accuracy_n = 4, 0, 0
    cfg.train.max_steps, cfg.train.save_every = 2, 0
    cfg.train.progress = cfg.train.tensorboard = False
    cfg.optim.grad_clip = 1e-3
    sft.train_sft(cfg, tmp_path / "run", log=lambda _: None)
    rows = read_metrics(tmp_path / "run")
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-4) for n in norms), norms
    assert all(r["grad_norm"] > 1e-3 for r in rows)
