"""Token shards: layout, a disjoint held-out split, deterministic caches, batches as shifted windows, exact resume,
rank sharding, bounded reads of huge files, concurrent builds, and damaged caches."""

import json
import os
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from elastic_moe import corpus as corpus_mod
from elastic_moe import shards as shards_mod
from elastic_moe.corpus import Corpus
from elastic_moe.errors import UserError
from elastic_moe.shards import TokenShards, heldout_batches, prepare_data, split_document
from elastic_moe.tokenizer import Tokenizer


def make_corpus(root, n_docs=60, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return class".split()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(5, 40))]
        (root / f"doc{i:03d}.txt").write_text(f"document {i}\n" + "\n".join(lines) + "\n")
    (root / "image.bin").write_bytes(bytes(range(256)))
    (root / "old.txt").write_bytes("naïve".encode("cp1252") + b"\x81")
    return root


def prepare(tmp_path, data=None, **kw):
    kw = {"vocab_size": 300, "seq_len": 16, "heldout_frac": 0.1, "cache_dir": tmp_path / "cache",
          "progress": False, "log": lambda _: None, **kw}
    return prepare_data(data or make_corpus(tmp_path / "corpus"), tmp_path / "run", **kw)


def documents(shards, bos, eos):
    toks = shards.tokens().tolist()
    docs, cur = [], []
    for t in toks:
        if t == bos:
            cur = []
        elif t == eos:
            docs.append(tuple(cur))
        else:
            cur.append(t)
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("data"))


def test_shards_layout_and_log(tmp_path):
    lines = []
    data = prepare(tmp_path, log=lines.append)
    assert "corpus: 62 files, 2 skipped (binary or non-UTF-8: " in "\n".join(lines)
    assert data.train.arrays[0].dtype == np.uint16
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    toks = data.train.tokens()
    assert toks[0] == data.tokenizer.bos_id and toks[-1] == data.tokenizer.eos_id
    assert toks.max() < data.tokenizer.vocab_size


def test_heldout_disjoint_and_complete(data):
    tok = data.tokenizer
    train = documents(data.train, tok.bos_id, tok.eos_id)
    held = documents(data.heldout, tok.bos_id, tok.eos_id)
    assert len(train) == data.train.num_documents and len(held) == data.heldout.num_documents
    assert held and train and not set(train) & set(held)
    assert len(train) + len(held) == 60
    texts = {tok.decode(d).split("\n")[0] for d in held}
    assert texts <= {f"document {i}" for i in range(60)}


def test_deterministic_and_cached(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    a = prepare(tmp_path, corpus, cache_dir=tmp_path / "c1")
    b = prepare(tmp_path, corpus, cache_dir=tmp_path / "c2")
    assert a.tokenizer.fingerprint() == b.tokenizer.fingerprint()
    assert np.array_equal(a.train.tokens(), b.train.tokens())
    assert np.array_equal(a.heldout.tokens(), b.heldout.tokens())
    lines = []
    c = prepare(tmp_path, corpus, cache_dir=tmp_path / "c1", log=lines.append)
    assert c.shards_dir == a.shards_dir and any("cached" in line for line in lines)
    assert not any("tokenized" in line or "trained" in line for line in lines)
    (corpus / "doc000.txt").write_text("a changed document\n")
    assert prepare(tmp_path, corpus, cache_dir=tmp_path / "c1").shards_dir != a.shards_dir


def test_batches_are_shifted_windows(data):
    x, y = next(data.train_stream(batch_size=4, seed=1))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_exact_resume(data):
    stream = data.train_stream(batch_size=3, seed=7)
    for _ in range(5):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # survives a checkpoint round trip
    expected = [next(stream) for _ in range(40)]  # crosses epoch boundaries
    resumed = data.train_stream(batch_size=3, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, (next(resumed) for _ in range(40))):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(UserError, match="seed"):
        data.train_stream(batch_size=3, seed=8).load_state_dict(state)


def test_resume_on_a_corpus_edited_in_place_is_refused(tmp_path):

    corpus = make_corpus(tmp_path / "corpus")
    stream = prepare(tmp_path, corpus).train_stream(batch_size=3, seed=7)
    next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    tok = tmp_path / "run" / "tokenizer"
    doc = max(corpus.glob("doc*.txt"), key=lambda p: p.stat().st_size)  # the largest: in the train split
    os.utime(doc, (1, 1))  # touched: the shards are built again (new cache key), from the same text
    prepare(tmp_path, corpus, tokenizer=tok).train_stream(batch_size=3, seed=7).load_state_dict(state)
    head, *lines = doc.read_text().splitlines()  # edited: the same words, so the same number of windows
    doc.write_text("\n".join([head, *reversed(lines)]) + "\n")
    edited = prepare(tmp_path, corpus, tokenizer=tok).train_stream(batch_size=3, seed=7)
    assert edited.num_windows == stream.num_windows
    with pytest.raises(UserError, match="training tokens differ"):
        edited.load_state_dict(state)


def test_epoch_visits_every_window_once(data):
    stream = data.train_stream(batch_size=1, seed=3)
    n = stream.num_windows
    assert n > 10 and stream.shards.num_tokens // 16 - n <= len(stream.shards.arrays)
    epoch0 = {tuple(next(stream)[0][0].tolist()) for _ in range(n)}
    windows = {tuple(stream.shards.window(w, 16)[:-1].tolist()) for w in range(n)}
    assert epoch0 == windows and stream.epoch == 1.0
    assert not np.array_equal(stream._perm(0), stream._perm(1))


def test_rank_sharding_equals_global_batch(data):
    B, world, steps = 2, 3, 12
    single = data.train_stream(batch_size=B * world, seed=5)
    ranks = [data.train_stream(batch_size=B, rank=r, world_size=world, seed=5) for r in range(world)]
    seen = set()
    for _ in range(steps):
        x, y = next(single)
        parts = [next(s) for s in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
        assert all(s.state_dict() == single.state_dict() for s in ranks)
        seen.update(map(tuple, x.tolist()))
    # Elastic resume: the global position carries over to a different world size.
    two = [data.train_stream(batch_size=B, rank=r, world_size=2, seed=5) for r in range(2)]
    for s in two:
        s.load_state_dict(single.state_dict())
    x, _ = next(single)
    assert torch.equal(x[: 2 * B], torch.cat([next(s)[0] for s in two]))


def test_heldout_batches_fixed(data):
    a = data.heldout_batches(batch_size=4)
    b = data.heldout_batches(batch_size=4)
    assert a and all(torch.equal(x, x2) for (x, _), (x2, _) in zip(a, b))
    n = data.heldout.num_windows(16)
    assert sum(len(x) for x, _ in a) == n
    assert len(data.heldout_batches(batch_size=4, max_batches=1)) == 1


def test_single_document_and_empty_corpus(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("just one small document " * 20)
    lines = []
    data = prepare(tmp_path, tmp_path / "one", log=lines.append)
    assert data.heldout.num_tokens == 0 and data.train.num_documents == 1
    assert "too few documents to split at heldout_frac = 0.1: 0 of 1 held out" in "\n".join(lines)
    (tmp_path / "one" / "b.txt").write_text("and a second one " * 20)  # one of two held out, said so
    lines.clear()
    data = prepare(tmp_path, tmp_path / "one", log=lines.append)
    assert data.heldout.num_documents == 1 and "1 of 2 held out" in "\n".join(lines)
    lines.clear()
    prepare(tmp_path / "big", log=lines.append)  # enough documents: split by hash, no note
    assert any("held-out tokens" in x for x in lines) and not any("too few documents" in x for x in lines)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="empty corpus.*none"):
        prepare(tmp_path, tmp_path / "none")
    with pytest.raises(UserError, match="empty corpus"):
        prepare(tmp_path, tmp_path / "none", tokenizer=data.tokenizer)


def test_too_small_for_seq_len(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("tiny")
    data = prepare(tmp_path, tmp_path / "c")
    with pytest.raises(UserError, match="corpus too small"):
        data.train_stream(batch_size=1)


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"content": f"record {i} " + "words " * (i % 7 + 3)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = prepare(tmp_path, path, jsonl_field="content")
    assert data.train.num_documents + data.heldout.num_documents == 40


def test_split_document():
    text = "".join(f"line {i}\n" for i in range(100))
    pieces = split_document(text, 50)
    assert "".join(pieces) == text and all(len(p) <= 50 and p.endswith("\n") for p in pieces)
    assert split_document("x" * 120, 50) == ["x" * 50, "x" * 50, "x" * 20]


def test_stdlib_corpus_small_cap(tmp_path):
    data = prepare_data(None, None, vocab_size=512, seq_len=64, max_bytes=300_000, cache_dir=tmp_path,
                        progress=False, log=lambda _: None)
    assert data.train.num_tokens > 50_000 and data.heldout.num_documents > 0
    x, _ = next(data.train_stream(batch_size=2))
    assert x.shape == (2, 64)


def test_multiple_shards_same_tokens(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    one = prepare(tmp_path, corpus)
    many = prepare(tmp_path, corpus, shard_tokens=500, tokenizer=one.tokenizer)
    assert len(many.train.arrays) > 3
    assert np.array_equal(one.train.tokens(), many.train.tokens())
    stream = many.train_stream(batch_size=4)
    for _ in range(many.train.num_windows(16) // 4 + 2):
        x, y = next(stream)
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_duplicate_documents_never_empty_the_train_split(tmp_path):
    (tmp_path / "twins").mkdir()  # identical files: one hash, so no split can separate them; all train
    for name in ("a.txt", "b.txt"):
        (tmp_path / "twins" / name).write_text("the same words in both files\n" * 40)
    data = prepare(tmp_path, tmp_path / "twins")
    assert data.train.num_documents == 2 and data.heldout.num_documents == 0
    (tmp_path / "periodic").mkdir()  # 9 identical pieces (the smallest hash) and one other: all 9 were held out
    (tmp_path / "periodic" / "a.txt").write_text("xxxxxxxxx\n" * 9 + "fin\n")  # would leave almost nothing to train
    data = prepare(tmp_path, tmp_path / "periodic", max_doc_chars=10, tokenizer=data.tokenizer)
    assert data.train.num_documents == 10 and data.heldout.num_documents == 0


def test_damaged_shard_cache_is_a_user_error(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    data = prepare(tmp_path, corpus)
    meta = data.shards_dir / "meta.json"
    good = meta.read_bytes()
    meta.write_text("")
    with pytest.raises(UserError, match=f"shard cache {data.shards_dir} is damaged .*remove the folder"):
        prepare(tmp_path, corpus, tokenizer=data.tokenizer)
    meta.write_bytes(good)
    shard = data.shards_dir / data.train.meta["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(UserError, match=f"shard cache {data.shards_dir} is damaged .*{shard.name}"):
        prepare(tmp_path, corpus, tokenizer=data.tokenizer)


LINES = "".join(f"line {i} with ünïcode é€ {'x' * (i % 13)}\n" for i in range(400))


def _pieces(corpus, max_chars, **kw):
    """Pieces the shard builder tokenizes, as the whole-document reference computes them."""
    return [p for d in corpus.documents(**kw) for p in split_document(d.text, max_chars)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([LINES] * 4, 300)


def test_an_uncapped_shard_build_reads_a_huge_file_in_bounded_pieces(tmp_path, tok, monkeypatch):
    # a folder with one multi-GB text file: the whole file was read into one string (and split_document copied the
    # rest of it once per piece), so building the shards needed the file's size in memory and more
    monkeypatch.setattr(corpus_mod, "READ_BYTES", 1 << 12, raising=False)
    monkeypatch.setattr(shards_mod, "ENCODE_CHUNK_CHARS", 1 << 12)
    (tmp_path / "corpus").mkdir()
    big = tmp_path / "corpus" / "big.txt"
    big.write_text(LINES * 240)  # 3.5 MB
    tracemalloc.start()
    try:
        shards_mod._write_splits(Corpus(tmp_path / "corpus"), tok, tmp_path, 2**62, 2000, 1 << 20, False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < big.stat().st_size // 4, peak


def test_pieces_read_in_small_pieces_are_those_of_the_whole_documents(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(LINES * 3)
    (tmp_path / "b.txt").write_text("é" * 5000)  # a two-byte character across every read boundary
    (tmp_path / "c.txt").write_text("no newline at all " * 300)
    (tmp_path / "d.txt").write_text(" \n\t" * 3000)  # whitespace only: dropped, though larger than a read
    (tmp_path / "e.txt").write_bytes(LINES.encode() * 3 + b"\xff")  # not UTF-8 at the very end: skipped whole
    (tmp_path / "f.txt").write_bytes(LINES.encode() * 3 + b"\x00")  # binary at the very end: skipped whole
    (tmp_path / "g.jsonl").write_text(json.dumps({"text": LINES}) + "\n")
    for cap in (None, 30_000, 41_235):
        whole = Corpus(tmp_path, max_bytes=cap)
        want = _pieces(whole, 700)
        monkeypatch.setattr(corpus_mod, "READ_BYTES", 997, raising=False)
        corpus = Corpus(tmp_path, max_bytes=cap)
        got = list(corpus.pieces(700))
        monkeypatch.undo()
        assert got == want and corpus.stats == whole.stats
        assert corpus.stats.bytes == sum(len(p.encode()) for p in want)
        if cap is None:
            assert corpus.stats.skipped == 2 and corpus.stats.files == 7 and corpus.stats.documents == 4
    assert split_document(LINES * 3, 700) == list(corpus_mod.split_text(iter(LINES * 3), 700))


def test_shard_build_racing_another_process_uses_the_finished_one(tmp_path):
    from elastic_moe.shards import _cached_build

    dest = tmp_path / "shards"

    def build(tmp: Path) -> None:
        (tmp / "meta.json").write_text("mine")
        dest.mkdir()  # another process finishes first
        (dest / "meta.json").write_text("theirs")

    _cached_build(dest, build)
    assert (dest / "meta.json").read_text() == "theirs"


@pytest.mark.parametrize("damage", ["documents", "corpus_stats"])
def test_a_shard_cache_meta_without_a_field_is_a_one_line_corrupt_cache_error(tmp_path, damage):
    from elastic_moe.shards import prepare_data

    (tmp_path / "c.txt").write_text("".join(f"document line {i}\n" for i in range(200)))
    kw = dict(vocab_size=300, seq_len=8, cache_dir=tmp_path / "cache", progress=False, log=lambda _: None)
    data = prepare_data(tmp_path / "c.txt", None, **kw)
    meta_path = data.shards_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "documents":
        del meta["splits"]["heldout"]["documents"]
    else:
        del meta["corpus_stats"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="is damaged"):
        prepare_data(tmp_path / "c.txt", None, **kw)


@pytest.mark.parametrize("max_chars", [0, -1])
def test_splitting_into_pieces_of_no_characters_is_refused_at_once(max_chars):
    from elastic_moe.corpus import split_text
    from elastic_moe.shards import split_document

    with pytest.raises(ValueError, match="max_chars"):
        split_text(["abc\ndef\n"], max_chars)
    with pytest.raises(ValueError, match="max_chars"):
        split_document("abc\ndef\n", max_chars)


class _Windows:
    """A stand-in for TokenShards: window w is [w, w, ..., w] (seq_len + 1 tokens)."""

    def __init__(self, n):
        self.n = n

    def num_windows(self, seq_len):
        return self.n

    def window(self, w, seq_len):
        return np.full(seq_len + 1, w, dtype=np.int64)


def test_heldout_max_batches_counts_batches_not_windows():
    """Catches `n = min(n, max_batches)`: max_batches=2 of batch size 4 is 8 windows, not 2 (the existing test checks
    only the number of batches, which is 1 either way for max_batches=1)."""
    got = heldout_batches(_Windows(10), batch_size=4, seq_len=3, max_batches=2)
    assert [len(x) for x, _ in got] == [4, 4]
    assert torch.cat([x[:, 0] for x, _ in got]).tolist() == list(range(8))
    assert [len(x) for x, _ in heldout_batches(_Windows(10), 4, 3, max_batches=5)] == [4, 4, 2]


def _shard_folder(folder, n_tokens: int):
    """A hand-made shard cache of one train shard holding tokens 0 .. n_tokens-1 (and an empty held-out split)."""
    folder.mkdir()
    np.arange(n_tokens, dtype=np.uint16).tofile(folder / "train.0000.bin")
    meta = {"dtype": "uint16", "corpus_stats": {},
            "splits": {"train": {"shards": [{"file": "train.0000.bin", "tokens": n_tokens}], "documents": 1},
                       "heldout": {"shards": [], "documents": 0}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("n_tokens", [12, 13, 14])
def test_every_window_has_seq_len_plus_one_tokens_even_when_the_shard_is_a_multiple_of_seq_len(tmp_path, n_tokens):
    """Windows of seq_len + 1 tokens start every seq_len tokens and never run past the shard's end: a shard of 12
    tokens holds 2 windows of 4 + 1 (a third would need token 12), 13 tokens hold 3."""
    shards = TokenShards(_shard_folder(tmp_path / "s", n_tokens))
    assert shards.num_windows(4) == (n_tokens - 1) // 4
    for w in range(shards.num_windows(4)):
        assert shards.window(w, 4).tolist() == list(range(4 * w, 4 * w + 5))
