"""`elastic-moe generate`: completions with a spec and sampling options, and the chat mode with /topk."""

import io

import pytest

import elastic_moe.generate as lib
from elastic_moe import cli
from elastic_moe.checkpoint import load_checkpoint
from elastic_moe.generate import SamplingParams, generate
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
