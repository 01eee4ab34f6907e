"""Review of generation, sub-model specs and the generate command: a seeded sample leaves the caller's random state
alone, and impossible values are refused in one line."""

from __future__ import annotations

import argparse
import io

import pytest
import torch
from helpers import policy_checkpoint, tiny_model

from elastic_moe import cli
from elastic_moe.commands import arg_types
from elastic_moe.errors import UserError
from elastic_moe.fast_decode import FastDecoder
from elastic_moe.generate import SamplingParams, generate
from elastic_moe.spec import SubModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

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


@pytest.mark.parametrize("kw", [dict(layers="2,3"), dict(experts="4,5"), dict(layers=""), dict(experts=" ")])
def test_spec_parse_refuses_several_values_for_a_count(kw):
    # before: "2,3" kept 2 silently, and an empty string raised IndexError
    name = "--" + next(iter(kw))
    with pytest.raises(UserError, match=f"{name} takes one integer, got {kw[name[2:]]!r}"):
        SubModelSpec.parse(**kw)


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


@pytest.mark.parametrize("text", ["meta", "mps", "cpu:1"])
def test_device_argument_refuses_devices_the_commands_cannot_run_on(text):
    # before: accepted; loading a checkpoint then failed with a traceback (mps) or called it corrupt (meta, cpu:1)
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        arg_types.device(text)
    assert arg_types.device("cpu") == "cpu"


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
