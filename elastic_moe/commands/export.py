"""elastic-moe export CKPT OUT_DIR [--layers N | --layer-ids i,j] [--experts M] [--top-k K] [--force]"""

from __future__ import annotations

from pathlib import Path

HELP = "write a (sub-)model as a Hugging Face Ernie4_5_MoeForCausalLM folder"
DTYPES = ("float32", "bfloat16", "float16")  # hf.EXPORT_DTYPES' names, without importing torch to parse arguments


def add_spec_arguments(p) -> None:
    g = p.add_argument_group("sub-model")
    g.add_argument("--layers", type=int, help="keep N layers (by the model's layer importance, else evenly spaced)")
    g.add_argument("--layer-ids", help="keep exactly these layers, e.g. 0,2,3")
    g.add_argument("--experts", type=int, help="keep the first M experts of every MoE layer (by importance)")
    g.add_argument("--top-k", help="routing top-k (one value, or one per MoE layer: 2,2,1)")


def spec_from_args(args):
    from elastic_moe.spec import SubModelSpec

    return SubModelSpec.parse(args.layers, args.layer_ids, args.experts, args.top_k)


def add_arguments(p) -> None:
    p.add_argument("ckpt", help="checkpoint folder or run directory (its latest checkpoint)")
    p.add_argument("out_dir")
    add_spec_arguments(p)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights' dtype in the folder (default float32; the router stays fp32, as transformers keeps it)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty OUT_DIR")


def run(args) -> int:
    from elastic_moe.atomic import refuse_occupied
    from elastic_moe.checkpoint import load_checkpoint
    from elastic_moe.errors import UserError
    from elastic_moe.hf import export_hf

    model, meta = load_checkpoint(args.ckpt)
    try:
        refuse_occupied(args.out_dir, args.force, inputs=(meta["path"],))
    except FileExistsError as e:
        raise UserError(str(e)) from None
    spec = spec_from_args(args)
    tok = Path(meta["path"]) / "tokenizer"
    cfg = export_hf(model, args.out_dir, spec, tok if tok.is_dir() else None, force=args.force, dtype=args.dtype)
    total = cfg.num_params()
    print(f"exported {spec.describe()} -> {args.out_dir} "
          f"({cfg.num_hidden_layers} layers, {cfg.moe_num_experts} experts, top-{cfg.moe_k}, {total / 1e6:.2f} M params, "
          f"{args.dtype})")
    return 0
