"""Hugging Face import and export edge cases: config aliases and legacy fields, tokenizers, tied heads with a bias,
the expert order, and extract's healing run against an existing Hugging Face folder."""

import json

import pytest
import torch
from helpers import FAST, PARITY_CONFIGS, hf_config_kwargs, small_tokenizer, tiny_model

from elastic_moe import cli
from elastic_moe.checkpoint import save_checkpoint
from elastic_moe.errors import UserError
from elastic_moe.hf import export_hf, extract, import_hf
from elastic_moe.spec import SubModelSpec

transformers = pytest.importorskip("transformers")


def hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    (folder / "config.json").write_text(json.dumps(d))


def test_legacy_rope_scaling_is_refused_not_ignored(tmp_path):
    # transformers reads a config.json's `rope_scaling` (what transformers 4.x writes) and scales RoPE by it; an
    # import that ignored it would give other logits than transformers with no word said
    export_hf(tiny_model(), tmp_path / "hf")
    edit_config(tmp_path / "hf", rope_parameters=None, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert hf_load(tmp_path / "hf").config.rope_parameters["rope_type"] == "linear"
    with pytest.raises(UserError, match="rope_type 'linear' is not supported"):
        import_hf(tmp_path / "hf")
    edit_config(tmp_path / "hf", rope_scaling={"type": "dynamic", "factor": 2.0})  # the older spelling
    with pytest.raises(UserError, match="rope_type 'dynamic' is not supported"):
        import_hf(tmp_path / "hf")
    # a transformers 4.x config: rope_theta at the top, rope_scaling null
    edit_config(tmp_path / "hf", rope_scaling=None, rope_theta=10000.0)
    (tmp_path / "hf" / "config.json").write_text(
        (tmp_path / "hf" / "config.json").read_text().replace("}", ', "rope_scaling": null}'))
    x = torch.randint(3, 101, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (import_hf(tmp_path / "hf").eval()(x).logits - hf_load(tmp_path / "hf")(x).logits).abs().max()
    assert diff < 1e-4


def test_config_with_transformers_attribute_aliases_imports(tmp_path):
    # Ernie4_5_MoeConfig.attribute_map: num_experts -> moe_num_experts, num_experts_per_tok -> moe_k
    model = tiny_model(seed=2, moe_k=3)
    export_hf(model, tmp_path / "hf")
    d = json.loads((tmp_path / "hf" / "config.json").read_text())
    edit_config(tmp_path / "hf", moe_num_experts=None, moe_k=None, num_experts=d["moe_num_experts"],
                num_experts_per_tok=d["moe_k"])
    hf = hf_load(tmp_path / "hf")
    assert (hf.config.moe_num_experts, hf.config.moe_k) == (8, 3)
    ours = import_hf(tmp_path / "hf").eval()
    assert (ours.cfg.moe_num_experts, ours.cfg.moe_k) == (8, 3)
    x = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max() < 1e-4


def test_a_folder_of_transformers_in_memory_names_imports(tmp_path):
    # `save_file(model.state_dict())` of a transformers model: fused experts and the bias under mlp.gate.moe_statics;
    # transformers loads it as it is
    from safetensors.torch import save_file
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(5)
    hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_kwargs(PARITY_CONFIGS[0][1]))).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.moe_statics.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert any(k.endswith("mlp.gate.moe_statics.e_score_correction_bias") for k in sd)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    x = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf_load(tmp_path / "hf")(x).logits - hf(x).logits).abs().max() < 1e-5
        assert (import_hf(tmp_path / "hf").eval()(x).logits - hf(x).logits).abs().max() < 1e-4


def test_a_non_boolean_use_bias_is_refused_by_name(tmp_path):
    export_hf(tiny_model(), tmp_path / "hf")
    edit_config(tmp_path / "hf", use_bias="false")  # bool("false") is True
    with pytest.raises(UserError, match="use_bias = 'false' is not a valid bool"):
        import_hf(tmp_path / "hf")


def test_a_config_error_names_the_folder_once(tmp_path):
    export_hf(tiny_model(), tmp_path / "hf")
    edit_config(tmp_path / "hf", rms_norm_eps=-1.0)
    with pytest.raises(UserError) as e:
        import_hf(tmp_path / "hf")
    assert str(e.value).count(str(tmp_path / "hf")) == 1 and "UserError" not in str(e.value), e.value


def foreign_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(path))


def test_import_hf_of_a_folder_with_another_tokenizer_imports_the_weights(tmp_path, capsys):
    # a transformers folder with its own (valid) tokenizer.json: the weights are what the user imports
    export_hf(tiny_model(), tmp_path / "hf")
    foreign_tokenizer(tmp_path / "hf" / "tokenizer.json")
    assert cli.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "not an elastic-moe tokenizer" in out and "no tokenizer" in out
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "tokenizer").exists()


def test_import_hf_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    tok = small_tokenizer()
    tok.save(tmp_path / "tok")
    model = tiny_model(vocab_size=tok.vocab_size)
    export_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    small = tiny_model(vocab_size=tok.vocab_size - 50)
    export_hf(small, tmp_path / "hf_small")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "hf_small" / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    assert cli.main(["import-hf", str(tmp_path / "hf_small"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tok.vocab_size} tokens, more than the model's vocab_size {tok.vocab_size - 50}" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_exported_tokenizer_states_the_models_context(tmp_path):
    tok = small_tokenizer()
    tok.save(tmp_path / "tok")  # saved with the default 4096
    model = tiny_model(vocab_size=tok.vocab_size, max_position_embeddings=256)
    save_checkpoint(tmp_path / "ck", model, tokenizer_dir=tmp_path / "tok")
    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == 256
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").model_max_length == 256


@pytest.fixture(scope="module")
def table(inputs, tmp_path_factory):
    from elastic_moe.family import Space, run_family
    from elastic_moe.measure import MeasureConfig

    out = tmp_path_factory.mktemp("fam")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    run_family(inputs, out, Space(layers=[2, 4], experts=[4], top_k=[1]), MeasureConfig(**FAST), progress=False,
               log=lambda _: None)
    torch.set_num_threads(n)
    return out


def test_extract_refuses_hf_folder_that_is_the_heal_run_before_any_work(inputs, table, tmp_path, monkeypatch):
    import elastic_moe.extract as ex
    from elastic_moe.extract import Budget, extract_under_budget

    monkeypatch.setattr(ex, "heal", lambda *a, **k: pytest.fail("healed before refusing"))
    with pytest.raises(UserError, match="heal"):
        extract_under_budget(inputs, tmp_path / "out", Budget("total_params", 10**9), family_dir=table,
                             hf_dir=tmp_path / "out.heal", heal_tokens=128, rebalance_batches=0, remeasure=False,
                             progress=False, say=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_a_heal_is_not_reused_for_other_rebalancing_settings(inputs, table, tmp_path):
    from elastic_moe.extract import Budget, extract_under_budget

    kw = dict(family_dir=table, heal_tokens=128, remeasure=False, progress=False, say=lambda _: None)
    extract_under_budget(inputs, tmp_path / "out", Budget("total_params", 10**9), rebalance_batches=0, **kw)
    # the heal started from the sub-model as re-balanced then: another re-balancing must not reuse it silently
    with pytest.raises(UserError, match="holds the healing of another"):
        extract_under_budget(inputs, tmp_path / "out", Budget("total_params", 10**9), rebalance_batches=2,
                             force=True, **kw)
    again = extract_under_budget(inputs, tmp_path / "out", Budget("total_params", 10**9), rebalance_batches=0,
                                 force=True, **kw)
    assert again["heal"]["steps"] == 1


def test_a_tied_head_with_a_zero_bias_imports_and_a_trained_one_is_refused(tmp_path):
    # transformers gives a tied lm_head its own bias when use_bias is set, and save_pretrained writes it
    from safetensors.torch import load_file, save_file
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(6)
    hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**hf_config_kwargs(PARITY_CONFIGS[0][1]), use_bias=True)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias") and not name.startswith("lm_head"):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (import_hf(tmp_path / "hf").eval()(x).logits - hf(x).logits).abs().max() < 1e-4
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors["lm_head.bias"] = torch.ones_like(tensors["lm_head.bias"])
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="lm_head.bias is not zero"):
        import_hf(tmp_path / "hf")


def test_extract_over_the_default_family_folder_is_refused(inputs, table, tmp_path):
    import dataclasses
    import shutil

    from elastic_moe.extract import Budget, extract_under_budget

    # the table measured into CKPT/family (no --family): replacing it with --force would lose that measurement
    shutil.copytree(table, tmp_path / "ck" / "family")
    inp = dataclasses.replace(inputs, checkpoint=str(tmp_path / "ck"))
    before = sorted(p.name for p in (tmp_path / "ck" / "family").iterdir())
    for out, hf in ((tmp_path / "ck" / "family", None), (tmp_path / "sub", tmp_path / "ck" / "family")):
        with pytest.raises(UserError, match="(is|is part of) the input"):
            extract_under_budget(inp, out, Budget("total_params", 10**9), hf_dir=hf, force=True, rebalance_batches=0,
                                 remeasure=False, progress=False, say=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "ck" / "family").iterdir()) == before
    assert not (tmp_path / "sub").exists()


def test_exported_experts_are_written_most_important_first(tmp_path):
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    for i in model.moe_layers:
        model.moe(i).expert_order.copy_(torch.randperm(model.cfg.moe_num_experts, generator=gen))
    export_hf(model, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    x = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=1e-5)  # permuting experts changes no output
        for m in (2, 3, 6):  # the imported model's "first m experts" are the original model's
            spec = SubModelSpec(experts=m)
            torch.testing.assert_close(back(x, spec=spec).logits, model(x, spec=spec).logits, rtol=0, atol=1e-5)
    sub = extract(model, SubModelSpec(experts=5))
    for i in sub.moe_layers:  # its experts are stored in importance order already
        assert sub.moe(i).expert_order.tolist() == list(range(5))
    with torch.no_grad():
        torch.testing.assert_close(sub(x).logits, model(x, spec=SubModelSpec(experts=5)).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(sub(x, spec=SubModelSpec(experts=2)).logits,
                                   model(x, spec=SubModelSpec(experts=2)).logits, rtol=0, atol=1e-5)
