"""Review s27: corpus reading, shard packing, family / Pareto, CLI argument handling."""

import json
import tracemalloc

import pytest

from elastic_moe import corpus as corpus_mod
from elastic_moe import shards as shards_mod
from elastic_moe.corpus import Corpus
from elastic_moe.errors import UserError
from elastic_moe.shards import split_document
from elastic_moe.tokenizer import Tokenizer

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


def test_a_jsonl_file_saved_with_a_byte_order_mark_keeps_its_first_record(tmp_path):
    # Windows tools (Notepad, PowerShell's Out-File) start UTF-8 files with a BOM: json.loads refused the first line,
    # which was dropped as "not UTF-8 or not JSON"
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n", encoding="utf-8-sig")
    corpus = Corpus(path)
    assert [d.text for d in corpus.documents()] == ["first", "second"]
    assert corpus.stats.skipped_lines == 0


def test_a_data_path_that_is_a_pipe_is_named_as_such_not_as_missing(tmp_path):
    # `--data <(zcat corpus.txt.gz)` hands over /dev/fd/63, a pipe: "data path not found" sent the user looking for
    # a missing file
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"^data path .*pipe is not a file or folder \(a pipe or device\)"):
        Corpus(fifo)
    with pytest.raises(UserError, match="data path not found"):
        Corpus(tmp_path / "nope")
