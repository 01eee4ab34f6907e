"""Byte-level BPE tokenizer: special tokens, round trips, deterministic training, save / load, chat encoding with its
loss mask, the Hugging Face export, and refused inputs."""

import json

import pytest

from elastic_moe.chat import SPECIAL_TOKENS, render
from elastic_moe.errors import UserError
from elastic_moe.tokenizer import Tokenizer

TEXTS = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé text: 東京, emoji 🙂.\n",
    "<s> and </s> and <|user|> appear here as plain text in an HTML-ish <s>string</s>.\n",
] * 20

MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "tool", "content": "ok"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=400)


def test_special_ids_and_size(tok):
    assert [tok._tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 400


def test_special_tokens_atomic(tok):
    n = len(SPECIAL_TOKENS)
    # No learned token spells (part of) a special token beyond its first symbols: merges never make "<s>".
    for i in range(n, tok.vocab_size):
        piece = tok.decode([i])
        assert not any(s in piece for s in SPECIAL_TOKENS), piece
    text = "x <s> y </s> <|assistant|>"
    assert not set(tok.encode(text)) & set(range(n))  # raw text: special strings are plain text
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<s>hi</s><|user|>", allow_special=True)[0] == 1
    assert tok.encode("<|user|>", allow_special=True) == [4]


def test_round_trip_and_batch(tok):
    for text in TEXTS[:4] + ["", "  leading spaces\n\n\ttabs", "\x00\x7f binary-ish \ufeff"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS[:4]) == [tok.encode(t) for t in TEXTS[:4]]


def test_deterministic_training(tok):
    assert Tokenizer.train(TEXTS, vocab_size=400).fingerprint() == tok.fingerprint()
    assert Tokenizer.train(TEXTS, vocab_size=300).fingerprint() != tok.fingerprint()


def test_vocab_too_small():
    with pytest.raises(UserError, match="vocab_size"):
        Tokenizer.train(TEXTS, vocab_size=100)


def test_save_load(tok, tmp_path):
    tok.save(tmp_path, model_max_length=1024)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.model_max_length == 1024
    assert loaded.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["pad_token"] == "<pad>"
    assert (tmp_path / "special_tokens_map.json").is_file()
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")


def test_chat_encoding_and_mask(tok):
    ids, mask = tok.encode_chat_with_mask(MESSAGES)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    assert ids == tok.encode_chat(MESSAGES)
    assert tok.decode(ids) == render(MESSAGES)
    gen = tok.encode_chat(MESSAGES[:2], add_generation_prompt=True)
    assert tok.decode(gen) == render(MESSAGES[:2], add_generation_prompt=True)
    # The learned tokens are exactly each assistant reply followed by </s>.
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tok.decode(s) for s in spans] == [m["content"] + "</s>" for m in MESSAGES if m["role"] == "assistant"]
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.encode_chat([{"role": "robot", "content": "x"}])


def test_hf_export_round_trip(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path, model_max_length=2048)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf.model_max_length == 2048
    assert set(SPECIAL_TOKENS) <= set(hf.all_special_tokens)
    for gen in (False, True):
        msgs = MESSAGES[:5] if gen else MESSAGES
        text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text == render(msgs, add_generation_prompt=gen)
        hf_ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
        assert list(hf_ids) == tok.encode_chat(msgs, add_generation_prompt=gen)
    assert hf.encode(TEXTS[0], add_special_tokens=False) == tok.encode(TEXTS[0])
    # plain text gets the <s> every pre-training document starts with, as `elastic-moe generate` prepends it
    assert hf(TEXTS[0]).input_ids == [tok.bos_id, *tok.encode(TEXTS[0])]
    assert hf.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    # the saved BOS template is not part of the tokenizer in memory: loading gives back the same fingerprint
    assert Tokenizer.load(tmp_path).fingerprint() == tok.fingerprint()


def test_text_with_a_lone_surrogate_is_refused_in_one_line():
    from elastic_moe.errors import UserError

    tok = Tokenizer.train(["hello world " * 50], vocab_size=300)
    for encode in (lambda t: tok.encode(t), lambda t: tok.encode_batch(["fine", t]),
                   lambda t: tok.encode_chat([{"role": "user", "content": t}])):
        with pytest.raises(UserError, match=r"not valid Unicode: lone surrogate '\\udc80' at character 2"):
            encode("ab\udc80c")
    assert tok.decode(tok.encode("hello")) == "hello"


def test_a_tokenizer_sample_of_less_than_a_byte_is_named_not_called_an_empty_corpus(tmp_path):
    from elastic_moe.shards import prepare_data

    (tmp_path / "c.txt").write_text("plenty of text here\n" * 100)
    with pytest.raises(UserError, match=r"tokenizer_sample_mb = 1e-07"):
        prepare_data(tmp_path / "c.txt", None, vocab_size=300, seq_len=8, tokenizer_sample_mb=1e-7,
                     cache_dir=tmp_path / "cache", progress=False, log=lambda _: None)
