"""Built-in models that need no download: `tiny-switch` and `switch-base-{8..256}`.

Weights are random but deterministic: every tensor is drawn from its own generator,
seeded from the tensor's name, so any process can regenerate any tensor (or a slice
of it) without building the model. Standard deviations follow transformers' own
`_init_weights` for Switch Transformers.
"""

from __future__ import annotations

import re
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names here are read by `moeshard --help`, which must not wait for torch
    import torch
    from transformers import SwitchTransformersConfig

DEFAULT_MODEL = "tiny-switch"
SWITCH_BASE = re.compile(r"^switch-base-(8|16|32|64|128|256)$")
BUILTIN_NAMES = ["tiny-switch"] + [f"switch-base-{e}" for e in (8, 16, 32, 64, 128, 256)]
SEED = 0


def is_builtin(name: str) -> bool:
    return name == "tiny-switch" or bool(SWITCH_BASE.match(name))


def builtin_config(name: str) -> SwitchTransformersConfig:
    from transformers import SwitchTransformersConfig

    if name == "tiny-switch":
        # d_ff=130 divides by neither 3 nor 4, so uneven slices are the normal case.
        return SwitchTransformersConfig(
            vocab_size=384, d_model=64, d_kv=16, d_ff=130, num_heads=4, num_layers=4,
            num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
            num_experts=8, expert_capacity=64, relative_attention_num_buckets=32,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    match = SWITCH_BASE.match(name)
    if not match:
        raise KeyError(name)
    # The architecture of google/switch-base-E (transformers' defaults are switch-base-8).
    return SwitchTransformersConfig(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12,
        num_decoder_layers=12, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
        num_experts=int(match.group(1)), expert_capacity=64,
    )


def init_std(name: str, config: SwitchTransformersConfig) -> float | None:
    """Standard deviation for a tensor, or None for layer norms (initialised to one)."""
    d, kv, h = config.d_model, config.d_kv, config.num_heads
    if name.endswith("layer_norm.weight"):
        return None
    if name.endswith("router.classifier.weight") or name == "shared.weight":
        return 1.0
    from moeshard_cli.switch import parse_expert_key

    if parse_expert_key(name):
        return d**-0.5
    if name.endswith("mlp.wo.weight"):
        return config.d_ff**-0.5
    if name.endswith(".q.weight"):
        return (d * kv) ** -0.5
    if name.endswith(".o.weight"):
        return (h * kv) ** -0.5
    return d**-0.5


def random_tensor(name: str, shape: tuple[int, ...], config: SwitchTransformersConfig, seed: int = SEED) -> torch.Tensor:
    """The built-in weight called `name`: the same bytes in every process, for every seed."""
    import torch

    std = init_std(name, config)
    if std is None:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).mul_(std)
