"""DeepSeek-V2 (deepseek-ai/DeepSeek-V2, V2-Lite): softmax router, greedy or group-limited greedy top-k, shared experts.

transformers' router (`topk_method` "greedy" or "group_limited_greedy" over `n_group` groups)
scales the chosen probabilities by `routed_scaling_factor`; shared experts, dense first layers and
MLA attention as DeepSeek-V3 (deepseek_v3.py).
"""

from __future__ import annotations

from moeshard_cli.families.deepseek_v3 import _MLA_TINY, DeepseekV3Family
from moeshard_cli.families.gated import TINY

BUILTINS = {
    # group-limited greedy over 4 groups, 1 chosen (with 2 chosen a top-2 is always the greedy one, as in
    # groups of 2 the best two experts' groups are the two best groups); 2 shared experts: one MLP 2 x 38 = 76 wide.
    "tiny-deepseek-v2": dict(TINY, **_MLA_TINY, model_type="deepseek_v2", num_hidden_layers=3, intermediate_size=96,
                             moe_intermediate_size=38, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                             topk_method="group_limited_greedy", n_group=4, topk_group=1, routed_scaling_factor=1.5,
                             first_k_dense_replace=1),
}


class DeepseekV2Family(DeepseekV3Family):
    name = model_type = "deepseek_v2"
    config_class_name = "DeepseekV2Config"
    builtin_configs = BUILTINS


FAMILY = DeepseekV2Family()
