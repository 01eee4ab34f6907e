"""Our forward and generation against transformers' Ernie4_5_MoeForCausalLM loaded from our export."""

import json

import pytest
import torch
from helpers import PARITY_CONFIGS, hf_config_kwargs, tiny_model

from elastic_moe.checkpoint import load_checkpoint, save_checkpoint
from elastic_moe.errors import UserError
from elastic_moe.generate import SamplingParams, generate
from elastic_moe.hf import export_hf, extract, import_hf
from elastic_moe.spec import SubModelSpec

transformers = pytest.importorskip("transformers")


def specs_for(model):
    cfg = model.cfg
    n_moe = len(cfg.moe_layers)
    k = cfg.moe_k
    yield SubModelSpec()
    yield SubModelSpec(layers=3)
    yield SubModelSpec(experts=max(k, 5), top_k=max(1, k - 1))
    ids = tuple(tuple(sorted(torch.randperm(8, generator=torch.Generator().manual_seed(j))[:k + 1].tolist()))
                for j in range(n_moe))
    yield SubModelSpec(layers=(0, 1, 3), experts=ids, top_k=k)


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name,overrides", PARITY_CONFIGS, ids=[c[0] for c in PARITY_CONFIGS])
def test_export_matches_transformers(tmp_path, name, overrides):
    model = tiny_model(seed=len(name), **overrides)
    x = torch.randint(3, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    for n, spec in enumerate(specs_for(model)):
        out = tmp_path / f"hf{n}"
        export_hf(model, out, spec)
        hf = hf_load(out)
        with torch.no_grad():
            ours = model(x, spec).logits
            theirs = hf(x).logits
        assert (ours - theirs).abs().max().item() < 1e-4, (name, spec)
        # greedy generation of 32 tokens, token for token
        prompt = x[0, :6].tolist()
        mine = generate(model, [prompt], SamplingParams(max_new_tokens=32, temperature=0), spec, eos_id=-1)[0].tokens
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
        assert mine == ref, (name, spec)
        # a standalone sub-model written as our checkpoint equals the elastic forward at that spec
        save_checkpoint(tmp_path / f"sub{n}", extract(model, spec))
        sub = load_checkpoint(tmp_path / f"sub{n}")[0].eval()
        with torch.no_grad():
            assert (sub(x).logits - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,overrides", PARITY_CONFIGS[:3], ids=[c[0] for c in PARITY_CONFIGS[:3]])
def test_import_of_transformers_save_pretrained(tmp_path, name, overrides):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(3)
    hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_kwargs(overrides))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.moe_statics.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf").eval()
    x = torch.randint(3, 101, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() < 1e-4
    prompt = x[1, :5].tolist()
    mine = generate(ours, [prompt], SamplingParams(max_new_tokens=32, temperature=0), eos_id=-1)[0].tokens
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    assert mine == ref


def test_import_of_a_sharded_transformers_folder(tmp_path):
    # the published ERNIE-4.5 checkpoints are sharded (model-0000x-of-0000y.safetensors + an index)
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(4)
    hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_kwargs(PARITY_CONFIGS[0][1]))).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    ours = import_hf(tmp_path / "hf").eval()
    x = torch.randint(3, 101, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() < 1e-4
    sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(UserError, match="is missing"):
        import_hf(tmp_path / "hf")


def test_import_refuses_a_missing_tensor_before_building_the_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import elastic_moe.hf as hf_module

    export_hf(tiny_model(), tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    built = []  # a model of the folder's full size is built and initialised only once every tensor is there
    monkeypatch.setattr(hf_module, "ElasticMoE", lambda cfg: built.append(cfg))
    with pytest.raises(UserError, match="k_proj.weight is missing"):
        import_hf(tmp_path / "hf")
    assert built == []



def test_bf16_export_keeps_the_router_in_fp32_and_matches_transformers(tmp_path):
    from safetensors import safe_open

    model = tiny_model(seed=5, **PARITY_CONFIGS[1][1]).eval()
    export_hf(model, tmp_path / "bf16", SubModelSpec(layers=3), dtype="bfloat16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    router = {k for k in dtypes if k.endswith((".mlp.gate.weight", ".e_score_correction_bias"))}
    assert router and {dtypes[k] for k in router} == {"F32"}
    assert {v for k, v in dtypes.items() if k not in router} == {"BF16"}
    # the same weights rounded to bf16, in fp32: what the bf16 folder holds
    rounded = tiny_model(seed=5, **PARITY_CONFIGS[1][1]).eval()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if not name.endswith("mlp.router"):
                p.copy_(p.bfloat16().float())
    x = torch.randint(3, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = rounded(x, SubModelSpec(layers=3)).logits
        assert (ours - hf_load(tmp_path / "bf16")(x).logits).abs().max().item() < 1e-4
        assert (ours - import_hf(tmp_path / "bf16")(x).logits).abs().max().item() < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(UserError, match="export dtype 'int8'"):
        export_hf(model, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_the_cli_dtype_choices_are_the_export_dtypes():
    from elastic_moe.commands.export import DTYPES
    from elastic_moe.hf import EXPORT_DTYPES

    assert DTYPES == tuple(EXPORT_DTYPES)


def test_a_config_without_optional_fields_reads_as_transformers_reads_it(tmp_path):
    # transformers' Ernie4_5_MoeConfig defaults fill what config.json leaves out: num_key_value_heads is 4, not
    # num_attention_heads
    model = tiny_model(seed=6, num_attention_heads=8, num_key_value_heads=4)
    export_hf(model, tmp_path / "hf")
    d = json.loads((tmp_path / "hf" / "config.json").read_text())
    del d["num_key_value_heads"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(d))
    x = torch.randint(3, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = import_hf(tmp_path / "hf").eval()(x).logits
        assert (ours - model(x).logits).abs().max().item() < 1e-5
        assert (ours - hf_load(tmp_path / "hf")(x).logits).abs().max().item() < 1e-4
