"""`elastic-moe generate`: completions with a spec and sampling options, the chat mode with /topk, and sampling
itself: options out of range refused, tiny temperatures and top-p greedy on both decoders, seeds that leave the
caller's random state alone."""

import io

import pytest
import torch
from helpers import policy_checkpoint, small_tokenizer, tiny_model

import elastic_moe.generate as lib
from elastic_moe import cli
from elastic_moe.checkpoint import load_checkpoint
from elastic_moe.commands.generate import ROLE_STOPS, _text, chat_loop, complete
from elastic_moe.errors import UserError
from elastic_moe.fast_decode import FastDecoder, _sample
from elastic_moe.generate import Completion, SamplingParams, generate, sample
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


PROBS = torch.tensor([0.5, 0.3, 0.2])


def _draw(engine: str, probs: torch.Tensor, temperature: float, top_p: float, n: int = 20000, seed: int = 0):
    """n independent draws (one per row) from `generate.sample` or the static decoder's `_sample`."""
    logits = probs.log().expand(n, -1).contiguous()
    gen = torch.Generator().manual_seed(seed)
    if engine == "generate":
        tok, _ = sample(logits, temperature, top_p, gen)
    else:
        noise = torch.rand(logits.shape, generator=gen)
        tok, _ = _sample(logits, torch.tensor(temperature), torch.tensor(top_p), noise, False, top_p < 1.0)
    return tok


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_samplers_draw_tokens_at_their_probabilities(engine):
    """Without top-p, a token is drawn with its softmax probability (both engines' samplers)."""
    freq = torch.bincount(_draw(engine, PROBS, 1.0, 1.0), minlength=3).float() / 20000
    assert torch.allclose(freq, PROBS, atol=0.02), freq


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_top_p_nucleus_keeps_the_token_that_crosses_p(engine):
    """top_p = 0.6 over (0.5, 0.3, 0.2): the nucleus is the smallest prefix of the sorted tokens whose mass reaches p,
    so {0, 1} (token 1 crosses 0.6); token 2 is never drawn."""
    tok = _draw(engine, PROBS, 1.0, 0.6)
    assert set(tok.tolist()) == {0, 1}
    assert abs((tok == 1).float().mean().item() - 0.3 / 0.8) < 0.02


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_top_p_nucleus_is_taken_at_the_sampling_temperature(engine):
    """Temperature first, then top-p: at T = 0.1 token 0 holds > 99% of the mass, so top_p = 0.6 keeps it alone
    (at T = 1 the nucleus would be {0, 1})."""
    tok = _draw(engine, PROBS, 0.1, 0.6, n=4000)
    assert set(tok.tolist()) == {0}


def _recomputed_logp(model, c: Completion, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([c.prompt + c.tokens])).logits[0, len(c.prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(c.tokens)[:, None])[:, 0]


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_top_p_logprobs_are_under_logits_over_temperature_without_renormalisation(engine):
    """With top_p < 1 the returned log-probs are still those of logits / temperature over the whole vocabulary (the
    module docs: the nucleus renormalisation is left out, as the trainer leaves it out)."""
    model = tiny_model()
    p = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.5, seed=1)
    run = FastDecoder(model, compile=False, static_on_cpu=True).generate if engine == "fast" else (
        lambda *a, **kw: generate(model, *a, **kw))
    for c in run(PROMPTS, p, eos_id=-1):
        assert torch.allclose(_recomputed_logp(model, c, 0.8), torch.tensor(c.logprobs), atol=1e-4)


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_seed_0_fixes_the_sample(engine):
    """seed=0 is a seed like any other: two calls give the same tokens whatever the global random state."""
    model = tiny_model()
    dec = FastDecoder(model, compile=False, static_on_cpu=True)
    run = dec.generate if engine == "fast" else (lambda *a, **kw: generate(model, *a, **kw))
    p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)
    torch.manual_seed(1)
    a = [c.tokens for c in run(PROMPTS, p, eos_id=-1)]
    torch.manual_seed(2)
    b = [c.tokens for c in run(PROMPTS, p, eos_id=-1)]
    assert a == b


def _ids_text(ids) -> str:
    return "".join(f"<{t}>" for t in ids)


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_a_stop_string_ends_the_completion_at_the_token_that_completes_it(engine):
    """A completion stops (finish 'stop') with the token whose text completes a stop string, included; the end of
    sequence still stops a completion when stop strings are given."""
    model = tiny_model()
    dec = FastDecoder(model, compile=False, static_on_cpu=True)
    run = dec.generate if engine == "fast" else (lambda *a, **kw: generate(model, *a, **kw))
    free = run(PROMPTS[:1], SamplingParams(max_new_tokens=10, temperature=0), eos_id=-1)[0].tokens
    k = 3
    first = free.index(free[k])  # the first step whose token is free[k]
    stop = _ids_text([free[k]])
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_strings=(stop,))
    c = run(PROMPTS[:1], p, eos_id=-1, decode=_ids_text)[0]
    assert c.tokens == free[: first + 1] and c.finish_reason == "stop"
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_strings=("never",))
    c = run(PROMPTS[:1], p, eos_id=free[k], decode=_ids_text)[0]
    assert c.tokens == free[: first + 1] and c.finish_reason == "stop"


def test_static_decoder_checking_for_eos_every_step_keeps_unfinished_rows_to_their_budget():
    """With check_every=1 the decoder may stop early only once every row has finished: a row that hit EOS does not
    cut the others short (they equal `generate`'s)."""
    model = tiny_model()
    p = SamplingParams(max_new_tokens=8, temperature=0)
    free = generate(model, PROMPTS, p, eos_id=-1)
    eos = free[0].tokens[1]
    assert eos not in free[1].tokens  # row 1 runs to its budget
    ref = generate(model, PROMPTS, p, eos_id=eos)
    out = FastDecoder(model, compile=False, static_on_cpu=True, check_every=1).generate(PROMPTS, p, eos_id=eos)
    assert [c.tokens for c in out] == [c.tokens for c in ref]
    assert [c.finish_reason for c in out] == ["stop", "length"]


@pytest.mark.parametrize("engine", ["generate", "fast"])
def test_every_step_draws_fresh_randomness(engine):
    """A model whose next-token distribution is uniform at every step samples varied tokens: each step draws new
    random numbers (the static decoder refills its noise buffer before every step)."""
    model = tiny_model()
    with torch.no_grad():
        model.norm.weight.zero_()  # hidden state 0: all logits 0, a uniform distribution over the vocabulary
    dec = FastDecoder(model, compile=False, static_on_cpu=True)
    run = dec.generate if engine == "fast" else (lambda *a, **kw: generate(model, *a, **kw))
    for c in run(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=0), eos_id=-1):
        assert len(set(c.tokens)) > 3, c.tokens


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def test_command_text_drops_eos_and_ends_before_the_first_stop_string(tok):
    """The printed completion has no end-of-sequence text and ends just before the earliest stop string found."""
    eos = tok.eos_id
    assert _text(tok, tok.encode("hello world") + [eos], ()) == "hello world"
    ids = tok.encode("abc STOP def END ghi")
    assert _text(tok, ids, ("END", "STOP")) == "abc "
    assert _text(tok, ids, ("ghi",)) == "abc STOP def END "


def _fake_generate(tok, reply: str, calls: list):
    def fake(model, prompts, params, spec=None, eos_id=None, decode=None):
        calls.append((prompts, params))
        return [Completion(list(p), tok.encode(reply, allow_special=True)) for p in prompts]
    return fake


def test_chat_reply_is_cut_at_a_role_token_the_model_starts(tok, monkeypatch, capsys):
    """A chat reply that runs on into a new turn (a role token) is cut there, and the role tokens are stop strings
    of the request, besides the user's own."""
    calls = []
    monkeypatch.setattr(lib, "generate", _fake_generate(tok, "Sure thing<|user|>\nmore", calls))
    model = tiny_model()
    params = SamplingParams(max_new_tokens=4, temperature=0, stop_strings=("xyz",))
    assert chat_loop(model, tok, SubModelSpec(), params, None, iter(["hi"])) == 0
    assert capsys.readouterr().out == "assistant: Sure thing\n"
    assert set(calls[0][1].stop_strings) == {"xyz", *ROLE_STOPS}


def test_completion_prompts_start_with_bos(tok, monkeypatch, capsys):
    """`generate --prompt TEXT` feeds <s> + the text's ids, as every pre-training document starts."""
    calls = []
    monkeypatch.setattr(lib, "generate", _fake_generate(tok, " there", calls))
    model = tiny_model()
    assert complete(model, tok, SubModelSpec(), SamplingParams(max_new_tokens=4), ["hello"]) == 0
    assert calls[0][0] == [[tok.bos_id, *tok.encode("hello")]]
    assert capsys.readouterr().out == "hello there\n"
