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
    from elastic_moe.tokenizer import Tokenizer

    out = Path(args.out_ckpt)
    try:
        refuse_occupied(out, args.force, inputs=(args.hf_dir,))
    except FileExistsError as e:
        raise UserError(str(e)) from None
    hf = Path(args.hf_dir)
    has_tokenizer = (hf / "tokenizer.json").is_file()
    if has_tokenizer:
        Tokenizer.load(hf)  # a malformed tokenizer is refused before the weights are read, not copied over
    model = import_hf(hf)
    with tempfile.TemporaryDirectory(prefix="emoe-import-") as tmp:  # the tokenizer's files alone, not the weights
        tok = None
        if has_tokenizer:
            tok = Path(tmp)
            for name in TOKENIZER_FILES:
                if (hf / name).is_file():
                    (tok / name).write_bytes((hf / name).read_bytes())
        save_checkpoint(out, model, meta={"source": str(hf)}, tokenizer_dir=tok, force=args.force)
    print(f"imported {hf} -> {out} ({model.num_params() / 1e6:.2f} M params)")
    if not has_tokenizer:
        print(f"note: {hf} has no tokenizer.json, so the checkpoint has no tokenizer: `generate`, `sft` and the RL "
              "commands need one (copy a tokenizer folder into CKPT/tokenizer)")
    return 0
