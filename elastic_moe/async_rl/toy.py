"""A toy job for tests and the benchmark: a tiny random MoE, random token prompts, and a verifiable reward that a
tiny model can learn (the share of response tokens in a target set), with an optional I/O-like delay (a slow
verifier: sandbox start-up, a remote judge)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.model import ElasticMoE

PROMPT_LOW = 4  # prompt tokens keep clear of the special ids


@dataclass
class ToyConfig:
    vocab_size: int = 64
    hidden_size: int = 64
    num_hidden_layers: int = 2
    moe_num_experts: int = 4
    moe_k: int = 2
    prompt_len: int = 8
    num_prompts: int = 64
    test_prompts: int = 16
    reward_delay_s: float = 0.0  # sleep per verification
    init_scale: float = 3.0  # larger than the 0.02 init: routing and logits are not near-uniform

    def validate(self) -> None:  # the model's own sizes are checked by ModelConfig
        if self.vocab_size <= PROMPT_LOW:
            raise UserError(f"toy.vocab_size = {self.vocab_size}: must be > {PROMPT_LOW} (prompt tokens are drawn from "
                            f"{PROMPT_LOW} up, below are the special ids)")
        if min(self.prompt_len, self.num_prompts) < 1 or self.test_prompts < 0:
            raise UserError("toy: prompt_len and num_prompts must be >= 1, test_prompts >= 0")
        if self.reward_delay_s < 0 or self.init_scale <= 0:
            raise UserError("toy: reward_delay_s >= 0 and init_scale > 0")


def toy_model(c: ToyConfig, seed: int = 0, max_positions: int = 256) -> ElasticMoE:
    cfg = ModelConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=2 * c.hidden_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                      moe_num_experts=c.moe_num_experts, moe_k=c.moe_k, moe_intermediate_size=c.hidden_size,
                      moe_num_shared_experts=0, moe_layer_start_index=0, max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    model = ElasticMoE(cfg)
    model.reset_parameters(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(c.init_scale)
    return model.eval()


def toy_prompts(c: ToyConfig, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(PROMPT_LOW, c.vocab_size) for _ in range(c.prompt_len)] for _ in range(n)]


class TokenShareReward:
    """reward = share of response tokens whose id is below vocab_size / 4 (picklable, for Ray workers)."""

    def __init__(self, vocab_size: int, delay_s: float = 0.0):
        self.cut, self.delay_s = vocab_size // 4, delay_s

    def __call__(self, task_index: int, tokens: list[int]) -> float:
        if self.delay_s:
            time.sleep(self.delay_s)
        return sum(t < self.cut for t in tokens) / max(len(tokens), 1)
