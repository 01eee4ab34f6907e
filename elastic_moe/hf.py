"""Hugging Face interop: export any sub-model as a standard `Ernie4_5_MoeForCausalLM` folder, and import one.

The export holds only the kept layers (renumbered) and experts, with the tensor names and per-expert layout of the
published ERNIE-4.5 checkpoints (`mlp.experts.{j}.gate_proj.weight`, `mlp.moe_statics.e_score_correction_bias`),
which is what transformers' `save_pretrained` writes and what vLLM and SGLang load. Experts are written most
important first (the model's `expert_order`), so an exported model keeps its width ranking through an import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elastic_moe.atomic import atomic_dir, default_mode
from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.model import ElasticMoE
from elastic_moe.spec import ResolvedSpec, SubModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers keeps these in fp32 whatever the model's dtype (`_keep_in_fp32_modules_strict`): routing decisions
# depend on small score gaps, so a reduced-precision export stores them in fp32 too
FP32_SUFFIXES = (".mlp.gate.weight", ".mlp.moe_statics.e_score_correction_bias")


def moe_pattern(flags: list[bool]) -> tuple[int, int, int]:
    """(start, end, interval) such that transformers' rule reproduces `flags` (is layer i MoE?)."""
    n = len(flags)
    if not any(flags):
        return 0, n - 1, n + 1  # an interval longer than the model: no MoE layer
    for interval in range(1, n + 1):
        for start in range(n):
            end = max(i for i, f in enumerate(flags) if f)
            if [((i + 1) % interval == 0 and start <= i <= end) for i in range(n)] == flags:
                return start, end, interval
    raise UserError(f"the kept layers' dense/MoE pattern {['moe' if f else 'dense' for f in flags]} cannot be "
                    "expressed by moe_layer_start_index/end_index/interval")


def sub_config(cfg: ModelConfig, rs: ResolvedSpec) -> ModelConfig:
    flags = [cfg.is_moe_layer(i) for i in rs.layers]
    start, end, interval = moe_pattern(flags)
    ks = set(rs.top_k.values())
    if len(ks) > 1:
        raise UserError(f"per-layer top-k {sorted(ks)} cannot be expressed in a Hugging Face config (one moe_k)")
    ns = {rs.num_experts(i, cfg) for i in rs.experts}
    if len(ns) > 1:
        raise UserError(f"different expert counts per layer {sorted(ns)} cannot be expressed in a Hugging Face config")
    d = cfg.to_dict()
    d.update(num_hidden_layers=len(rs.layers), moe_layer_start_index=start, moe_layer_end_index=end,
             moe_layer_interval=interval, moe_k=ks.pop() if ks else cfg.moe_k,
             moe_num_experts=ns.pop() if ns else cfg.moe_num_experts)
    return ModelConfig(**d)


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "dtype": dtype,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.dim_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps, "use_cache": True, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"}, "rope_theta": cfg.rope_theta,
        "use_bias": cfg.use_bias, "moe_intermediate_size": cfg.moe_intermediate_size, "moe_k": cfg.moe_k,
        "moe_num_experts": cfg.moe_num_experts, "moe_num_shared_experts": cfg.moe_num_shared_experts,
        "moe_layer_start_index": cfg.moe_layer_start_index, "moe_layer_end_index": cfg.moe_end,
        "moe_layer_interval": cfg.moe_layer_interval, "moe_norm_min": cfg.moe_norm_min,
        "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }


def _split_linear(out: dict, prefix: str, names: list[str], sizes: list[int], w: torch.Tensor, b: torch.Tensor | None):
    for name, part in zip(names, w.split(sizes, dim=0)):
        out[f"{prefix}.{name}.weight"] = part.contiguous()
    if b is not None:
        for name, part in zip(names, b.split(sizes, dim=0)):
            out[f"{prefix}.{name}.bias"] = part.contiguous()


def hf_state_dict(model: ElasticMoE, rs: ResolvedSpec) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    D, nq, nkv = cfg.dim_head, cfg.num_attention_heads, cfg.num_key_value_heads
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
        if cfg.use_bias:
            out["lm_head.bias"] = sd["lm_head.bias"]
    for j, i in enumerate(rs.layers):
        src, dst = f"blocks.{i}", f"model.layers.{j}"
        out[f"{dst}.input_layernorm.weight"] = sd[f"{src}.attn_norm.weight"]
        out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.mlp_norm.weight"]
        _split_linear(out, f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"], [nq * D, nkv * D, nkv * D],
                      sd[f"{src}.attn.qkv.weight"], sd.get(f"{src}.attn.qkv.bias"))
        out[f"{dst}.self_attn.o_proj.weight"] = sd[f"{src}.attn.o.weight"]
        if cfg.use_bias:
            out[f"{dst}.self_attn.o_proj.bias"] = sd[f"{src}.attn.o.bias"]
        if not cfg.is_moe_layer(i):
            _mlp(out, f"{dst}.mlp", f"{src}.mlp", sd, cfg.intermediate_size, cfg.use_bias)
            continue
        kept = rs.experts[i] or tuple(range(cfg.moe_num_experts))
        # most important first, so that "the first m experts" of the written model are the same experts
        rank = {e: r for r, e in enumerate(model.moe(i).expert_order.tolist())}
        kept = sorted(kept, key=rank.__getitem__)
        ids = torch.tensor(kept)
        out[f"{dst}.mlp.gate.weight"] = sd[f"{src}.mlp.router"][ids].contiguous()
        out[f"{dst}.mlp.moe_statics.e_score_correction_bias"] = sd[f"{src}.mlp.bias"][ids][None].contiguous()
        inner = cfg.moe_intermediate_size
        for new, e in enumerate(kept):
            w1, w2 = sd[f"{src}.mlp.w_gate_up"][e], sd[f"{src}.mlp.w_down"][e]
            out[f"{dst}.mlp.experts.{new}.gate_proj.weight"] = w1[:, :inner].t().contiguous()
            out[f"{dst}.mlp.experts.{new}.up_proj.weight"] = w1[:, inner:].t().contiguous()
            out[f"{dst}.mlp.experts.{new}.down_proj.weight"] = w2.t().contiguous()
        if cfg.moe_num_shared_experts:
            _mlp(out, f"{dst}.mlp.shared_experts", f"{src}.mlp.shared", sd,
                 inner * cfg.moe_num_shared_experts, cfg.use_bias)
    return out


def _mlp(out, dst, src, sd, inner, bias):
    _split_linear(out, dst, ["gate_proj", "up_proj"], [inner, inner], sd[f"{src}.gate_up.weight"],
                  sd.get(f"{src}.gate_up.bias") if bias else None)
    out[f"{dst}.down_proj.weight"] = sd[f"{src}.down.weight"]
    if bias:
        out[f"{dst}.down_proj.bias"] = sd[f"{src}.down.bias"]


def cast_for_export(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Weights in `dtype` (one of EXPORT_DTYPES), the router's gate and correction bias kept in fp32."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    to = EXPORT_DTYPES[dtype]
    return {k: v if k.endswith(FP32_SUFFIXES) else v.to(to) for k, v in tensors.items()}


def export_hf(model: ElasticMoE, out_dir: str | Path, spec: SubModelSpec | ResolvedSpec | None = None,
              tokenizer_dir: str | Path | None = None, force: bool = False, dtype: str = "float32") -> ModelConfig:
    """Write the sub-model at `spec` as a Hugging Face folder in `dtype`; returns its (standalone) config."""
    rs = model.resolve(spec)
    cfg = sub_config(model.cfg, rs)
    tok = None
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        from elastic_moe.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer_dir)  # a malformed tokenizer is refused, not copied into the export
        if tok.vocab_size > cfg.vocab_size:
            raise UserError(f"tokenizer {tokenizer_dir} has {tok.vocab_size} tokens, more than the model's "
                            f"vocab_size {cfg.vocab_size}")
    tensors = cast_for_export(hf_state_dict(model, rs), dtype)
    try:
        with atomic_dir(out_dir, force=force) as tmp:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            default_mode(tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                 "do_sample": False}, indent=2) + "\n")
            if tok is not None:  # written anew, not copied: a checkpoint saved before the BOS template gets it too
                tok.save(tmp, model_max_length=cfg.max_position_embeddings)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    return cfg


# ------------------------------------------------------------------------------------------------ import
def config_from_hf(d: dict, where: str) -> ModelConfig:
    if d.get("model_type") != "ernie4_5_moe":
        raise UserError(f"{where}: model_type is {d.get('model_type')!r}, expected 'ernie4_5_moe'")
    try:
        return _config_from_hf(d, where)
    except UserError:
        raise
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, IndexError, KeyError) as e:
        raise UserError(f"{where}: config.json has a malformed value ({type(e).__name__}: {e})") from None


def _config_from_hf(d: dict, where: str) -> ModelConfig:
    rope = d.get("rope_parameters") or {}
    # transformers also reads `rope_scaling`, what transformers 4.x writes (its older spelling: "type")
    for scaling in (rope, d.get("rope_scaling") or {}):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise UserError(f"{where}: rope_type {kind!r} is not supported (only 'default')")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
    n_layers = d.get("num_hidden_layers", 28)
    heads = d.get("num_attention_heads", 20)
    head_dim = d.get("head_dim") or d.get("hidden_size", 2560) // heads

    def pick(name, default):
        v = d.get(name, default)
        return default if v is None else v

    eos = pick("eos_token_id", 2)
    cfg = ModelConfig(
        vocab_size=pick("vocab_size", 103424), hidden_size=pick("hidden_size", 2560),
        intermediate_size=pick("intermediate_size", 12288), num_hidden_layers=n_layers, num_attention_heads=heads,
        num_key_value_heads=pick("num_key_value_heads", 4), head_dim=head_dim,  # transformers' default, as all here
        # the names Ernie4_5_MoeConfig.attribute_map also accepts
        moe_num_experts=pick("moe_num_experts", pick("num_experts", 64)), moe_k=pick("moe_k", pick("num_experts_per_tok", 6)),
        moe_intermediate_size=pick("moe_intermediate_size", 1536),
        moe_num_shared_experts=pick("moe_num_shared_experts", 2), moe_layer_start_index=pick("moe_layer_start_index", 1),
        moe_layer_end_index=pick("moe_layer_end_index", -1), moe_layer_interval=pick("moe_layer_interval", 1),
        moe_norm_min=pick("moe_norm_min", 1e-12), rms_norm_eps=pick("rms_norm_eps", 1e-5),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 500000.0))),
        max_position_embeddings=pick("max_position_embeddings", 131072),
        tie_word_embeddings=pick("tie_word_embeddings", True), use_bias=pick("use_bias", False),
        initializer_range=pick("initializer_range", 0.02), pad_token_id=pick("pad_token_id", 0),
        bos_token_id=pick("bos_token_id", 1), eos_token_id=eos[0] if isinstance(eos, list) else eos)
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


def read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_bytes().decode("utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{hf_dir}: {index.name} is corrupt ({type(e).__name__}: {e})") from None
        if not all(isinstance(f, str) for f in files):
            raise UserError(f"{hf_dir}: {index.name} is corrupt (its weight_map names no files)")
    tensors = {}
    for f in files:
        if not (hf_dir / f).is_file():
            raise UserError(f"{hf_dir}: {f} is missing (only safetensors checkpoints are supported)")
        try:
            tensors.update(load_file(str(hf_dir / f)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{hf_dir}: {f} is corrupt ({e})") from None
    return tensors


def import_hf(hf_dir: str | Path) -> ElasticMoE:
    """Read a Hugging Face ERNIE-4.5-MoE folder (ours, or written by transformers) into an ElasticMoE."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        d = json.loads((hf_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{hf_dir}: config.json is corrupt ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{hf_dir}: config.json is corrupt (not a JSON object)")
    cfg = config_from_hf(d, str(hf_dir))
    return from_hf_tensors(cfg, read_hf_tensors(hf_dir), str(hf_dir))


def from_hf_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> ElasticMoE:
    try:
        return _from_hf_tensors(cfg, tensors, where)
    except RuntimeError as e:  # torch.cat / stack of tensors whose shapes disagree with each other or the config
        raise UserError(f"{where}: tensor shapes do not fit config.json ({str(e).splitlines()[0]})") from None


def _from_hf_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], where: str) -> ElasticMoE:
    t = {k.removeprefix("model."): v.float() for k, v in tensors.items()}
    hf_dir = where
    sd = {}

    def take(name):
        if name not in t:
            raise UserError(f"{hf_dir}: tensor {name} is missing")
        return t.pop(name)

    sd["embed.weight"] = take("embed_tokens.weight")
    sd["norm.weight"] = take("norm.weight")
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
        if cfg.use_bias:
            sd["lm_head.bias"] = take("lm_head.bias")
    t.pop("lm_head.weight", None)
    # transformers' tied head keeps a bias of its own with use_bias (zeros unless trained); ours has none
    head_bias = t.pop("lm_head.bias", None)
    if head_bias is not None and head_bias.any():
        raise UserError(f"{hf_dir}: lm_head.bias is not zero, but a head tied to the embeddings (tie_word_embeddings) "
                        "or without use_bias has no bias here")
    for i in range(cfg.num_hidden_layers):
        s, o = f"layers.{i}", f"blocks.{i}"
        sd[f"{o}.attn_norm.weight"] = take(f"{s}.input_layernorm.weight")
        sd[f"{o}.mlp_norm.weight"] = take(f"{s}.post_attention_layernorm.weight")
        sd[f"{o}.attn.qkv.weight"] = torch.cat([take(f"{s}.self_attn.{n}_proj.weight") for n in "qkv"])
        sd[f"{o}.attn.o.weight"] = take(f"{s}.self_attn.o_proj.weight")
        if cfg.use_bias:
            sd[f"{o}.attn.qkv.bias"] = torch.cat([take(f"{s}.self_attn.{n}_proj.bias") for n in "qkv"])
            sd[f"{o}.attn.o.bias"] = take(f"{s}.self_attn.o_proj.bias")
        if not cfg.is_moe_layer(i):
            _import_mlp(sd, take, f"{s}.mlp", f"{o}.mlp", cfg.use_bias)
            continue
        sd[f"{o}.mlp.router"] = take(f"{s}.mlp.gate.weight")
        bias, in_memory = (f"{s}.mlp{g}.moe_statics.e_score_correction_bias" for g in ("", ".gate"))
        if bias not in t and in_memory in t:  # transformers' in-memory name, which it loads too
            bias = in_memory
        sd[f"{o}.mlp.bias"] = take(bias).reshape(-1)
        if f"{s}.mlp.experts.gate_up_proj" in t:  # fused 3D layout (transformers in memory)
            gu, dn = take(f"{s}.mlp.experts.gate_up_proj"), take(f"{s}.mlp.experts.down_proj")  # (E,2I,H), (E,H,I)
            sd[f"{o}.mlp.w_gate_up"] = gu.transpose(1, 2).contiguous()
            sd[f"{o}.mlp.w_down"] = dn.transpose(1, 2).contiguous()
        else:
            gu, dn = [], []
            for e in range(cfg.moe_num_experts):
                p = f"{s}.mlp.experts.{e}"
                gu.append(torch.cat([take(f"{p}.gate_proj.weight"), take(f"{p}.up_proj.weight")]).t())
                dn.append(take(f"{p}.down_proj.weight").t())
            sd[f"{o}.mlp.w_gate_up"] = torch.stack(gu).contiguous()
            sd[f"{o}.mlp.w_down"] = torch.stack(dn).contiguous()
        if cfg.moe_num_shared_experts:
            _import_mlp(sd, take, f"{s}.mlp.shared_experts", f"{o}.mlp.shared", cfg.use_bias)
        sd[f"{o}.mlp.load"] = torch.zeros(cfg.moe_num_experts)
        sd[f"{o}.mlp.expert_order"] = torch.arange(cfg.moe_num_experts)
    sd["layer_order"] = torch.arange(cfg.num_hidden_layers)
    sd["layer_order_set"] = torch.tensor(False)
    leftover = sorted(k for k in t if not k.startswith("mtp"))
    if leftover:
        raise UserError(f"{hf_dir}: unexpected tensors {leftover[:3]}{' ...' if len(leftover) > 3 else ''}")
    from elastic_moe.checkpoint import load_state

    model = ElasticMoE(cfg)  # only now: a full-size model is built (and initialised) only for a complete folder
    load_state(model, sd, str(hf_dir))
    return model


def _import_mlp(sd, take, src, dst, bias):
    sd[f"{dst}.gate_up.weight"] = torch.cat([take(f"{src}.gate_proj.weight"), take(f"{src}.up_proj.weight")])
    sd[f"{dst}.down.weight"] = take(f"{src}.down_proj.weight")
    if bias:
        sd[f"{dst}.gate_up.bias"] = torch.cat([take(f"{src}.gate_proj.bias"), take(f"{src}.up_proj.bias")])
        sd[f"{dst}.down.bias"] = take(f"{src}.down_proj.bias")


def extract(model: ElasticMoE, spec: SubModelSpec | ResolvedSpec | None) -> ElasticMoE:
    """The sub-model at `spec` as a standalone ElasticMoE (kept layers renumbered, kept experts only).

    Goes through the same tensor mapping as the Hugging Face export, so the two cannot disagree; both write the kept
    experts in importance order, so the standalone model's identity `expert_order` carries the measured one over.
    """
    rs = model.resolve(spec)
    sub = from_hf_tensors(sub_config(model.cfg, rs), hf_state_dict(model, rs), "sub-model")
    return sub.to(next(model.parameters()).device)
