"""Mixtral (mistralai/Mixtral-8x7B): 8 wide experts, softmax, top-2, renormalised.

Its checkpoints name the MoE block `block_sparse_moe` and the expert matrices `w1` (gate),
`w3` (up) and `w2` (down); transformers renames them while it loads, and so does `shard`.
"""

from __future__ import annotations

from moeshard_cli.families.gated import MID, TINY, GatedDecoderFamily

BUILTINS = {
    "tiny-mixtral": dict(TINY, model_type="mixtral", intermediate_size=38, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
    # Mixtral-8x7B's shape, scaled down: 8 experts 2.7x as wide as the model, top-2.
    "mixtral-mid": dict(MID, model_type="mixtral", intermediate_size=2048, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2),
}


class MixtralFamily(GatedDecoderFamily):
    name = model_type = "mixtral"
    config_class_name = "MixtralConfig"
    num_experts_attr = "num_local_experts"
    disk_roles = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    disk_block = "block_sparse_moe"
    builtin_configs = BUILTINS


FAMILY = MixtralFamily()
