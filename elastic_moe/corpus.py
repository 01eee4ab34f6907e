"""Find and read the documents of a pre-training corpus.

    corpus = Corpus(None)                       # default: the running interpreter's standard-library sources
    corpus = Corpus("notes/")                   # a folder: every file below it, recursively
    corpus = Corpus("data.jsonl", jsonl_field="text", max_bytes=1 << 20)
    for doc in corpus.documents(): ...          # Document(source, text), deterministic order
    for text in corpus.pieces(32768): ...       # the same documents cut at line ends, huge files read in parts
    corpus.stats                                # files, skipped, documents, bytes of the last pass

A plain file is one document. A `.jsonl` file holds one JSON object per line; the string under `jsonl_field` is one
document. Binary files (a NUL byte) and files that are not UTF-8 are skipped and counted, never fatal; so are
JSONL lines that are not UTF-8 or not JSON. Whitespace-only documents are dropped silently (e.g. empty
`__init__.py`). Files are read in sorted path order, hidden files and folders and `__pycache__` are left out
(and, in the default corpus only, `site-packages`).
`max_bytes` caps the UTF-8 bytes of text yielded (the last document is cut to fit), so tiny runs stay tiny.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from elastic_moe.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
READ_BYTES = 1 << 20  # files are read this much at a time


@dataclass
class Document:
    source: str  # file path, or "path:line" for a JSONL record
    text: str


@dataclass
class CorpusStats:
    files: int = 0  # files read (usable or not)
    skipped: int = 0  # binary or non-UTF-8 files
    skipped_files: list[str] = field(default_factory=list)  # the first few of them, to name in the log
    skipped_lines: int = 0  # JSONL lines that are not UTF-8 or not JSON
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents yielded

    def line(self) -> str:
        text = f"corpus: {self.files} files, {self.skipped} skipped (binary or non-UTF-8"
        if self.skipped_files:
            more = self.skipped - len(self.skipped_files)
            text += ": " + ", ".join(self.skipped_files) + (f" and {more} more" if more > 0 else "")
        text += ")"
        if self.skipped_lines:
            text += f", {self.skipped_lines} JSONL lines skipped (not UTF-8 or not JSON)"
        return text + f", {self.documents} documents, {self.bytes / 1e6:.1f} MB"


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, only_py: bool) -> list[Path]:
    """The files below `root`; `only_py` (the default corpus): its `*.py` files, site-packages left out."""
    out = []
    skip = ("__pycache__", "site-packages") if only_py else ("__pycache__",)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip]
        for name in filenames:
            if name.startswith(".") or (only_py and not name.endswith(".py")):
                continue
            p = Path(dirpath) / name
            if p.is_file():
                out.append(p)
    # Sort on the relative path's parts, so the order does not depend on the file system or on the separator.
    return sorted(out, key=lambda p: p.relative_to(root).parts)


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _scan(path: Path) -> tuple[list[str] | None, bool] | None:
    """(the file's text in pieces, or None when it is larger than one read; whether it is whitespace only), or None
    when it is binary (a NUL byte) or not UTF-8. Read `READ_BYTES` at a time, so that a huge file is checked whole
    (taken or skipped whatever a cap keeps) without being held in memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    texts: list[str] | None = []
    blank = True
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            if b"\x00" in chunk:
                return None
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError:
                return None
            blank = blank and not text.strip()
            if texts is not None and f.tell() <= READ_BYTES:
                texts.append(text)
            else:
                texts = None  # read again a piece at a time, see _read_pieces
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return None
    return texts, blank


def _read_pieces(path: Path) -> Iterator[str]:
    """The text of a file that `_scan` found usable, `READ_BYTES` at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_BYTES):
                yield decoder.decode(chunk)
            yield decoder.decode(b"", final=True)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} changed while it was read (it is no longer UTF-8 text)") from None


def split_text(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """The text of `chunks` joined, cut into pieces of at most `max_chars` characters at line ends where there is
    one: the pieces of the whole text, with no more than one chunk and one piece in memory."""
    if max_chars < 1:  # checked on the call, not on the first piece: a piece of no characters never ends the text
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    return _split_text(chunks, max_chars)


def _split_text(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    buf = ""
    for chunk in chunks:
        buf += chunk
        start = 0
        while len(buf) - start > max_chars:
            cut = buf.rfind("\n", start, start + max_chars) + 1 or start + max_chars
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
    if buf.strip():
        yield buf


class Corpus:
    def __init__(self, data_path: str | Path | Sequence[str | Path] | None = None, jsonl_field: str = "text",
                 max_bytes: int | None = None):
        if data_path is None:
            root = default_corpus_root()
            self.roots = [root]
            self.files = _walk(root, only_py=True)
        else:
            paths = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
            if any(str(p) == "" for p in paths):  # Path("") is the current folder: never what was meant
                raise UserError("data path is empty: give a corpus file or folder")
            self.roots = [Path(p).expanduser() for p in paths]
            self.files = []
            for root in self.roots:
                if root.is_dir():
                    self.files += _walk(root, only_py=False)
                elif root.is_file():
                    self.files.append(root)
                elif root.exists():  # read more than once (tokenizer, shards), so a stream will not do
                    raise UserError(f"data path {root} is not a file or folder (a pipe or device); save the text "
                                    "to a file and pass that")
                else:
                    raise UserError(f"data path not found: {root}")
        if max_bytes is not None and max_bytes <= 0:
            raise UserError(f"corpus: max_bytes must be positive, got {max_bytes}")
        self.jsonl_field = jsonl_field
        self.max_bytes = max_bytes
        self.stats = CorpusStats()

    @property
    def name(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def total_bytes(self) -> int:
        """Bytes on disk (an upper bound of the text yielded; for progress bars)."""
        total = sum(_stat(f).st_size for f in self.files)
        return min(total, self.max_bytes) if self.max_bytes else total

    def fingerprint(self) -> str:
        """Hash of everything that decides the documents: file list, sizes, mtimes, field, cap."""
        h = hashlib.sha256(json.dumps({"field": self.jsonl_field, "max_bytes": self.max_bytes}).encode())
        for f in self.files:
            st = _stat(f)
            h.update(os.fsencode(f.resolve()) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())  # any path bytes
        return h.hexdigest()

    def empty_error(self) -> UserError:
        return UserError(f"empty corpus: no usable text in {self.name} ({self.stats.line()})")

    def documents(self, max_bytes: int | None = None) -> Iterator[Document]:
        """One pass over the corpus (at most `max_bytes` of it, if given); `self.stats` counts what it has seen."""
        for source, chunks in self._documents(max_bytes):
            yield Document(source, "".join(chunks))

    def pieces(self, max_chars: int, max_bytes: int | None = None) -> Iterator[str]:
        """The documents of `documents` cut by `split_text` into pieces of at most `max_chars` characters, a large
        file read a part at a time (never whole in memory)."""
        for _, chunks in self._documents(max_bytes):
            yield from split_text(chunks, max_chars)

    def _documents(self, max_bytes: int | None) -> Iterator[tuple[str, Iterator[str]]]:
        """(source, the document's text in chunks) of every document, the chunks cut to the cap."""
        self.stats = CorpusStats()
        caps = [c for c in (self.max_bytes, max_bytes) if c is not None]
        left = [min(caps) if caps else None]  # bytes still to yield, shared with _all_documents
        for source, chunks in self._all_documents(left):
            if left[0] is not None and left[0] <= 0:
                return
            self.stats.documents += 1
            yield source, self._capped(chunks, left)

    def _capped(self, chunks: Iterator[str], left: list[int | None]) -> Iterator[str]:
        for text in chunks:
            data = text.encode("utf-8")
            if left[0] is not None:
                if left[0] <= 0:
                    return
                if len(data) > left[0]:
                    text = data[:left[0]].decode("utf-8", errors="ignore")  # cut on a character boundary
                    data = text.encode("utf-8")
                left[0] -= len(data)
            self.stats.bytes += len(data)
            yield text
            if left[0] is not None and left[0] <= 0:  # the cap is reached: read no further part
                return

    def _all_documents(self, left: list[int | None]) -> Iterator[tuple[str, Iterator[str]]]:
        for path in self.files:
            if left[0] is not None and left[0] <= 0:  # the cap is reached: read no further file
                return
            self.stats.files += 1
            if path.name.lower().endswith(JSONL_SUFFIXES):
                for doc in self._jsonl(path):
                    yield doc.source, iter([doc.text])
                continue
            try:
                scanned = _scan(path)
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            if scanned is None:
                self._skip(path)
            elif not scanned[1]:  # not whitespace only
                texts = scanned[0]
                yield str(path), iter(texts) if texts is not None else _read_pieces(path)

    def _skip(self, path: Path) -> None:
        self.stats.skipped += 1
        if len(self.stats.skipped_files) < 3:
            self.stats.skipped_files.append(str(path))

    def _jsonl(self, path: Path) -> Iterator[Document]:
        try:
            f = open(path, "rb")  # closed by the `with` below
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        with f:
            head = f.read(8192)
            if b"\x00" in head:
                self._skip(path)
                return
            f.seek(0)
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))  # a BOM may lead
                except (UnicodeDecodeError, json.JSONDecodeError):
                    self.stats.skipped_lines += 1
                    continue
                if not isinstance(record, dict) or self.jsonl_field not in record:
                    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"{path}:{lineno}: no field {self.jsonl_field!r} (found: {keys}); "
                                    "name the text field with data.jsonl_field (e.g. --set data.jsonl_field=content)")
                text = record[self.jsonl_field]
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: field {self.jsonl_field!r} is {type(text).__name__}, "
                                    "not a string")
                try:
                    text.encode("utf-8")  # JSON may escape a lone surrogate ("\\ud800"), which is no UTF-8
                except UnicodeEncodeError:
                    self.stats.skipped_lines += 1
                    continue
                if text.strip():
                    yield Document(f"{path}:{lineno}", text)

    def stats_dict(self) -> dict:
        """The counts, as shard caches have always stored them (the skipped files' names go beside them, so that
        an older version reading a newer cache finds the fields it knows)."""
        return {k: v for k, v in asdict(self.stats).items() if k != "skipped_files"}

    @staticmethod
    def stats_from_meta(meta: dict) -> CorpusStats:
        """CorpusStats from a shard cache's meta.json (`corpus_stats` + `skipped_files`)."""
        known = {f.name for f in fields(CorpusStats)}
        counts = {k: v for k, v in meta["corpus_stats"].items() if k in known}
        return CorpusStats(**counts, skipped_files=list(meta.get("skipped_files", [])))
