"""Families with no file of their own: transformers 5 decoders whose experts carry the plain gated layout flags.

A model type whose experts class is decorated `@use_experts_implementation` with the default flags
(gate and up concatenated [E, 2F, D], down [E, D, F], no bias, untransposed, no post-expert norm)
is served from its module tree alone: the MoE block is the parent of each layer's `experts`, the
router the block's child holding an [E, D] weight, and the config attributes holding E, F and k
are the ones whose values match those shapes. Only `experts` is replaced; the router, any shared
expert and its gate, dense layers and attention stay transformers' own and run on every rank for
that rank's tokens (a shared expert is then replicated, not sliced: exact, at the cost of its
memory on each rank). Checkpoint keys are renamed with transformers' own conversion mapping of
the type (its renamings, and the per-expert names its expert converters merge: MiniMax's
`block_sparse_moe...w1/w3/w2`); experts may be stored per expert or fused.

A type is served once it is listed in GENERIC with a tiny config, which the tests build and check
against transformers like every other family (tests/test_family_blocks.py, tests/test_families.py).
"""

from __future__ import annotations

import functools
import json

from torch import nn

from moeshard_cli.families.gated import _IDS, MATRICES, GatedDecoderFamily

# A tiny config per model type: experts 38 wide (uneven at 3 and 4 workers), 8 experts, top-2, d 64.
_SHAPE = dict(_IDS, vocab_size=384, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)
GENERIC = {
    # sigmoid router with correction bias, a shared expert, layer 0 dense (DeepSeek-V3's block under other names)
    "glm4_moe": dict(_SHAPE, head_dim=16, intermediate_size=96, moe_intermediate_size=38, n_routed_experts=8,
                     num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
    # softmax router with a correction bias, two shared experts, MoE from layer 1 on
    "ernie4_5_moe": dict(_SHAPE, intermediate_size=96, moe_intermediate_size=38, moe_num_experts=8, moe_k=2,
                         moe_num_shared_experts=2, moe_layer_start_index=1),
    # a shared MLP as wide as intermediate_size beside every block
    "hunyuan_v1_moe": dict(_SHAPE, intermediate_size=38, num_experts=8, num_experts_per_tok=2, head_dim=16),
    # Mixtral's checkpoint names (block_sparse_moe, w1/w3/w2); lightning (linear) attention on layers 0 and 2
    "minimax": dict(_SHAPE, intermediate_size=38, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                    layer_types=["linear_attention", "full_attention", "linear_attention"]),
    # experts as wide as intermediate_size; sliding-window attention on layers 0 and 1
    "cohere2_moe": dict(_SHAPE, head_dim=16, intermediate_size=38, num_experts=8, num_experts_per_tok=2, sliding_window=8,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # DeepSeek-V3's block (sigmoid, correction bias, shared expert), layer 0 dense
    "dots1": dict(_SHAPE, intermediate_size=96, moe_intermediate_size=38, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, layer_types=["full_attention"] * 3),
    # dense and sparse layers from mlp_layer_types, sliding windows on two layers, a shared expert
    "exaone_moe": dict(_SHAPE, intermediate_size=96, moe_intermediate_size=38, num_experts=8, num_experts_per_tok=2,
                       num_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, sliding_window=8,
                       layer_types=["sliding_attention", "sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse", "sparse"]),
    "solar_open": dict(_SHAPE, head_dim=16, moe_intermediate_size=38, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                       n_group=1, topk_group=1),
    "flex_olmo": dict(_SHAPE, intermediate_size=38, num_experts=8, num_experts_per_tok=2),
    "minimax_m2": dict(_SHAPE, head_dim=16, intermediate_size=38, num_local_experts=8, num_experts_per_tok=2),
    "mellum": dict(_SHAPE, head_dim=16, intermediate_size=96, moe_intermediate_size=38, num_experts=8, num_experts_per_tok=2,
                   layer_types=["full_attention"] * 3, mlp_layer_types=["sparse"] * 3),
    "afmoe": dict(_SHAPE, head_dim=16, intermediate_size=96, moe_intermediate_size=38, num_experts=8, num_experts_per_tok=2,
                  num_shared_experts=1, num_dense_layers=1, sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "kolibri1": dict(_SHAPE, head_dim=16, moe_intermediate_size=38, shared_expert_intermediate_size=45, num_local_experts=8,
                     num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "laguna": dict(_SHAPE, head_dim=16, intermediate_size=96, moe_intermediate_size=38, shared_expert_intermediate_size=45, num_experts=8,
                   num_experts_per_tok=2, layer_types=["full_attention"] * 3, mlp_layer_types=["dense", "sparse", "sparse"]),
    "mimo_v2_flash": dict(_SHAPE, head_dim=16, v_head_dim=16, intermediate_size=96, moe_intermediate_size=38, n_routed_experts=8,
                          num_experts_per_tok=2, n_group=1, topk_group=1, sliding_window=8,
                          layer_types=["full_attention", "sliding_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse", "sparse"]),
    "hy_v3": dict(_SHAPE, head_dim=16, intermediate_size=96, moe_intermediate_size=38, num_experts=8, num_experts_per_tok=2,
                  num_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"]),
}
BUILTINS = {f"tiny-{model_type.replace('_', '-')}": dict(config, model_type=model_type) for model_type, config in GENERIC.items()}

# Where configs keep each shape, in the order tried; the first whose value matches the module tree wins.
NUM_EXPERTS_ATTRS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
D_FF_ATTRS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")


class GenericGatedFamily(GatedDecoderFamily):
    generic = True  # docs/models.md: served without a family file

    def __init__(self, model_type: str):
        self.name = self.model_type = model_type
        self.builtin_configs = {name: config for name, config in BUILTINS.items() if config["model_type"] == model_type}

    # ---------------------------------------------------------------- what the module tree says

    @functools.cached_property
    def _tree(self) -> dict:
        """The block's and router's names and the config attributes of E and F, read off the tiny model."""
        (name,) = self.builtin_configs
        config = self.config(self.builtin_configs[name])
        model = self.meta_model(config)
        for path, module in model.named_modules():
            weight = getattr(module, "gate_up_proj", None)
            if path.endswith(".experts") and isinstance(weight, nn.Parameter) and weight.dim() == 3:
                E, twice_f, D = weight.shape
                block_path = path.removesuffix(".experts")
                block = block_path.split(".", 3)[3]  # model.layers.{i}.<block>
                routers = [n for n, child in model.get_submodule(block_path).named_children()
                           if n != "experts" and any(tuple(p.shape) == (E, D) for p in child.parameters())]
                return {"block": block, "router": routers[0],
                        "num_experts": _attr_with(config, NUM_EXPERTS_ATTRS, E), "d_ff": _attr_with(config, D_FF_ATTRS, twice_f // 2)}
        raise ValueError(f"{self.model_type}: no experts module with a fused gate_up_proj in transformers' model")

    @property
    def config_class_name(self) -> str:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type].__name__

    @property
    def architecture(self) -> str:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.model_type]

    def config(self, raw):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        cls = CONFIG_MAPPING[self.model_type]
        return raw if isinstance(raw, cls) else cls.from_dict(dict(raw))

    block = disk_block = property(lambda self: self._tree["block"])
    router = property(lambda self: self._tree["router"])
    num_experts_attr = property(lambda self: self._tree["num_experts"])
    d_ff_attr = property(lambda self: self._tree["d_ff"])

    @functools.lru_cache(maxsize=8)
    def _moe_layers_of(self, config_json: str) -> tuple[int, ...]:
        return tuple(self.moe_layers(self.meta_model(self.config(json.loads(config_json)))))

    def moe_layer_indices(self, config) -> list[int]:
        """Layers whose block holds experts, read off transformers' model of this config (its dense-layer rules vary)."""
        return list(self._moe_layers_of(self.config(config).to_json_string(use_diff=False)))

    @functools.cached_property
    def _conversions(self) -> tuple[list, dict[str, str]]:
        """transformers' own checkpoint conversions of this type (what `from_pretrained` applies): its key
        renamings, and the per-expert matrix names its expert converters merge into gate_up / down."""
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        renamings, roles = [], {}
        for transform in get_checkpoint_conversion_mapping(self.model_type) or []:
            target = transform.target_patterns[0] if len(transform.target_patterns) == 1 else ""
            if isinstance(transform, WeightConverter) and target.endswith(("experts.gate_up_proj", "experts.down_proj")):
                names = [p.split("experts.*.", 1)[1].removesuffix(".weight") for p in transform.source_patterns]
                roles.update(zip(names, ("gate_proj", "up_proj") if target.endswith("gate_up_proj") else ("down_proj",)))
            elif type(transform) is WeightRenaming:
                renamings.append(transform)
        return renamings, roles

    @property
    def disk_roles(self) -> dict[str, str]:
        return self._conversions[1] or {m: m for m in MATRICES}

    def rank_key(self, disk_key: str, disk_keys: set[str]) -> str | None:
        """A checkpoint key renamed as transformers renames it (MiniMax's `block_sparse_moe` -> `mlp`, ERNIE's
        `moe_statics` into the gate), expert matrices by the roles its converters give them (w1/w3/w2)."""
        for renaming in self._conversions[0]:
            disk_key, _ = renaming.rename_source_key(disk_key)
        return super().rank_key(disk_key, disk_keys)


def _attr_with(config, names: tuple[str, ...], value: int) -> str:
    """The first of `names` whose value in config is `value`."""
    for name in names:
        if getattr(config, name, None) == value:
            return name
    raise ValueError(f"{type(config).__name__} has none of {', '.join(names)} equal to {value}")


FAMILIES = [GenericGatedFamily(model_type) for model_type in GENERIC]
