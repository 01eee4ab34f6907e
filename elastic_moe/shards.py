"""Pre-training data: tokenizer, memory-mapped token shards, a resumable rank-sharded stream, held-out batches.

The training loop calls one function:

    data = prepare_data(data_path, out_dir, vocab_size=8192, seq_len=512)   # data_path None: the stdlib sources
    stream = data.train_stream(batch_size=8, rank=rank, world_size=world_size, seed=0)
    x, y = next(stream)                         # int64 [batch_size, seq_len]; y is x shifted left by one token
    state = stream.state_dict()                 # save with the checkpoint ...
    stream.load_state_dict(state)               # ... and after resuming, the very same batches follow
    for x, y in data.heldout_batches(batch_size=8, max_batches=20): ...   # the same fixed set every time
    data.tokenizer.save(export_dir, model_max_length=...)                 # with every exported model

What `prepare_data` does, each step cached under `cache_dir` in a folder named by a hash of its inputs, so a
second run with the same corpus (file list, sizes, mtimes) and settings reuses the work:

1. Tokenizer: byte-level BPE trained on the first `tokenizer_sample_mb` MB of the corpus (unless one is given),
   saved into `out_dir/tokenizer` in Hugging Face form.
2. Documents longer than `max_doc_chars` are cut at line ends into several documents (so a single large file can
   still have a held-out part). Each document is stored as `<s> text </s>`. A document goes to the held-out split
   when a hash of its text falls below `heldout_frac` (so duplicates land on the same side); if that leaves a
   split empty, the document with the smallest (largest) hash moves over, so tiny corpora still get both (not when
   its copies are more than half of the documents: then all of them train).
3. Tokens are appended to `{split}.NNNN.bin` files of at most `shard_tokens` tokens (uint16 when the vocabulary
   fits, else uint32), read back with `np.memmap`; the folder appears atomically with its `meta.json`.

Training samples are non-overlapping windows of `seq_len + 1` tokens inside a shard, visited in a fresh
permutation each epoch (seeded by `seed` and the epoch). Global sample g of the run is read by the rank that owns
it: step s of rank r reads samples `p + r*B ... p + r*B + B-1` with `p = s*B*world_size`, so the rank-ordered
concatenation of one step's batches is exactly the batch of one process with batch size `B*world_size`. The state
is the global sample position, which is the same on every rank, so a run can also resume on a different number
of ranks or batch size and continue where it left off. In DDP, call `prepare_data` on rank 0 first, then barrier,
then on the other ranks (they find everything cached).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from elastic_moe.atomic import atomic_dir, atomic_write_json
from elastic_moe.corpus import Corpus, split_text
from elastic_moe.errors import UserError, require
from elastic_moe.tokenizer import Tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
ENCODE_CHUNK_CHARS = 1 << 20  # text handed to one encode_batch call: big enough to keep all threads busy
Batch = tuple[torch.Tensor, torch.Tensor]


def _print(msg: str) -> None:
    print(msg, flush=True)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ELASTIC_MOE_CACHE", Path.home() / ".cache" / "elastic_moe"))


def doc_hash(text: str) -> int:
    """64-bit hash of a document's text; the held-out split compares it with `heldout_frac * 2**64`."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def split_document(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars` characters, at line ends where there is one."""
    return list(split_text([text], max_chars))


def tokenizer_sample_check(mb: float) -> tuple[bool, str]:
    """A (condition, message) pair for `data.tokenizer_sample_mb`: the sample is read in whole bytes, so less than
    one byte reads no text at all."""
    return (1 <= mb * 1e6 < float("inf"),
            f"data.tokenizer_sample_mb = {mb} must be a finite number of at least 1e-06 (one byte)")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --- building shards


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._file = None
        self._hash = hashlib.blake2b(digest_size=16)  # of the split's tokens in order: a resume checks it

    def write(self, ids: np.ndarray) -> None:
        self.documents += 1
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open()
            n = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            data = ids[:n].astype(self.dtype).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.shards[-1]["tokens"] += n
            ids = ids[n:]

    def _open(self) -> None:
        self.close()
        name = f"{self.split}.{len(self.shards):04d}.bin"
        self._file = open(self.folder / name, "wb")  # closed in close()
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def meta(self) -> dict:
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "blake2b": self._hash.hexdigest()}


def _write_splits(corpus: Corpus, tok: Tokenizer, folder: Path, cut: int, max_doc_chars: int, shard_tokens: int,
                  progress: bool) -> tuple[dict, list[int]]:
    """One pass: tokenize every document into its split. Returns (per-split meta, all document hashes)."""
    for old in folder.glob("*.bin"):
        old.unlink()
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _ShardWriter(folder, s, dtype, shard_tokens) for s in SPLITS}
    hashes: list[int] = []
    pending: list[str] = []
    pending_chars = 0

    def flush() -> None:
        nonlocal pending_chars
        for text, ids in zip(pending, tok.encode_batch(pending)):
            h = doc_hash(text)
            hashes.append(h)
            doc = np.empty(len(ids) + 2, dtype=np.int64)
            doc[0], doc[1:-1], doc[-1] = tok.bos_id, ids, tok.eos_id
            writers["heldout" if h < cut else "train"].write(doc)
        pending.clear()
        pending_chars = 0

    bar = tqdm(total=corpus.total_bytes(), unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               mininterval=1.0)
    done = 0
    for piece in corpus.pieces(max_doc_chars):  # a huge file is read a part at a time
        pending.append(piece)
        pending_chars += len(piece)
        if pending_chars >= ENCODE_CHUNK_CHARS:
            flush()
            bar.update(corpus.stats.bytes - done)
            done = corpus.stats.bytes
    flush()
    bar.update(corpus.stats.bytes - done)
    bar.close()
    for w in writers.values():
        w.close()
    return {s: w.meta() for s, w in writers.items()}, hashes


def build_shards(corpus: Corpus, tok: Tokenizer, folder: Path, heldout_frac: float, max_doc_chars: int = 32768,
                 shard_tokens: int = 1 << 26, progress: bool = True, log: Callable[[str], None] = _print) -> dict:
    """Tokenize `corpus` into shards in `folder` (an empty folder; see `prepare_data` for atomicity)."""
    t0 = time.perf_counter()
    cut = int(heldout_frac * 2**64)
    splits, hashes = _write_splits(corpus, tok, folder, cut, max_doc_chars, shard_tokens, progress)
    if not hashes:
        raise corpus.empty_error()
    # Degenerate splits only happen on tiny corpora, so a second pass there costs nothing.
    # Copies of a text share its hash, so they move together: never all of the training text, nor most of it.
    new_cut = cut
    if len(hashes) == 1:
        new_cut = 0
    elif heldout_frac > 0 and splits["heldout"]["documents"] == 0:
        new_cut = min(hashes) + 1 if 2 * hashes.count(min(hashes)) <= len(hashes) else 0
    elif splits["train"]["documents"] == 0:
        new_cut = max(hashes)
    if new_cut != cut:
        cut = new_cut
        splits, hashes = _write_splits(corpus, tok, folder, cut, max_doc_chars, shard_tokens, progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in splits.values())
    meta = {
        "version": FORMAT_VERSION,
        "dtype": token_dtype(tok.vocab_size).name,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.fingerprint(),
        "corpus": corpus.name,
        "corpus_stats": corpus.stats_dict(),
        "skipped_files": corpus.stats.skipped_files,
        "heldout_frac": heldout_frac,
        "heldout_cut": cut,
        "heldout_by_hash": cut == int(heldout_frac * 2**64),  # False: a tiny corpus, split by the rule above
        "splits": splits,
        "build_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / max(seconds, 1e-9)),
    }
    atomic_write_json(folder / "meta.json", meta)
    log(f"tokenized {corpus.stats.bytes / 1e6:.1f} MB into {tokens:,} tokens in {seconds:.1f}s "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return meta


# --- reading shards


class TokenShards:
    """The token shards of one split, memory-mapped."""

    def __init__(self, folder: str | Path, split: str = "train"):
        self.folder = Path(folder)
        try:  # written atomically, so damage comes from outside (a cache cleaner, an edit)
            self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
            dtype = np.dtype(self.meta["dtype"])
            shards = [s for s in self.meta["splits"][split]["shards"] if s["tokens"] > 0]
            for s in shards:
                if (self.folder / s["file"]).stat().st_size != s["tokens"] * dtype.itemsize:
                    raise ValueError(f"{s['file']} is not {s['tokens']} tokens long")
            self.arrays = [np.memmap(self.folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                           for s in shards]
            self.num_documents = self.meta["splits"][split]["documents"]
            self.content_hash = self.meta["splits"][split].get("blake2b")  # None in caches built before it was kept
            Corpus.stats_from_meta(self.meta)  # what prepare_data logs
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"shard cache {self.folder} is damaged ({str(e).splitlines()[0]}); remove the folder "
                            "to build it again") from None
        self.num_tokens = sum(len(a) for a in self.arrays)
        self._windows: dict[int, np.ndarray] = {}

    def tokens(self) -> np.ndarray:
        """All tokens of the split in order (a copy; for tests and small splits)."""
        return np.concatenate([np.asarray(a) for a in self.arrays]) if self.arrays else np.zeros(0, np.int64)

    def _starts(self, seq_len: int) -> np.ndarray:
        """Cumulative window counts per shard: windows never cross shard ends."""
        if seq_len not in self._windows:
            counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
            self._windows[seq_len] = np.cumsum([0, *counts])
        return self._windows[seq_len]

    def num_windows(self, seq_len: int) -> int:
        return int(self._starts(seq_len)[-1])

    def window(self, w: int, seq_len: int) -> np.ndarray:
        """Window `w`: `seq_len + 1` consecutive tokens."""
        starts = self._starts(seq_len)
        s = int(np.searchsorted(starts, w, side="right")) - 1
        off = (w - int(starts[s])) * seq_len
        return self.arrays[s][off:off + seq_len + 1]


def _to_batch(rows: list[np.ndarray]) -> Batch:
    t = torch.from_numpy(np.stack(rows).astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TokenStream:
    """Endless, shuffled, rank-sharded batches of the train split, resumable exactly via `state_dict`."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_windows = shards.num_windows(seq_len)
        if self.num_windows == 0:
            raise UserError(f"corpus too small: {shards.num_tokens} training tokens, need at least {seq_len + 1} "
                            f"for one sequence of seq_len={seq_len}")
        self.position = 0  # global samples consumed so far, by all ranks together
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        return self.position / self.num_windows

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def sample(self, g: int) -> np.ndarray:
        epoch, i = divmod(g, self.num_windows)
        return self.shards.window(int(self._perm(epoch)[i]), self.seq_len)

    def next_batch(self) -> Batch:
        first = self.position + self.rank * self.batch_size
        rows = [self.sample(g) for g in range(first, first + self.batch_size)]
        self.position += self.batch_size * self.world_size
        return _to_batch(rows)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows, "tokens_hash": self.shards.content_hash}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "seq_len", "num_windows"):
            if state[k] != getattr(self, k):
                raise UserError(f"data stream state does not match: {k}={state[k]} in the checkpoint, "
                                f"{getattr(self, k)} now (different corpus, tokenizer or settings?)")
        saved, now = state.get("tokens_hash"), self.shards.content_hash
        if saved and now and saved != now:  # a corpus edited in place: same windows, other text
            raise UserError("data stream state does not match: the training tokens differ from the checkpoint's "
                            "(was the corpus edited since?); restore it, or train a new run into another --out")
        self.position = int(state["position"])


def heldout_batches(shards: TokenShards, batch_size: int, seq_len: int, max_batches: int | None = None) -> list[Batch]:
    """The held-out windows in order, batched; the last batch may be smaller. Same list every call."""
    n = shards.num_windows(seq_len)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    return [_to_batch([shards.window(w, seq_len) for w in range(i, min(i + batch_size, n))])
            for i in range(0, n, batch_size)]


# --- the one entry point


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    shards_dir: Path
    seq_len: int
    train: TokenShards
    heldout: TokenShards

    def train_stream(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> TokenStream:
        return TokenStream(self.train, batch_size, self.seq_len, rank=rank, world_size=world_size, seed=seed)

    def heldout_batches(self, batch_size: int, max_batches: int | None = None) -> list[Batch]:
        return heldout_batches(self.heldout, batch_size, self.seq_len, max_batches)


def _cached_build(folder: Path, build: Callable[[Path], None]) -> None:
    try:
        with atomic_dir(folder) as tmp:
            build(tmp)
    except FileExistsError:  # another process finished the same build first: its result is as good as ours
        if not folder.is_dir():
            raise


def prepare_data(data_path: str | Path | list[str | Path] | None, out_dir: str | Path | None, vocab_size: int = 8192,
                 seq_len: int = 512, heldout_frac: float = 0.01, tokenizer_sample_mb: float = 10.0,
                 jsonl_field: str = "text", max_bytes: int | None = None, max_doc_chars: int = 32768,
                 shard_tokens: int = 1 << 26, tokenizer: Tokenizer | str | Path | None = None,
                 cache_dir: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] = _print) -> PreparedData:
    """Corpus -> (tokenizer, train shards, held-out shards), all cached; see the module docstring."""
    if not 0 <= heldout_frac < 1:
        raise UserError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
    if seq_len < 1:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    corpus = Corpus(data_path, jsonl_field=jsonl_field, max_bytes=max_bytes)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = corpus.fingerprint()

    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer is None:
        require([tokenizer_sample_check(tokenizer_sample_mb)])
        sample_bytes = int(tokenizer_sample_mb * 1e6)
        tok_dir = cache / "tokenizers" / _key([FORMAT_VERSION, fingerprint, vocab_size, sample_bytes])

        def train(tmp: Path) -> None:
            t0 = time.perf_counter()
            texts = [doc.text for doc in corpus.documents(max_bytes=sample_bytes)]
            if not texts:
                raise corpus.empty_error()
            tok = Tokenizer.train(texts, vocab_size)
            tok.save(tmp)
            log(f"trained tokenizer (vocab {tok.vocab_size}) on {corpus.stats.bytes / 1e6:.1f} MB in "
                f"{time.perf_counter() - t0:.1f}s")

        if not (tok_dir / "tokenizer.json").is_file():
            _cached_build(tok_dir, train)
        tokenizer = Tokenizer.load(tok_dir)
    if out_dir is not None:
        tokenizer.save(Path(out_dir) / "tokenizer")

    shards_dir = cache / "shards" / _key([FORMAT_VERSION, fingerprint, tokenizer.fingerprint(), heldout_frac,
                                          max_doc_chars, shard_tokens])
    if not (shards_dir / "meta.json").is_file():
        _cached_build(shards_dir, lambda tmp: build_shards(corpus, tokenizer, tmp, heldout_frac, max_doc_chars,
                                                           shard_tokens, progress, log))
    else:
        log(f"using cached shards {shards_dir}")
    data = PreparedData(tokenizer, shards_dir, seq_len, TokenShards(shards_dir, "train"),
                        TokenShards(shards_dir, "heldout"))
    meta = data.train.meta
    log(Corpus.stats_from_meta(meta).line())
    log(f"data: {data.train.num_tokens:,} train tokens ({data.train.num_documents} documents), "
        f"{data.heldout.num_tokens:,} held-out tokens ({data.heldout.num_documents} documents)")
    if not meta.get("heldout_by_hash", True):
        docs = data.train.num_documents + data.heldout.num_documents
        log(f"note: too few documents to split at heldout_frac = {heldout_frac}: {data.heldout.num_documents} of "
            f"{docs} held out (documents are whole files or JSONL records, cut at {max_doc_chars:,} characters)")
    if data.heldout.num_windows(seq_len) == 0:
        log(f"warning: no held-out sequence of seq_len={seq_len} (held-out tokens: {data.heldout.num_tokens})")
    return data
