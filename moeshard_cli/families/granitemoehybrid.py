"""Granite-MoE-Hybrid (ibm-granite/granite-4.0-h-tiny, h-small): Mamba-2 and attention layers, each with Granite's MoE block and shared MLP.

The MoE block, the shared MLP and the multipliers are Granite-MoE-Shared's. Which layers are
Mamba-2 mixers and which attend (`layer_types`), and the Mamba state itself, are transformers'
own modules, replicated on every rank like attention. Position embeddings are rope or none
(`position_embedding_type`); the hub's 4.0-h models use none.
"""

from __future__ import annotations

from moeshard_cli.families.gated import TINY
from moeshard_cli.families.granitemoe import MUP
from moeshard_cli.families.granitemoeshared import GraniteMoeSharedFamily

BUILTINS = {
    # layer 0 a Mamba-2 mixer (4 heads of 32, state 16), layer 1 attention; shared MLP 45 wide, experts 38.
    "tiny-granite-moe-hybrid": dict(TINY, **MUP, model_type="granitemoehybrid", intermediate_size=38, shared_intermediate_size=45,
                                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                                    layer_types=["linear_attention", "attention"], mamba_n_heads=4, mamba_d_state=16,
                                    mamba_chunk_size=16, position_embedding_type="rope"),
}


class GraniteMoeHybridFamily(GraniteMoeSharedFamily):
    name = model_type = "granitemoehybrid"
    config_class_name = "GraniteMoeHybridConfig"
    builtin_configs = BUILTINS


FAMILY = GraniteMoeHybridFamily()
