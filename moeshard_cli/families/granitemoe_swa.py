"""Granite-MoE-SWA (ibm-granite/granite-swash-3b-a600m): Granite-MoE-Shared with sliding-window attention layers.

The MoE block, the shared MLP and the multipliers are Granite-MoE-Shared's; which layers attend
through a window (`layer_types`, `sliding_window`) is transformers' attention's business.
transformers renames nothing while it loads this type, so its checkpoints hold the experts under
the in-memory names (`experts.gate_up_proj`, `router.weight`), which gated.fused_sources reads too.
"""

from __future__ import annotations

from moeshard_cli.families.gated import TINY
from moeshard_cli.families.granitemoe import MUP
from moeshard_cli.families.granitemoeshared import GraniteMoeSharedFamily

BUILTINS = {
    # layer 0 attends through a window of 8 tokens, layer 1 to everything; shared MLP 45 wide, experts 38.
    "tiny-granite-moe-swa": dict(TINY, **MUP, model_type="granitemoe_swa", intermediate_size=38, shared_intermediate_size=45,
                                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                                 layer_types=["sliding_attention", "full_attention"]),
}


class GraniteMoeSwaFamily(GraniteMoeSharedFamily):
    name = model_type = "granitemoe_swa"
    config_class_name = "GraniteMoeSWAConfig"
    builtin_configs = BUILTINS


FAMILY = GraniteMoeSwaFamily()
