"""Built-in models that need no download: each family's tiny and mid-size random configs.

Weights are random but deterministic: every tensor is drawn from its own generator, seeded from
the tensor's name, so any process can regenerate any tensor (or a slice of it) without building
the model. Standard deviations are each family's (`init_std`).
"""

from __future__ import annotations

import zlib

DEFAULT_MODEL = "tiny-switch"
SEED = 0


def is_builtin(name: str) -> bool:
    from moeshard_cli.families import builtin_family

    return builtin_family(name) is not None


def builtin_names() -> list[str]:
    from moeshard_cli.families import builtin_names as names

    return names()


def builtin_config(name: str):
    """(family, config) of built-in `name`; KeyError if there is none."""
    from moeshard_cli.families import builtin_family

    family = builtin_family(name)
    if family is None:
        raise KeyError(name)
    return family, family.builtin_config(name)


def random_tensor(family, name: str, shape: tuple[int, ...], config, seed: int = SEED):
    """The built-in weight called `name`: the same bytes in every process, for every seed."""
    import torch

    std = family.init_std(name, config)
    if std is None:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).mul_(std)
