"""Review s27: the learning-rate warm-up against the schedule's length, and the grouped-GEMM expert path on CPU
(16-bit strides, numerics it cannot compute)."""

import pytest
import torch
from helpers import micro_config, write_micro_toml, write_synthetic_corpus

from elastic_moe import ops
from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.model import ElasticMoE
from elastic_moe.tomlconfig import load_config
from elastic_moe.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------- warm-up and schedule


@pytest.mark.parametrize("overrides", [
    ["optim.warmup_steps=30", "optim.schedule_steps=20"],
    ["optim.warmup_steps=30", "optim.schedule_steps=20", "train.max_steps=100"],  # the horizon, not max_steps
])
def test_a_warmup_longer_than_the_schedule_is_a_one_line_error(overrides):
    # before: accepted, and the learning rate never reached optim.lr nor decayed (lr_at stays in its warm-up)
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, None, overrides)
    msg = str(e.value)
    assert "optim.warmup_steps = 30" in msg and "optim.schedule_steps = 20" in msg and "\n" not in msg
    # as long as the schedule (the last step reaches optim.lr) and shorter are fine
    load_config(TrainConfig, None, ["optim.warmup_steps=20", "optim.schedule_steps=20"])
    load_config(TrainConfig, None, ["optim.warmup_steps=0", "optim.schedule_steps=1"])


def test_a_run_shorter_than_its_warmup_says_so(tmp_path):
    # the schedule's length is train.max_steps (optim.schedule_steps unset), which a later session may raise: a
    # short run is not refused, but the lr that stays below optim.lr is said, not silent
    corpus = write_synthetic_corpus(tmp_path / "corpus", docs=30, max_lines=20)
    text = micro_config({"model.num_hidden_layers": 2, "train.max_steps": 2, "train.batch_size": 4,
                         "optim.warmup_steps": 5, "eval.max_batches": 1})
    toml = write_micro_toml(tmp_path / "micro.toml", text, corpus, tmp_path / "cache")
    said = []
    summary = train(load_config(TrainConfig, toml), tmp_path / "run", log=said.append)
    assert summary["step"] == 2
    notes = [line for line in said if "optim.warmup_steps = 5" in line]
    assert len(notes) == 1 and "2 steps" in notes[0] and "\n" not in notes[0], said
    # a run that reaches the end of its warm-up says nothing
    said.clear()
    train(load_config(TrainConfig, toml, ["train.max_steps=5"]), tmp_path / "run", log=said.append)
    assert not [line for line in said if "warmup_steps" in line], said


# ------------------------------------------------------------------------------------------ expert GEMMs on CPU


def _model(hidden: int) -> ElasticMoE:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, moe_num_experts=4, moe_k=2,
                      moe_intermediate_size=12, max_position_embeddings=64)
    return ElasticMoE(cfg)


@pytest.mark.skipif(not ops.grouped_mm_available("cpu"), reason="this torch has no CPU torch._grouped_mm")
def test_a_bf16_model_whose_width_is_not_a_multiple_of_8_runs_its_experts():
    # before: hidden 36 passed the "multiple of 4 elements" check meant for float32, and torch._grouped_mm refused
    # the bfloat16 rows (72 bytes): "strides should be multiple of 16 bytes"
    model = _model(36).to(torch.bfloat16)
    x = torch.randint(3, 64, (2, 8))
    out = model(x).logits
    out.float().sum().backward()
    model.set_expert_backend("loop")
    model.zero_grad()
    ref = model(x).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("numerics", [ops.Numerics("fp8"), ops.Numerics("fp32", kernel="split")])
@pytest.mark.skipif(not ops.grouped_mm_available("cpu"), reason="this torch has no CPU torch._grouped_mm")
def test_the_grouped_mm_backend_keeps_numerics_it_cannot_compute(numerics):
    # before: a model put on the grouped_mm backend (as gpu.py advises) and then on fp8 numerics ran its experts
    # in bf16 (and the split kernel in the default order): the "fp8" measurement was of bf16 experts
    model = _model(32).eval()
    x = torch.randint(3, 64, (2, 8))
    model.set_numerics(numerics)
    with torch.no_grad():
        model.set_expert_backend("loop")
        ref = model(x).logits
        model.set_expert_backend("grouped_mm")
        got = model(x).logits
    assert torch.equal(got, ref)


def test_embedding_std_with_a_zero_initializer_range_is_a_one_line_error():
    # before: accepted, then a ZeroDivisionError traceback from scale_init (embedding_std / initializer_range)
    # once the run had prepared its data; the packaged config sets init.embedding_std
    from elastic_moe.train import DEFAULT_CONFIG

    with pytest.raises(UserError, match=r"init.embedding_std .* model.initializer_range > 0"):
        load_config(TrainConfig, DEFAULT_CONFIG, ["model.initializer_range=0.0"])
    cfg = load_config(TrainConfig, None, ["model.initializer_range=0.0"])  # no rescaling asked for: fine
    assert cfg.init.embedding_std is None
