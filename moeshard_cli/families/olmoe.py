"""OLMoE (allenai/OLMoE-1B-7B): softmax, top-k, not renormalised by default; every layer is MoE."""

from __future__ import annotations

from moeshard_cli.families.gated import MID, TINY, GatedDecoderFamily

BUILTINS = {
    "tiny-olmoe": dict(TINY, model_type="olmoe", intermediate_size=38, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    # OLMoE-1B-7B's shape, scaled down: 64 experts, top-8.
    "olmoe-mid": dict(MID, model_type="olmoe", intermediate_size=512, num_key_value_heads=12, num_experts=64, num_experts_per_tok=8),
}


class OlmoeFamily(GatedDecoderFamily):
    name = model_type = "olmoe"
    config_class_name = "OlmoeConfig"
    builtin_configs = BUILTINS


FAMILY = OlmoeFamily()
