"""PhiMoE (microsoft/Phi-3.5-MoE-instruct): 16 experts, top-2 by `sparsemixer`.

transformers' router (`mlp.router`, kept as it is) picks the top expert, masks the logits that
fall far below it (the `router_jitter_noise` threshold) for its softmax weight, then the second
expert the same way without the first. The hub's files name the block `block_sparse_moe`, the
router `gate` and the expert matrices `w1` (gate), `w3` (up), `w2` (down): Mixtral's checkpoint layout.
"""

from __future__ import annotations

from moeshard_cli.families.gated import TINY
from moeshard_cli.families.mixtral import MixtralFamily

BUILTINS = {
    "tiny-phimoe": dict(TINY, model_type="phimoe", intermediate_size=38, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, router_jitter_noise=0.3),
}


class PhimoeFamily(MixtralFamily):
    name = model_type = "phimoe"
    config_class_name = "PhimoeConfig"
    router = "router"
    disk_router = "gate"
    builtin_configs = BUILTINS


FAMILY = PhimoeFamily()
