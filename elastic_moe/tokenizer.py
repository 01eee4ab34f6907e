"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), saved in the form `transformers.AutoTokenizer` loads.

    tok = Tokenizer.train(texts, vocab_size=8192)    # seconds on ~10 MB, deterministic
    tok.save(run_dir / "tokenizer")                  # tokenizer.json, tokenizer_config.json, special_tokens_map.json
    tok = Tokenizer.load(run_dir / "tokenizer")
    ids = tok.encode("def f(): pass")                # plain text: "</s>" in it is text, never the EOS token
    ids, mask = tok.encode_chat_with_mask(messages)  # SFT: mask is 1 on assistant content and its closing </s>

The special tokens are `chat.SPECIAL_TOKENS` with ids 0, 1, 2, ... in that order (`<pad>`=0, `<s>`=1, `</s>`=2).
They are atomic: the tokenizer never splits them, and no merge of normal text can produce them, because the
byte-level pre-tokenizer cuts `<`, letters and `>` into separate words before merging. `encode` treats their
strings in raw text as plain text (a corpus file that contains "</s>" must not inject an EOS); the chat encoders
insert their ids directly. `tokenizer_config.json` carries `chat.CHAT_TEMPLATE`, so transformers'
`apply_chat_template(messages, tokenize=False)` equals `chat.render(messages)`; with `tokenize=True` it equals
`encode_chat(messages)` unless a message contains a special-token string or assistant content starts with
whitespace (we encode the "\\n" after a role token on its own, as generation sees it after the prompt).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from elastic_moe.atomic import atomic_write_json, atomic_write_text
from elastic_moe.chat import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS
from elastic_moe.errors import UserError

MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the 256 byte symbols
DEFAULT_MODEL_MAX_LENGTH = 4096  # ModelConfig.max_position_embeddings' default


class Tokenizer:
    def __init__(self, tok: HFTokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        for i, s in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(s) != i:
                raise UserError(f"tokenizer: special token {s!r} has id {tok.token_to_id(s)}, expected {i}")
        self._tok = tok
        self._lit = HFTokenizer.from_str(tok.to_str())  # literal twin: special-token strings are plain text
        self._lit.encode_special_tokens = True
        self.model_max_length = model_max_length
        self.pad_id, self.bos_id, self.eos_id = (tok.token_to_id(s) for s in (PAD, BOS, EOS))
        self.role_ids = {role: tok.token_to_id(t) for role, t in ROLE_TOKENS.items()}
        self._newline = self.encode("\n")

    # --- training, saving, loading

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        if vocab_size < MIN_VOCAB:
            raise UserError(f"tokenizer: vocab_size must be at least {MIN_VOCAB}, got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save_if_missing(self, path: str | Path) -> None:
        """`save` into a run's own tokenizer folder unless it is already complete (the file `save` writes last is
        there): a run folder keeps its tokenizer across resumes."""
        if not (Path(path) / "special_tokens_map.json").is_file():
            self.save(path)

    def save(self, path: str | Path, model_max_length: int | None = None) -> None:
        """Write the Hugging Face form into folder `path` (created if needed; other files in it are kept)."""
        path = Path(path)
        roles = list(ROLE_TOKENS.values())
        special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": roles}
        config = {
            **special_map,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": model_max_length or self.model_max_length,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        atomic_write_text(path / "tokenizer.json", self._with_bos().to_str(pretty=True))
        atomic_write_json(path / "tokenizer_config.json", config)
        atomic_write_json(path / "special_tokens_map.json", special_map)

    def _with_bos(self) -> HFTokenizer:
        """The saved form: `<s>` in front of every text encoded with special tokens, as in pre-training (every
        document starts with `<s>`), so transformers' and vLLM's `tokenizer(text)` gives what the model saw. Our own
        encoders never add special tokens, and `load` drops it again (the fingerprint is of the tokenizer without it)."""
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, self.bos_id)])
        return tok

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"no tokenizer.json in {path}")
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
            spec["post_processor"] = None  # `save` adds the BOS template; in memory the tokenizer is as trained
            tok = HFTokenizer.from_str(json.dumps(spec))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise UserError(f"malformed tokenizer {file}: {str(e).splitlines()[0]}") from None
        max_len = DEFAULT_MODEL_MAX_LENGTH
        config = path / "tokenizer_config.json"
        if config.is_file():
            try:
                max_len = json.loads(config.read_text(encoding="utf-8")).get("model_max_length", max_len)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise UserError(f"malformed tokenizer config {config}: {e}") from None
        return cls(tok, model_max_length=max_len)

    # --- encoding

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text` (no BOS/EOS added); special-token strings are plain text unless `allow_special`."""
        try:
            return (self._tok if allow_special else self._lit).encode(text, add_special_tokens=False).ids
        except TypeError:
            _refuse_unencodable([text])
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts at once, in parallel threads (without offsets, which we never use)."""
        try:
            return [e.ids for e in self._lit.encode_batch_fast(list(texts), add_special_tokens=False)]
        except TypeError:
            _refuse_unencodable(texts)
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Ids of `chat.render(messages, add_generation_prompt)`, with message contents taken literally."""
        ids, _ = self._chat(messages, add_generation_prompt)
        return ids

    def encode_chat_with_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask): the mask is 1 exactly on assistant content tokens and the `</s>` that closes them."""
        return self._chat(messages, False)

    def _chat(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        for m in messages:
            if m["role"] not in ROLE_TOKENS:
                raise ValueError(f"unknown chat role {m['role']!r} (known: {', '.join(ROLE_TOKENS)})")
        contents = self.encode_batch([m["content"] for m in messages])
        nl = self._newline
        ids, mask = [self.bos_id], [0]
        for m, content in zip(messages, contents):
            learn = 1 if m["role"] == "assistant" else 0
            ids += [self.role_ids[m["role"]], *nl, *content, self.eos_id]
            mask += [0] * (1 + len(nl)) + [learn] * (len(content) + 1)
        if add_generation_prompt:
            ids += [self.role_ids["assistant"], *nl]
            mask += [0] * (1 + len(nl))
        return ids, mask


def _refuse_unencodable(texts: Sequence[str]) -> None:
    """The Rust tokenizer says only "must be str" for a text it cannot take: name the text and what is wrong."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"text {i} to tokenize is a {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"text {i} to tokenize is not valid Unicode: lone surrogate {text[e.start]!r} at "
                            f"character {e.start} (undecodable bytes read with surrogateescape?)") from None
