"""`elastic-moe generate`: completions with a spec and sampling options, the chat mode with /topk, and sampling
itself: options out of range refused, tiny temperatures and top-p greedy on both decoders, seeds that leave the
caller's random state alone."""

import io

import pytest
import torch
from helpers import policy_checkpoint, tiny_model

import elastic_moe.generate as lib
from elastic_moe import cli
from elastic_moe.checkpoint import load_checkpoint
from elastic_moe.errors import UserError
from elastic_moe.fast_decode import FastDecoder
from elastic_moe.generate import SamplingParams, generate
from elastic_moe.rollout import RolloutEngine
from elastic_moe.spec import SubModelSpec
from elastic_moe.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(micro_run):
    model, meta = load_checkpoint(micro_run)
    return model.eval(), Tokenizer.load(f"{meta['path']}/tokenizer")


def test_greedy_completion_matches_the_library(micro_run, loaded, capsys):
    model, tok = loaded
    argv = ["generate", str(micro_run), "--prompt", "alpha beta", "--temperature", "0", "--max-tokens", "12",
            "--layers", "2", "--top-k", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    ids = [tok.bos_id, *tok.encode("alpha beta")]
    ref = generate(model, [ids], SamplingParams(max_new_tokens=12, temperature=0), SubModelSpec(2, None, 1),
                   eos_id=tok.eos_id)[0]
    text = tok.decode([t for t in ref.tokens if t != tok.eos_id])
    assert out.out == f"alpha beta{text}\n"
    assert "tokens/s" in out.err and "layers=2" in out.err


def test_sampling_is_seeded_and_batched(micro_run, capsys):
    argv = ["generate", str(micro_run), "--prompt", "gamma", "--prompt", "delta epsilon", "--seed", "3",
            "--temperature", "1.0", "--top-p", "0.9", "--max-tokens", "8"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first
    assert "--- completion 1" in first and "--- completion 2" in first


def test_chat_keeps_the_conversation_and_topk(micro_run, loaded, monkeypatch, capsys):
    model, tok = loaded
    calls = []
    original = lib.generate  # the command imports it when it runs, so patching the module is enough

    def spy(m, prompts, params, spec=None, eos_id=None, decode=None):
        calls.append((prompts[0], spec))
        return original(m, prompts, params, spec, eos_id, decode)

    monkeypatch.setattr(lib, "generate", spy)
    lines = "hello there\n/topk 1\nsecond turn\n/topk 1 just this once\n/topk\nthird\n/topk 99\n/bogus\n/quit\nignored\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    argv = ["generate", str(micro_run), "--chat", "--system", "be brief", "--temperature", "0", "--max-tokens", "6",
            "--experts", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    replies = [line.removeprefix("assistant: ") for line in out if line.startswith("assistant:")]
    assert len(replies) == 4 == len(calls)
    assert [c[1].top_k for c in calls] == [None, 1, 1, None]
    assert all(c[1].experts == 3 for c in calls)
    assert "(top-k 1 for the next requests)" in out and any("bad top-k '99'" in line for line in out)
    assert any("unknown command /bogus" in line for line in out)
    # every request carries the whole conversation in the chat format
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "second turn"}]
    assert calls[1][0] == tok.encode_chat(msgs, add_generation_prompt=True)
    msgs += [{"role": "assistant", "content": replies[1]}, {"role": "user", "content": "just this once"}]
    # the micro model's context is 64 tokens: the oldest turns leave, the system message stays
    while len(tok.encode_chat(msgs, add_generation_prompt=True)) + 6 > model.cfg.max_position_embeddings:
        del msgs[1]
    assert len(msgs) < 6 and msgs[0]["role"] == "system"
    assert calls[2][0] == tok.encode_chat(msgs, add_generation_prompt=True)


def test_errors_are_one_line(micro_run, tmp_path, capsys):
    assert cli.main(["generate", str(micro_run)]) == 2
    assert "give --prompt" in capsys.readouterr().err
    assert cli.main(["generate", str(micro_run), "--prompt", "x", "--top-k", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "top_k=9" in err
    assert cli.main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


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


def test_chat_with_max_tokens_filling_the_context_names_the_setting(short_context_ckpt, monkeypatch, capsys):
    # before: every turn answered "(the message is too long for the context ...)" and the command exited 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    argv = ["generate", str(short_context_ckpt), "--chat", "--max-tokens", "160", "--temperature", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-tokens 160" in err and "160 tokens" in err


PROMPTS = [[1, 5, 6, 7], [1, 20]]


@pytest.mark.parametrize("engine", ["fast", "generate"])
def test_seeded_sampling_leaves_the_global_rng_alone(engine):
    # before: FastDecoder.generate called torch.manual_seed(seed): the caller's next random draw was the seed's
    model = tiny_model()
    dec = FastDecoder(model, compile=False, static_on_cpu=True)
    run = dec.generate if engine == "fast" else (lambda *a, **kw: generate(model, *a, **kw))
    p = SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = run(PROMPTS, p, eos_id=-1)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(456)
    again = run(PROMPTS, p, eos_id=-1)
    assert [c.tokens for c in again] == [c.tokens for c in first]  # the seed alone fixes the sample


def test_a_tiny_temperature_samples_the_argmax_on_both_decoders():
    # before: generate divided the logits by 1e-45 into inf and failed with "probability tensor contains ... nan"
    model = tiny_model()
    greedy = [c.tokens for c in generate(model, PROMPTS, SamplingParams(4, temperature=0), eos_id=-1)]
    p = SamplingParams(4, temperature=1e-45, seed=0)
    assert [c.tokens for c in generate(model, PROMPTS, p, eos_id=-1)] == greedy
    fast = FastDecoder(model, compile=False, static_on_cpu=True)
    assert [c.tokens for c in fast.generate(PROMPTS, p, eos_id=-1)] == greedy


@pytest.mark.parametrize("stops", [("",), ("ok", ""), "\n\n"])
def test_sampling_refuses_empty_stop_strings_and_a_bare_string(stops):
    # before: "" is in every text, so each completion stopped after its first token; a bare string stopped at any
    # one of its characters
    with pytest.raises(UserError, match="stop_strings"):
        SamplingParams(stop_strings=stops)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return policy_checkpoint(tmp_path_factory.mktemp("policy"))


def test_chat_skips_undecodable_stdin_lines(policy, monkeypatch, capsys):
    # before: stdin decoded strictly (a UTF-8 locale), and the first invalid byte ended the command in a traceback
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nhello\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdin", stdin)
    argv = ["generate", str(policy), "--chat", "--temperature", "0", "--max-tokens", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "(that line is not valid UTF-8 text: skipped)"
    assert len(out) == 2 and out[1].startswith("assistant:")
