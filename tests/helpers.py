"""Small random models, tokenizers, checkpoints and configs shared by the tests."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from elastic_moe.checkpoint import save_checkpoint
from elastic_moe.config import ModelConfig
from elastic_moe.model import ElasticMoE
from elastic_moe.tasks import get_mixed_suite
from elastic_moe.tokenizer import Tokenizer
from elastic_moe.tomlconfig import tomllib
from elastic_moe.train import dump_toml

# (name, overrides): with and without shared experts and a dense first layer, GQA ratio 1 and > 1, several top-k
PARITY_CONFIGS = [
    ("shared_dense0_gqa2_k2", dict(num_attention_heads=4, num_key_value_heads=2, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1)),
    ("noshared_allmoe_mha_k1", dict(num_attention_heads=4, num_key_value_heads=4, moe_k=1, moe_num_shared_experts=0, moe_layer_start_index=0)),
    ("shared2_dense0_gqa4_k3", dict(num_attention_heads=8, num_key_value_heads=2, moe_k=3, moe_num_shared_experts=2, moe_layer_start_index=1, head_dim=8)),
    ("noshared_dense0_mha_k4_untied", dict(num_attention_heads=2, num_key_value_heads=2, moe_k=4, moe_num_shared_experts=0, moe_layer_start_index=1, tie_word_embeddings=False)),
    ("shared_allmoe_gqa2_k2_interval2", dict(num_attention_heads=4, num_key_value_heads=2, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=2)),
]


def eventually(check, timeout: float = 10.0) -> bool:
    """Poll `check` until it holds: kills and process exits take a moment on a loaded machine."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
                moe_layer_start_index=1, max_position_embeddings=256)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> ElasticMoE:
    torch.manual_seed(seed)
    model = ElasticMoE(tiny_config(**kw))
    model.reset_parameters(seed)
    with torch.no_grad():  # larger weights than the 0.02 init so that routing and logits are not near-uniform
        for p in model.parameters():
            p.mul_(5.0)
        for i in model.moe_layers:
            model.moe(i).bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + i))
    return model.eval()


def hf_config_kwargs(overrides: dict) -> dict:
    """transformers' Ernie4_5_MoeConfig kwargs for the tiny test config with `overrides`."""
    cfg = tiny_config(**overrides)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.dim_head,
                moe_num_experts=cfg.moe_num_experts, moe_k=cfg.moe_k, moe_intermediate_size=cfg.moe_intermediate_size,
                moe_num_shared_experts=cfg.moe_num_shared_experts, moe_layer_start_index=cfg.moe_layer_start_index,
                moe_layer_interval=cfg.moe_layer_interval, tie_word_embeddings=cfg.tie_word_embeddings,
                max_position_embeddings=cfg.max_position_embeddings)


def small_tokenizer() -> Tokenizer:
    texts = [t.demonstration()[-1]["content"] + t.prompt() for t in get_mixed_suite("train", 40, seed=9)]
    return Tokenizer.train(texts, vocab_size=400)


def policy_checkpoint(tmp_path: Path) -> Path:
    """A tiny random policy with its tokenizer, saved as a checkpoint (what pre-training or SFT leaves)."""
    tok = small_tokenizer()
    tok.save(tmp_path / "tok")
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=1024))
    return save_checkpoint(tmp_path / "init", model, meta={"step": 0}, tokenizer_dir=tmp_path / "tok")


# a micro elastic pre-training config (the `micro_run` fixture in conftest.py trains it)
MICRO = """
[model]
vocab_size = 300
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
moe_num_experts = 4
moe_k = 2
moe_intermediate_size = 16
max_position_embeddings = 64
[data]
seq_len = 16
heldout_frac = 0.15
[optim]
warmup_steps = 2
[train]
device = "cpu"
max_steps = 12
batch_size = 8
save_every = 0
progress = false
tensorboard = false
[elastic]
expert_policy = "importance"
reorder_every = 4
[elastic.top_k]
p_full = 0.5
[eval]
every = 0
batch_size = 4
max_batches = 2
"""


def micro_config(overrides: dict[str, object]) -> str:
    """MICRO with dotted keys set, e.g. {"train.max_steps": 6, "elastic.layer_policy": "importance"}."""
    data = tomllib.loads(MICRO)
    for key, value in overrides.items():
        *tables, name = key.split(".")
        node = data
        for t in tables:
            node = node.setdefault(t, {})
        node[name] = value
    return dump_toml(data)


# family measurement settings small enough for tests
FAST = dict(prompt_len=6, decode_tokens=2, repeats=2, eval_batches=2, eval_batch_size=4, chunk=4)


def write_synthetic_corpus(folder: Path, docs: int, max_lines: int) -> Path:
    """`docs` small text files of random words (a corpus that tokenizes and trains in seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return class".split()
    for i in range(docs):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(5, max_lines))]
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}\n" + "\n".join(lines) + "\n")
    return folder


def write_micro_toml(path: Path, text: str, corpus: Path, cache: Path) -> Path:
    """A micro pre-training config `text` pointed at a corpus and a tokenizer/shard cache."""
    path.write_text(text.replace("[data]\n", f"[data]\npath = {json.dumps(str(corpus))}\n"
                                            f"cache_dir = {json.dumps(str(cache))}\n"))
    return path


def sigterm_when_logged(monkeypatch, *steps: int) -> set[int]:
    """Send this process SIGTERM right after a training loop logs one of `steps` (as a user's kill would land
    mid-run); clear the returned set to stop sending."""
    import os
    import signal

    from elastic_moe.metrics import MetricsSink

    log, signal_at = MetricsSink.log, set(steps)

    def log_then_signal(self, row):
        log(self, row)
        if row["step"] in signal_at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsSink, "log", log_then_signal)
    return signal_at


def family_inputs(model, sizes=(2, 2)):
    """FamilyInputs of random held-out batches of 8 tokens, one batch per size (rows)."""
    from elastic_moe.family import FamilyInputs

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(3, model.cfg.vocab_size, (b, 8), generator=g),
                torch.randint(3, model.cfg.vocab_size, (b, 8), generator=g)) for b in sizes]
    return FamilyInputs(model, "weights-sha", batches, "data")
