"""Corpus reading: folders, files and JSONL in a fixed order, skipped and counted files, byte caps on character
boundaries, fingerprints, the embedded standard-library default, and one-line errors for unusable data paths."""

import json
import os
import tracemalloc

import pytest

from elastic_moe.corpus import Corpus, default_corpus_root
from elastic_moe.errors import UserError


def make_tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second file\n")
    (root / "a.txt").write_text("first file, with ünïcode\n")
    (root / "sub" / "c.py").write_text("def f():\n    return 1\n")
    (root / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (root / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (root / "empty.py").write_text("")
    (root / ".hidden").write_text("never read")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.txt").write_text("never read")


def test_folder_order_skips_and_counts(tmp_path):
    make_tree(tmp_path)
    corpus = Corpus(tmp_path)
    docs = list(corpus.documents())
    assert [d.source.split("/")[-1] for d in docs] == ["a.txt", "b.txt", "c.py"]
    assert docs[0].text == "first file, with ünïcode\n"
    assert corpus.stats.files == 6 and corpus.stats.skipped == 2 and corpus.stats.documents == 3
    assert corpus.stats.line().startswith("corpus: 6 files, 2 skipped (binary or non-UTF-8: ")
    assert len(corpus.stats.skipped_files) == 2 and str(tmp_path / "blob.bin") in corpus.stats.line()
    for i in range(4):  # more than three: three named, the rest counted
        (tmp_path / f"z{i}.bin").write_bytes(b"\x00")
    corpus = Corpus(tmp_path)
    list(corpus.documents())
    assert corpus.stats.skipped == 6 and len(corpus.stats.skipped_files) == 3 and "and 3 more)" in corpus.stats.line()


def test_empty_corpus_error_names_path(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    corpus = Corpus(tmp_path)
    assert list(corpus.documents()) == []
    err = corpus.empty_error()
    assert isinstance(err, UserError) and str(tmp_path) in str(err) and "\n" not in str(err)
    assert "1 skipped" in str(err)


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Corpus(tmp_path / "nope")


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"body": "one"}), "", "{not json", json.dumps({"body": "two", "id": 2}), json.dumps({"body": " "})]
    path.write_text("\n".join(lines) + "\n")
    corpus = Corpus(path, jsonl_field="body")
    assert [d.text for d in corpus.documents()] == ["one", "two"]
    assert corpus.stats.skipped_lines == 1 and corpus.stats.files == 1
    with pytest.raises(UserError, match="no field 'text' .*--set data.jsonl_field="):
        list(Corpus(path).documents())


def test_max_bytes_cuts_on_character_boundary(tmp_path):
    (tmp_path / "a.txt").write_text("ab" * 10)
    (tmp_path / "b.txt").write_text("é" * 10)  # 2 bytes each
    corpus = Corpus(tmp_path, max_bytes=25)
    texts = [d.text for d in corpus.documents()]
    assert texts == ["ab" * 10, "é" * 2]
    assert corpus.stats.bytes == 24
    assert [d.text for d in corpus.documents(max_bytes=4)] == ["abab"]


def test_fingerprint_tracks_files(tmp_path):
    make_tree(tmp_path)
    fp = Corpus(tmp_path).fingerprint()
    assert Corpus(tmp_path).fingerprint() == fp
    assert Corpus(tmp_path, max_bytes=10).fingerprint() != fp
    (tmp_path / "b.txt").write_text("changed, and longer\n")
    assert Corpus(tmp_path).fingerprint() != fp


def test_default_corpus_is_stdlib_sources():
    corpus = Corpus(None, max_bytes=200_000)
    root = default_corpus_root()
    assert len(corpus.files) > 500
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in corpus.files)
    assert corpus.files == sorted(corpus.files, key=lambda p: p.relative_to(root).parts)
    docs = list(corpus.documents())
    assert docs and sum(len(d.text.encode()) for d in docs) == 200_000


def test_jsonl_lone_surrogate_is_a_skipped_line(tmp_path):
    path = tmp_path / "data.jsonl"  # valid JSON whose string cannot be UTF-8 encoded (a lone surrogate escape)
    path.write_text('{"text": "bad \\ud800 half pair"}\n{"text": "good"}\n')
    corpus = Corpus(path)
    assert [d.text for d in corpus.documents()] == ["good"]
    assert corpus.stats.skipped_lines == 1


def test_file_that_disappears_is_a_user_error(tmp_path):
    for name in ("a.jsonl", "b.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')
        corpus = Corpus(tmp_path)
        (tmp_path / name).unlink()
        for use in (corpus.fingerprint, corpus.total_bytes, lambda c=corpus: list(c.documents())):
            with pytest.raises(UserError, match=f"cannot read .*{name}: No such file"):
                use()


def test_fingerprint_of_a_folder_whose_name_is_not_utf8(tmp_path):
    # `family --data` / `extract` read such a corpus without writing its path into a config: it must hash

    root = os.fsdecode(bytes(tmp_path) + b"/corp\xff")
    os.mkdir(root)
    (tmp_path / os.fsdecode(b"corp\xff") / "a.txt").write_text("some text\n")
    assert len(Corpus(root).fingerprint()) == 64


def test_a_capped_pass_reads_no_more_of_a_huge_file_than_it_keeps(tmp_path):
    # the tokenizer trains on the first 10 MB of the corpus: a multi-GB file must not be loaded whole for that, nor
    # a file after the cap is reached

    from elastic_moe.corpus import Corpus

    (tmp_path / "a_big.txt").write_text("word " * (4 << 20))  # 20 MB
    (tmp_path / "b_bad.txt").write_bytes(b"ok " * 1000 + b"\xff")  # not UTF-8 past the cap: still skipped
    (tmp_path / "c_big.txt").write_text("next " * (4 << 20))
    corpus = Corpus(tmp_path)
    tracemalloc.start()
    try:
        docs = list(corpus.documents(max_bytes=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["word " * 200]
    assert peak < 8 << 20, peak
    capped = Corpus(tmp_path, max_bytes=(20 << 20) + 10)  # the file not UTF-8 past the cap is skipped as before
    assert [len(d.text) for d in capped.documents()] == [20 << 20, 10] and capped.stats.skipped == 1


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

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"^data path .*pipe is not a file or folder \(a pipe or device\)"):
        Corpus(fifo)
    with pytest.raises(UserError, match="data path not found"):
        Corpus(tmp_path / "nope")


@pytest.mark.parametrize("path", ["", [""], ["a", ""]])
def test_an_empty_data_path_is_refused_not_read_as_the_current_folder(path, tmp_path, monkeypatch):
    from elastic_moe.corpus import Corpus

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_text("some text\n")
    with pytest.raises(UserError, match="empty"):
        Corpus(path)


def test_a_user_corpus_keeps_its_site_packages_folder(tmp_path):
    from elastic_moe.corpus import Corpus, default_corpus_root

    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "notes.txt").write_text("kept\n")
    (tmp_path / "top.txt").write_text("top\n")
    assert [f.name for f in Corpus(tmp_path).files] == ["notes.txt", "top.txt"]
    assert all("site-packages" not in f.relative_to(default_corpus_root()).parts for f in Corpus(None).files)


def test_a_binary_jsonl_file_is_skipped_and_counted(tmp_path):
    """A .jsonl file holding a NUL byte is skipped like any binary file: counted in `skipped` and named."""
    (tmp_path / "a.txt").write_text("plain text\n")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x"}\n\x00\x01\x02')
    corpus = Corpus(tmp_path)
    docs = list(corpus.documents())
    assert [d.text for d in docs] == ["plain text\n"]
    assert corpus.stats.files == 2 and corpus.stats.skipped == 1
    assert corpus.stats.skipped_files == [str(tmp_path / "b.jsonl")]


def test_a_file_ending_in_a_truncated_utf8_character_is_skipped_and_counted(tmp_path):
    """A file whose last bytes are the start of a multi-byte character is not UTF-8: skipped and counted, not
    read with the incomplete character silently dropped."""
    (tmp_path / "a.txt").write_text("good text\n")
    (tmp_path / "b.txt").write_bytes("cut in the middle of €".encode()[:-1])
    corpus = Corpus(tmp_path)
    docs = list(corpus.documents())
    assert [d.source for d in docs] == [str(tmp_path / "a.txt")]
    assert corpus.stats.skipped == 1 and corpus.stats.skipped_files == [str(tmp_path / "b.txt")]
