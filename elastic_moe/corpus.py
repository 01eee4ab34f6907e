"""Find and read the documents of a pre-training corpus.

    corpus = Corpus(None)                       # default: the running interpreter's standard-library sources
    corpus = Corpus("notes/")                   # a folder: every file below it, recursively
    corpus = Corpus("data.jsonl", jsonl_field="text", max_bytes=1 << 20)
    for doc in corpus.documents(): ...          # Document(source, text), deterministic order
    corpus.stats                                # files, skipped, documents, bytes of the last pass

A plain file is one document. A `.jsonl` file holds one JSON object per line; the string under `jsonl_field` is one
document. Binary files (a NUL byte) and files that are not UTF-8 are skipped and counted, never fatal; so are
JSONL lines that are not UTF-8 or not JSON. Whitespace-only documents are dropped silently (e.g. empty
`__init__.py`). Files are read in sorted path order, hidden files and folders and `__pycache__` are left out.
`max_bytes` caps the UTF-8 bytes of text yielded (the last document is cut to fit), so tiny runs stay tiny.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from elastic_moe.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


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
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("__pycache__", "site-packages")]
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


def _read_text(path: Path, limit: int | None) -> tuple[str | None, bool]:
    """(the file's text, or its first `limit` UTF-8 bytes cut on a character boundary; whether the whole file is
    whitespace), or (None, True) when it is binary (a NUL byte) or not UTF-8. Read a chunk at a time, so a capped
    pass never holds a huge file in memory, and the file is taken or skipped whatever the cap."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    texts, head, kept, blank = [], [], 0, True
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if b"\x00" in chunk:
                return None, True
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError:
                return None, True
            blank = blank and not text.strip()
            if limit is None:
                texts.append(text)
            elif kept < limit:
                head.append(chunk[:limit - kept])
                kept += len(head[-1])
        try:
            texts.append(decoder.decode(b"", final=True))
        except UnicodeDecodeError:
            return None, True
    return ("".join(texts) if limit is None else b"".join(head).decode("utf-8", errors="ignore")), blank


class Corpus:
    def __init__(self, data_path: str | Path | Sequence[str | Path] | None = None, jsonl_field: str = "text",
                 max_bytes: int | None = None):
        if data_path is None:
            root = default_corpus_root()
            self.roots = [root]
            self.files = _walk(root, only_py=True)
        else:
            paths = [data_path] if isinstance(data_path, (str, Path)) else list(data_path)
            self.roots = [Path(p).expanduser() for p in paths]
            self.files = []
            for root in self.roots:
                if root.is_dir():
                    self.files += _walk(root, only_py=False)
                elif root.is_file():
                    self.files.append(root)
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
        self.stats = CorpusStats()
        caps = [c for c in (self.max_bytes, max_bytes) if c is not None]
        left = [min(caps) if caps else None]  # bytes still to yield, shared with _all_documents
        for doc in self._all_documents(left):
            data = doc.text.encode("utf-8")
            if left[0] is not None:
                if left[0] <= 0:
                    return
                if len(data) > left[0]:
                    doc.text = data[:left[0]].decode("utf-8", errors="ignore")  # cut on a character boundary
                    data = doc.text.encode("utf-8")
                left[0] -= len(data)
            self.stats.documents += 1
            self.stats.bytes += len(data)
            yield doc

    def _all_documents(self, left: list[int | None]) -> Iterator[Document]:
        for path in self.files:
            if left[0] is not None and left[0] <= 0:  # the cap is reached: read no further file
                return
            self.stats.files += 1
            if path.name.lower().endswith(JSONL_SUFFIXES):
                yield from self._jsonl(path)
                continue
            try:
                text, blank = _read_text(path, left[0])  # a capped pass keeps only what it needs
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            if text is None:
                self._skip(path)
            elif not blank:
                yield Document(str(path), text)

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
                    record = json.loads(raw.decode("utf-8"))
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
