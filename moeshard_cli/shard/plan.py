"""The slicing plan: which bytes of the source checkpoint go to which rank.

Pure functions, no I/O. Every rank gets its slice of every expert (switch.slice_expert:
rows of `wi`, columns of `wo`); everything else in the encoder is replicated. The decoder
and the LM head are dropped. Bad values raise ValueError; `moeshard shard` names the flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeshard_cli.switch import EMBED_KEY, ENCODER_EMBED_KEY, is_encoder_key, parse_expert_key


def slice_bounds(d_ff: int, world: int) -> list[tuple[int, int]]:
    """Split [0, d_ff) into `world` contiguous slices whose widths differ by at most one.

    >>> slice_bounds(3072, 5)
    [(0, 615), (615, 1230), (1230, 1844), (1844, 2458), (2458, 3072)]
    """
    check_world(world)
    if world > d_ff:
        raise ValueError(f"{world} is larger than d_ff={d_ff}")
    return even_bounds(d_ff, world)


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


@dataclass(frozen=True)
class KeyRole:
    """What the plan does with one source tensor."""

    kind: str  # "replicate" | "expert" | "drop"
    out_name: str = ""
    matrix: str = ""  # "wi" | "wo" for experts
    layer: int = -1
    expert: int = -1


def classify(name: str, has_shared_embedding: bool) -> KeyRole:
    """Decide the role of a source key. Encoder-only output, transformers key names kept."""
    if parsed := parse_expert_key(name):
        layer, expert, matrix = parsed
        return KeyRole("expert", name, matrix, layer, expert)
    if name == EMBED_KEY:
        return KeyRole("replicate", EMBED_KEY)
    if name == ENCODER_EMBED_KEY:
        # The encoder's embedding is tied to `shared`; keep one copy under the shared name.
        return KeyRole("drop") if has_shared_embedding else KeyRole("replicate", EMBED_KEY)
    if is_encoder_key(name):
        return KeyRole("replicate", name)
    return KeyRole("drop")


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"
