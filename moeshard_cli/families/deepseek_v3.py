"""DeepSeek-V3 (deepseek-ai/DeepSeek-V3, R1, Kimi-K2's layout): sigmoid router with group-limited top-k, shared experts, dense first layers.

transformers' router (`mlp.gate`, kept as it is) scores experts with a sigmoid, adds
`e_score_correction_bias` only to choose them, keeps the `topk_group` best of `n_group` groups,
renormalises the chosen scores and multiplies them by `routed_scaling_factor`. The
`n_shared_experts` shared experts are one MLP `n_shared_experts * moe_intermediate_size` wide
(`mlp.shared_experts`), added with weight 1 and sliced like a routed expert. The first
`first_k_dense_replace` layers are dense MLPs. Attention (MLA) stays transformers' own.
Hub checkpoints also hold a multi-token-prediction layer past `num_hidden_layers`; it is not kept.
"""

from __future__ import annotations

from moeshard_cli.families.gated import MID, TINY, GatedDecoderFamily

# Multi-head latent attention, scaled down: latent ranks and head widths of the released model / 8.
_MLA_TINY = dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)
_MLA_MID = dict(q_lora_rank=384, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, num_key_value_heads=12)

BUILTINS = {
    # 8 routed experts in 4 groups (2 chosen), top-2; experts 38 wide, the shared one too: uneven at 3 and 4
    # workers; layer 0 of 3 dense.
    "tiny-deepseek-v3": dict(TINY, **_MLA_TINY, model_type="deepseek_v3", num_hidden_layers=3, intermediate_size=96,
                             moe_intermediate_size=38, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
                             topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                             num_nextn_predict_layers=0, rope_interleave=True),
    # DeepSeek-V3's shape, scaled down: 64 narrow routed experts in 8 groups (4 chosen), top-8, one shared, layer 0 dense.
    "deepseek-v3-mid": dict(MID, **_MLA_MID, model_type="deepseek_v3", intermediate_size=2048, moe_intermediate_size=256,
                            n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                            routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, num_nextn_predict_layers=0),
}


class DeepseekV3Family(GatedDecoderFamily):
    name = model_type = "deepseek_v3"
    config_class_name = "DeepseekV3Config"
    num_experts_attr = "n_routed_experts"
    d_ff_attr = "moe_intermediate_size"
    shared = "mlp.shared_experts"
    builtin_configs = BUILTINS

    def moe_layer_indices(self, config) -> list[int]:
        return list(range(config.first_k_dense_replace, config.num_hidden_layers))

    def dims(self, config):
        from dataclasses import replace

        c = self.config(config)
        return replace(super().dims(c), attention_width=c.num_attention_heads * c.v_head_dim)

    def init_std(self, name: str, config) -> float | None:
        c = self.config(config)
        if name.endswith("e_score_correction_bias"):  # the size of the sigmoid scores' spread: it changes choices
            return 0.2
        if name.endswith("o_proj.weight"):
            return (c.num_attention_heads * c.v_head_dim) ** -0.5
        if name.endswith("kv_b_proj.weight"):
            return c.kv_lora_rank**-0.5
        if name.endswith("q_b_proj.weight"):
            return c.q_lora_rank**-0.5
        return super().init_std(name, config)


FAMILY = DeepseekV3Family()
