"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax, top-k, renormalised or not, plus a shared expert.

Each MoE block adds `sigmoid(shared_expert_gate(x)) * shared_expert(x)` to the routed experts'
output. The shared expert (`shared_expert_intermediate_size` wide, 4x a routed one in the
released models) is sliced like a routed expert; the gate is a function of the whole token, so
every rank applies it to its slice (gated.py, moe/experts.SharedExpert). Dense layers as Qwen3-MoE.
"""

from __future__ import annotations

from moeshard_cli.families.gated import TINY
from moeshard_cli.families.qwen3_moe import Qwen3MoeFamily

BUILTINS = {
    # routed experts 38 wide, the shared one 45: neither divides by 2 or 4 (3: 13/13/12 and 15 each);
    # layer 1 of 3 is dense (mlp_only_layers).
    "tiny-qwen2-moe": dict(TINY, model_type="qwen2_moe", num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=38,
                           shared_expert_intermediate_size=45, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=False, mlp_only_layers=[1]),
}


class Qwen2MoeFamily(Qwen3MoeFamily):
    """Qwen3-MoE's experts and dense-layer rule, plus the gated shared expert."""

    name = model_type = "qwen2_moe"
    config_class_name = "Qwen2MoeConfig"
    shared = "mlp.shared_expert"
    shared_gate = "shared_expert_gate"
    builtin_configs = BUILTINS


FAMILY = Qwen2MoeFamily()
