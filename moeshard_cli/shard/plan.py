"""The slicing plan: which bytes of the source checkpoint go to which rank.

Pure functions, no I/O. Every rank gets its slice of every expert (the family says which axis:
rows of Switch's `wi` and of gate/up, columns of `wo` and of down); every other tensor the source
lists is replicated. Bad values raise ValueError; `moeshard shard` names the flag.
"""

from __future__ import annotations

from moeshard_cli.families import SHARED_EXPERT


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


def rank_bounds(family, name: str, shape: tuple[int, ...], bounds: list[tuple[int, int]], rank: int) -> tuple[int, int]:
    """The d_ff slice [lo, hi) that rank `rank` cuts tensor `name` by: the manifest's `bounds` for routed
    experts (and replicated tensors), a shared expert's own (tensor_bounds: it has another width)."""
    parsed = family.parse_expert_key(name)
    if parsed and parsed[1] == SHARED_EXPERT:
        return tensor_bounds(shape, family.sliced_dim(parsed[2]), len(bounds))[rank]
    return bounds[rank]


def rank_cut(family, name: str, lo: int, hi: int) -> tuple[int, int, int] | None:
    """(axis, start, stop) of tensor `name` that the rank with d_ff slice [lo, hi) holds, or None (all of it).

    A matrix whose columns interleave gate and up (GPT-OSS's gate_up: g0, u0, g1, ...) has
    `slice_steps` 2: the rank holds its columns [2 lo, 2 hi)."""
    parsed = family.parse_expert_key(name)
    dim = family.sliced_dim(parsed[2]) if parsed else None
    if dim is None:
        return None
    step = getattr(family, "slice_steps", {}).get(parsed[2], 1)
    return dim, step * lo, step * hi


def held_by(family, name: str, rank: int) -> bool:
    """Whether rank `rank`'s file holds tensor `name`: an expert's output bias (`one_rank`) is added
    before the ranks' partial outputs are summed, so it lives on rank 0 alone."""
    parsed = family.parse_expert_key(name)
    return rank == 0 or not (parsed and parsed[2] in getattr(family, "one_rank", ()))


def join_rank_parts(family, name: str, parts: list):
    """A tensor of rank-file key `name` from every rank's part of it: expert slices joined, rank 0's otherwise."""
    parsed = family.parse_expert_key(name)
    dim = family.sliced_dim(parsed[2]) if parsed else None
    return parts[0] if dim is None else join_slices(parts, dim)


def expert_layers(family, names) -> list[int]:
    """The layers that hold experts, from rank-file key names."""
    return sorted({parsed[0] for name in names if (parsed := family.parse_expert_key(name))})


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"
