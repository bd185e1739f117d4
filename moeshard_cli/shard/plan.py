"""The slicing plan: which bytes of the source checkpoint go to which rank.

Pure functions, no I/O. Every rank gets its slice of every expert (the family says which axis:
rows of Switch's `wi` and of gate/up, columns of `wo` and of down); every other tensor the source
lists is replicated. Bad values raise ValueError; `moeshard shard` names the flag.
"""

from __future__ import annotations


def slice_bounds(d_ff: int, world: int) -> list[tuple[int, int]]:
    """Split [0, d_ff) into `world` contiguous slices whose widths differ by at most one.

    >>> slice_bounds(3072, 5)
    [(0, 615), (615, 1230), (1230, 1844), (1844, 2458), (2458, 3072)]
    """
    check_world(world)
    if world > d_ff:
        raise ValueError(f"{world} is larger than d_ff={d_ff}")
    return even_bounds(d_ff, world)


def tensor_bounds(shape: tuple[int, ...], dim: int, world: int) -> list[tuple[int, int]]:
    """The rank slices of one expert matrix: its own width along `dim`, split as slice_bounds splits d_ff.

    For the routed experts these are the manifest's slices; a shared expert of another width (Qwen2-MoE's
    is 4x as wide) gets its own, so every rank holds about 1/world of it too."""
    return slice_bounds(shape[dim], world)


def check_world(world: int) -> None:
    if world < 1:
        raise ValueError(f"must be at least 1, got {world}")


def even_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, n) into `parts` contiguous ranges whose sizes differ by at most one (some may be empty)."""
    base, extra = divmod(n, parts)
    bounds, lo = [], 0
    for part in range(parts):
        hi = lo + base + (1 if part < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def slice_along(tensor, dim: int, lo: int, hi: int):
    """A rank's slice [lo, hi) of an expert matrix along its sliced axis (a view)."""
    return tensor.narrow(dim, lo, hi - lo)


def join_slices(slices: list, dim: int):
    """The inverse of slice_along over consecutive slices."""
    import torch

    return torch.cat(slices, dim=dim)


def sliced_shape(shape: tuple[int, ...], dim: int, lo: int, hi: int) -> tuple[int, ...]:
    out = list(shape)
    out[dim] = hi - lo
    return tuple(out)


def sliced_dim(family, name: str) -> int | None:
    """The axis along which rank files cut tensor `name` (an expert matrix), or None (replicated)."""
    parsed = family.parse_expert_key(name)
    return family.sliced_dim(parsed[2]) if parsed else None


def expert_layers(family, names) -> list[int]:
    """The layers that hold experts, from rank-file key names."""
    return sorted({parsed[0] for name in names if (parsed := family.parse_expert_key(name))})


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"
