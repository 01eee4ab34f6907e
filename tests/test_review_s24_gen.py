"""Review of sampling and SFT edge cases: sampling knobs outside their range are refused, SFT skips demonstrations
the model's context cannot hold, and the chat command names --max-tokens when it alone overflows the context."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import small_tokenizer, tiny_config, tiny_model

from elastic_moe import cli, sft
from elastic_moe.checkpoint import save_checkpoint
from elastic_moe.errors import UserError
from elastic_moe.generate import SamplingParams, generate
from elastic_moe.model import ElasticMoE
from elastic_moe.rollout import RolloutEngine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def short_context_ckpt(tmp_path_factory):
    """A tiny policy with its tokenizer and a context of 160 tokens (shorter than many demonstrations)."""
    root = tmp_path_factory.mktemp("short_ctx")
    tok = small_tokenizer()
    tok.save(root / "tok")
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=160))
    return save_checkpoint(root / "init", model, meta={"step": 0}, tokenizer_dir=root / "tok")


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0), dict(max_new_tokens=-3),
                                dict(temperature=-1.0), dict(temperature=float("nan"))])
def test_sampling_params_out_of_range_are_refused(kw):
    # before: top_p = 0 sampled the last vocabulary id (the fast decoder: <pad>) every step, and 0 new tokens gave
    # routes of len(prompt) + 1 rows for no token
    with pytest.raises(UserError, match="sampling"):
        SamplingParams(**kw)


def test_tiny_top_p_is_greedy_on_both_decoders():
    model = tiny_model()
    prompts = [[1, 5, 6, 7], [1, 20]]
    greedy = [c.tokens for c in generate(model, prompts, SamplingParams(max_new_tokens=4, temperature=0), eos_id=-1)]
    p = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1e-9, seed=0)
    assert [c.tokens for c in generate(model, prompts, p, eos_id=-1)] == greedy
    fast = RolloutEngine(model, fast_decode=True)
    assert [c.tokens for c in fast.generate(prompts, p, eos_id=-1)] == greedy


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


def test_chat_with_max_tokens_filling_the_context_names_the_setting(short_context_ckpt, monkeypatch, capsys):
    # before: every turn answered "(the message is too long for the context ...)" and the command exited 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    argv = ["generate", str(short_context_ckpt), "--chat", "--max-tokens", "160", "--temperature", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-tokens 160" in err and "160 tokens" in err
