"""transformers config kwargs for a tiny test config."""

from helpers import tiny_config


def hf_config_kwargs(overrides: dict) -> dict:
    cfg = tiny_config(**overrides)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.dim_head,
                moe_num_experts=cfg.moe_num_experts, moe_k=cfg.moe_k, moe_intermediate_size=cfg.moe_intermediate_size,
                moe_num_shared_experts=cfg.moe_num_shared_experts, moe_layer_start_index=cfg.moe_layer_start_index,
                moe_layer_interval=cfg.moe_layer_interval, tie_word_embeddings=cfg.tie_word_embeddings,
                max_position_embeddings=cfg.max_position_embeddings)
