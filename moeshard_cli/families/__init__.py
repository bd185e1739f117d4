"""Model families: everything moeshard knows about one kind of transformers MoE model, in one file each.

A family owns how its config maps to neutral dimensions (`Dims`), its checkpoint key layout and how
that maps onto rank files, which expert matrices are sliced along which axis, where its MoE modules
sit in the model, its built-in random-weight configs, and how the oracle (transformers' own model in
one process) is built. The rest of the tool asks `family_of(model_type)` or `builtin(name)`.

- switch.py: Switch Transformers (encoder, top-1, ReLU experts `wi`/`wo`; moeshard's own layer
  replaces the whole sparse MLP, router included, to keep transformers' per-sequence capacity out).
- gated.py: the transformers 5 decoder layout shared by Qwen3-MoE, OLMoE and Mixtral (top-k router
  module kept as it is, fused `gate_up_proj` [E, 2F, D] / `down_proj` [E, D, F] experts, stored per
  expert on disk); qwen3_moe.py, olmoe.py and mixtral.py say only what differs.
- gpt_oss.py: GPT-OSS, the gated layout with biases, gate and up interleaved in one transposed
  matrix, stored fused on disk (and MXFP4 on the hub).

- qwen2_moe.py, deepseek_v3.py, deepseek_v2.py, phimoe.py: the same layout with a shared expert
  (Qwen2-MoE, DeepSeek), dense first layers (DeepSeek) or other names (PhiMoE's router).
- granitemoe.py, granitemoeshared.py, granitemoe_swa.py, granitemoehybrid.py: Granite's names, its
  experts and shared MLP fused on disk, its logits scaling, sliding-window and Mamba-2 layers.
- generic.py: the model types served from transformers' module tree alone (no file of their own).
- table.py: every MoE model type of the installed transformers, the ones refused and why
  (docs/models.md's table is rendered from it).

A new family that shares a layout is one new file that subclasses it and is listed in `_MODULES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

_MODULES = ("switch", "qwen3_moe", "olmoe", "mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3", "deepseek_v2", "phimoe",
            "granitemoe", "granitemoeshared", "granitemoe_swa", "granitemoehybrid", "generic")
SHARED_EXPERT = -1  # the expert index of a layer's shared expert in parsed (layer, expert, matrix) keys


@dataclass(frozen=True)
class Dims:
    """A model's shape in the words the sharding, the run and the bench use."""

    d_model: int
    d_ff: int  # each expert's intermediate width: the axis MoEShard slices
    num_experts: int
    top_k: int
    num_layers: int
    moe_layers: int
    attention_width: int  # heads x head dim
    dense_ff: int  # the dense feed-forward width of non-MoE layers (0: none)
    vocab_size: int
    decoder: bool


def _families_of(module) -> list:
    """A family file's FAMILY, or generic.py's FAMILIES (one per model type it serves)."""
    return getattr(module, "FAMILIES", None) or [module.FAMILY]


def families() -> dict:
    """{model_type: family} of every family moeshard serves (imports transformers' configs lazily)."""
    found = {}
    for name in _MODULES:
        for family in _families_of(importlib.import_module(f"moeshard_cli.families.{name}")):
            found[family.model_type] = family
    return found


def family_of(model_type: str | None):
    """The family of a config's `model_type`; ValueError naming the ones served."""
    known = families()
    if model_type not in known:
        raise ValueError(f"{model_type or 'an unknown model type'} is not a family moeshard serves ({', '.join(sorted(known))})")
    return known[model_type]


def builtin_names() -> list[str]:
    """Built-in random-weight models, without importing torch (moeshard --help lists them)."""
    return [name for module in _MODULES for name in importlib.import_module(f"moeshard_cli.families.{module}").BUILTINS]


def builtin_family(name: str):
    """The family that owns built-in `name`, or None."""
    for module in _MODULES:
        mod = importlib.import_module(f"moeshard_cli.families.{module}")
        if name in mod.BUILTINS:
            found = _families_of(mod)
            return found[0] if len(found) == 1 else next(family for family in found if name in family.builtin_configs)
    return None
