"""The model config: exactly the fields of transformers' `Ernie4_5_MoeConfig` that shape the network."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from elastic_moe.errors import UserError

MAX_VOCAB = 1 << 24  # token ids are stored as 32-bit integers; 16.7 M is far beyond any real vocabulary


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512  # dense (non-MoE) layers
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    moe_num_experts: int = 16
    moe_k: int = 2
    moe_intermediate_size: int = 256
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1: the last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    use_bias: bool = False
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def moe_end(self) -> int:
        return self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index

    def is_moe_layer(self, i: int) -> bool:
        # The rule of transformers' Ernie4_5_MoeDecoderLayer, kept verbatim so exports agree.
        return (i + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= i <= self.moe_end

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # configs also come from JSON files (checkpoints, Hugging Face folders)
            v, kind = getattr(self, f.name), str(f.type)
            ok = (isinstance(v, bool) if kind == "bool" else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if kind == "float" else
                  isinstance(v, int) and not isinstance(v, bool) if kind == "int" else
                  v is None or isinstance(v, int) and not isinstance(v, bool))  # int | None
            if not ok:
                raise UserError(f"model config: {f.name} = {v!r} is not a valid {kind}")
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "moe_num_experts", "moe_k", "moe_intermediate_size", "moe_layer_interval",
                    "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise UserError(f"model config: head_dim must be positive, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta", "moe_norm_min"):
            if getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.initializer_range < 0:
            raise UserError(f"model config: initializer_range must be >= 0, got {self.initializer_range}")
        if self.vocab_size > MAX_VOCAB:
            raise UserError(f"model config: vocab_size {self.vocab_size} is above {MAX_VOCAB:,}")
        if self.moe_layer_start_index < 0 or self.moe_layer_end_index < -1 or (
                self.moe_layer_end_index != -1 and self.moe_layer_end_index < self.moe_layer_start_index):
            raise UserError(f"model config: moe_layer_start_index {self.moe_layer_start_index} must be >= 0 and "
                            f"moe_layer_end_index {self.moe_layer_end_index} -1 (the last layer) or >= it")
        if self.moe_num_shared_experts < 0:
            raise UserError("model config: moe_num_shared_experts must be >= 0")
        if self.moe_k > self.moe_num_experts:
            raise UserError(f"model config: moe_k={self.moe_k} exceeds moe_num_experts={self.moe_num_experts}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"model config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise UserError(f"model config: hidden_size={self.hidden_size} is not divisible by "
                            f"num_attention_heads={self.num_attention_heads} (set head_dim)")
        if self.dim_head % 2:
            raise UserError(f"model config: head dimension {self.dim_head} must be even for RoPE")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserError(f"model config: {name}={getattr(self, name)} outside the vocabulary")

    def num_params(self, layers: list[int] | None = None, experts: int | None = None, top_k: int | None = None,
                   active: bool = False) -> int:
        """Parameter count of the (sub-)model; with active=True, the parameters one token uses."""
        H, D = self.hidden_size, self.dim_head
        layers = list(range(self.num_hidden_layers)) if layers is None else list(layers)
        E = self.moe_num_experts if experts is None else experts
        k = self.moe_k if top_k is None else top_k
        V, tied, b = self.vocab_size, self.tie_word_embeddings, int(self.use_bias)  # b: the linear layers' biases
        attn = H * D * (2 * self.num_attention_heads + 2 * self.num_key_value_heads) + 2 * H
        attn += b * ((self.num_attention_heads + 2 * self.num_key_value_heads) * D + H)
        expert = 3 * H * self.moe_intermediate_size  # routed experts have no biases
        shared = self.moe_num_shared_experts * self.moe_intermediate_size
        head_bias = b * V if not tied else 0
        total = V * H * (1 if tied else 2) + H + head_bias
        if active:  # the embedding lookup reads one row (of the LM head's own matrix when tied); the head all of it
            total = V * H + (H if tied else 2 * H) + head_bias
        for i in layers:
            total += attn
            if self.is_moe_layer(i):
                total += (k if active else E) * expert + E * H + E  # router + correction bias
                total += 3 * H * shared + (b * (2 * shared + H) if shared else 0)
            else:
                total += 3 * H * self.intermediate_size + b * (2 * self.intermediate_size + H)
        return total

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        from elastic_moe.tomlconfig import from_dict

        return from_dict(cls, d, prefix="model.")
