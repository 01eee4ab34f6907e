"""elastic-moe import-hf HF_DIR OUT_CKPT [--force]"""

from __future__ import annotations

import tempfile
from pathlib import Path

HELP = "read a Hugging Face ERNIE-4.5-MoE folder (ours or transformers') into an elastic-moe checkpoint"


def add_arguments(p) -> None:
    p.add_argument("hf_dir")
    p.add_argument("out_ckpt")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty OUT_CKPT")


def run(args) -> int:
    from elastic_moe.atomic import refuse_occupied
    from elastic_moe.checkpoint import save_checkpoint
    from elastic_moe.errors import UserError
    from elastic_moe.hf import TOKENIZER_FILES, import_hf

    out = Path(args.out_ckpt)
    try:
        refuse_occupied(out, args.force, inputs=(args.hf_dir,))
    except FileExistsError as e:
        raise UserError(str(e)) from None
    hf = Path(args.hf_dir)
    tokenizer, why = None, f"{hf} has no tokenizer.json"
    if (hf / "tokenizer.json").is_file():
        tokenizer, why = usable_tokenizer(hf)
    model = import_hf(hf)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{hf}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                        f"{model.cfg.vocab_size}")
    with tempfile.TemporaryDirectory(prefix="emoe-import-") as tmp:  # the tokenizer's files alone, not the weights
        tok = None
        if tokenizer is not None:
            tok = Path(tmp)
            for name in TOKENIZER_FILES:
                if (hf / name).is_file():
                    (tok / name).write_bytes((hf / name).read_bytes())
        save_checkpoint(out, model, meta={"source": str(hf)}, tokenizer_dir=tok, force=args.force)
    print(f"imported {hf} -> {out} ({model.num_params() / 1e6:.2f} M params)")
    if tokenizer is None:
        print(f"note: {why}, so the checkpoint has no tokenizer: `generate`, `sft` and the RL "
              "commands need one (copy a tokenizer folder into CKPT/tokenizer)")
    return 0


def usable_tokenizer(hf: Path):
    """(the folder's tokenizer, None), or (None, why) when its tokenizer.json is a valid one of another model (not
    ours: other special tokens). A malformed one is refused before the weights are read, not copied over."""
    from tokenizers import Tokenizer as HFTokenizer

    from elastic_moe.errors import UserError
    from elastic_moe.tokenizer import Tokenizer

    try:
        Tokenizer(HFTokenizer.from_file(str(hf / "tokenizer.json")))
    except UserError as e:
        return None, f"{hf / 'tokenizer.json'} is not an elastic-moe tokenizer ({e})"
    except Exception:  # noqa: BLE001 - malformed (the Rust side raises a bare Exception): Tokenizer.load says so
        pass
    return Tokenizer.load(hf), None
