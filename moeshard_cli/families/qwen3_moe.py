"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B): softmax, top-k, renormalised (`norm_topk_prob`).

Experts are `moe_intermediate_size` wide; layers listed in `mlp_only_layers`, or off the
`decoder_sparse_step`, have a dense MLP instead.
"""

from __future__ import annotations

from moeshard_cli.families.gated import MID, TINY, GatedDecoderFamily

BUILTINS = {
    # moe_intermediate_size 38 divides by neither 3 nor 4; layer 1 of 3 is dense (mlp_only_layers).
    "tiny-qwen3-moe": dict(TINY, model_type="qwen3_moe", num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=38,
                           num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    # Qwen3-30B-A3B's shape, scaled down: many narrow experts, top-8.
    "qwen3-moe-mid": dict(MID, model_type="qwen3_moe", intermediate_size=2048, moe_intermediate_size=384, num_key_value_heads=4,
                          head_dim=64, num_experts=64, num_experts_per_tok=8, norm_topk_prob=True),
}


def sparse_layers(config) -> list[int]:
    """The MoE layers of a Qwen-MoE config: off `mlp_only_layers`, on the `decoder_sparse_step`."""
    return [i for i in range(config.num_hidden_layers)
            if i not in (config.mlp_only_layers or []) and (i + 1) % config.decoder_sparse_step == 0]


class Qwen3MoeFamily(GatedDecoderFamily):
    name = model_type = "qwen3_moe"
    config_class_name = "Qwen3MoeConfig"
    d_ff_attr = "moe_intermediate_size"
    builtin_configs = BUILTINS

    def moe_layer_indices(self, config) -> list[int]:
        return sparse_layers(config)


FAMILY = Qwen3MoeFamily()
