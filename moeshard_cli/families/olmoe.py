"""OLMoE (allenai/OLMoE-1B-7B): softmax, top-k, not renormalised by default; every layer is MoE."""

from __future__ import annotations

from moeshard_cli.families.gated import GatedDecoderFamily

BUILTINS = {
    "tiny-olmoe": {"model_type": "olmoe", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 38, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
                   "max_position_embeddings": 512, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": 1, "tie_word_embeddings": False},
    # OLMoE-1B-7B's shape, scaled down: 64 experts, top-8.
    "olmoe-mid": {"model_type": "olmoe", "vocab_size": 32768, "hidden_size": 768, "intermediate_size": 512, "num_hidden_layers": 6,
                  "num_attention_heads": 12, "num_key_value_heads": 12, "num_experts": 64, "num_experts_per_tok": 8,
                  "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": 1, "tie_word_embeddings": False},
}


class OlmoeFamily(GatedDecoderFamily):
    name = model_type = "olmoe"
    config_class_name = "OlmoeConfig"
    builtin_configs = BUILTINS


FAMILY = OlmoeFamily()
