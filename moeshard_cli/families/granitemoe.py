"""Granite-MoE (ibm-granite/granite-3.0-1b-a400m, granite-3.1-3b-a800m): softmax over the top-k logits, muP multipliers.

In memory it is gated.py's layout under other names: the block is `block_sparse_moe`, its router
`router`, its experts `gate_up_proj` [E, 2F, D] / `down_proj` [E, D, F]. On disk the experts stay
fused as `block_sparse_moe.input_linear.weight` [E, 2F, D] (gate rows first) and
`output_linear.weight` [E, D, F], the router is `router.layer.weight`: `shard` reads gate, up and
down one expert at a time (gated.fused_sources) into the usual per-expert rank-file keys.

The multipliers stay transformers' own (embedding, attention and residual ones inside its
modules), except `logits_scaling`, which its causal LM divides the logits by: `--score` asks the
family for its logits (`logits`).
"""

from __future__ import annotations

from moeshard_cli.families.gated import TINY, GatedDecoderFamily

# granite-3.0-1b-a400m's multipliers (its config.json): they change every output, so the tests see them.
MUP = dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=6.0)
BUILTINS = {
    # experts 38 wide: uneven slices at 3 and 4 workers.
    "tiny-granite-moe": dict(TINY, **MUP, model_type="granitemoe", intermediate_size=38, num_key_value_heads=2, num_local_experts=8,
                            num_experts_per_tok=2),
}


class GraniteMoeFamily(GatedDecoderFamily):
    name = model_type = "granitemoe"
    config_class_name = "GraniteMoeConfig"
    num_experts_attr = "num_local_experts"
    block = disk_block = "block_sparse_moe"
    router = "router"
    disk_router = "router.layer"
    disk_fused = (("input_linear.weight", "output_linear.weight"), *GatedDecoderFamily.disk_fused)
    builtin_configs = BUILTINS

    def logits(self, model, hidden_ND):
        return model.lm_head(hidden_ND) / model.config.logits_scaling


FAMILY = GraniteMoeFamily()
