"""The one owner of the Switch Transformers layout in transformers, and of the sharding rule.

Everything else asks here: the checkpoint key names, where each sparse MLP sits in the module
tree, and how an expert is cut into rank slices. The rule, gpt-fast's `_apply_tp_moe_ffn` in
three lines: rank r holds rows [lo, hi) of `wi.weight` ([d_ff, d_model]) and the same columns
of `wo.weight` ([d_model, d_ff]); because the activation is elementwise along d_ff, the slices'
outputs add up to the expert's.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

EXPERT_KEY = re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.mlp\.experts\.expert_(\d+)\.(wi|wo)\.weight$")
EMBED_KEY = "shared.weight"
ENCODER_EMBED_KEY = "encoder.embed_tokens.weight"  # tied to EMBED_KEY in the model
MATRICES = ("wi", "wo")
_SLICED_DIM = {"wi": 0, "wo": 1}  # rows of wi, columns of wo


# ---------------------------------------------------------------- checkpoint keys


def is_encoder_key(name: str) -> bool:
    return name.startswith("encoder.")


def expert_key(layer: int, expert: int, matrix: str) -> str:
    return f"encoder.block.{layer}.layer.1.mlp.experts.expert_{expert}.{matrix}.weight"


def parse_expert_key(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, "wi" | "wo") of an encoder expert weight, or None for any other key."""
    m = EXPERT_KEY.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def expert_layers(names: Iterable[str]) -> list[int]:
    """The encoder blocks that hold experts, from checkpoint key names."""
    return sorted({parsed[0] for name in names if (parsed := parse_expert_key(name))})


# ---------------------------------------------------------------- the sharding rule


def slice_expert(matrix: str, tensor: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rank slice [lo, hi) of d_ff: rows of wi ([d_ff, d_model]), columns of wo ([d_model, d_ff])."""
    return tensor.narrow(_SLICED_DIM[matrix], lo, hi - lo)


def join_expert(matrix: str, slices: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of slice_expert over consecutive slices."""
    return torch.cat(slices, dim=_SLICED_DIM[matrix])


def sliced_shape(matrix: str, shape: tuple[int, ...], lo: int, hi: int) -> tuple[int, ...]:
    out = list(shape)
    out[_SLICED_DIM[matrix]] = hi - lo
    return tuple(out)


# ---------------------------------------------------------------- the module tree


def switch_config(config):
    from transformers import SwitchTransformersConfig

    return config if isinstance(config, SwitchTransformersConfig) else SwitchTransformersConfig.from_dict(dict(config))


def meta_encoder(config):
    """transformers' SwitchTransformersEncoderModel on the meta device: shapes only, no memory."""
    from transformers import SwitchTransformersEncoderModel

    with torch.device("meta"):
        model = SwitchTransformersEncoderModel(switch_config(config))
    return model.eval()


def sparse_ff(model, block: int) -> nn.Module:
    """The feed-forward layer (norm + MLP + residual) of an encoder block."""
    return model.encoder.block[block].layer[-1]


def sparse_mlp(model, block: int) -> nn.Module:
    return sparse_ff(model, block).mlp


def set_sparse_mlp(model, block: int, mlp: nn.Module) -> None:
    sparse_ff(model, block).mlp = mlp


def sparse_layers(model) -> list[int]:
    """Blocks whose MLP is transformers' SwitchTransformersSparseMLP (before any is replaced)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    return [i for i in range(len(model.encoder.block)) if isinstance(sparse_mlp(model, i), SwitchTransformersSparseMLP)]


def tie_embeddings(model) -> None:
    model.encoder.embed_tokens.weight = model.shared.weight


def transformers_experts(config, experts: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """transformers' own SwitchTransformersExperts holding the given (wi, wo) weights (no copy)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts

    with torch.device("meta"):
        module = SwitchTransformersExperts(switch_config(config)).eval()
    for e, (wi, wo) in enumerate(experts):
        expert = module[f"expert_{e}"]
        expert.wi.weight = nn.Parameter(wi, requires_grad=False)
        expert.wo.weight = nn.Parameter(wo, requires_grad=False)
    return module
