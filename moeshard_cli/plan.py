"""The slicing plan: which bytes of the source checkpoint go to which rank.

Pure functions, no I/O. Every rank gets rows [lo, hi) of each expert's ``wi.weight``
(HF layout [d_ff, d_model]) and the matching columns of ``wo.weight`` ([d_model, d_ff]);
everything else in the encoder is replicated. The decoder and the LM head are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moeshard_cli.errors import UserError

EXPERT_KEY = re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.mlp\.experts\.expert_(\d+)\.(wi|wo)\.weight$")
EMBED_KEY = "shared.weight"
ENCODER_EMBED_KEY = "encoder.embed_tokens.weight"


def slice_bounds(d_ff: int, world: int) -> list[tuple[int, int]]:
    """Split [0, d_ff) into `world` contiguous slices whose widths differ by at most one.

    >>> slice_bounds(3072, 5)
    [(0, 615), (615, 1230), (1230, 1844), (1844, 2458), (2458, 3072)]
    """
    if world < 1:
        raise UserError(f"--gpus must be at least 1, got {world}", "pass a positive number of ranks")
    if world > d_ff:
        raise UserError(
            f"--gpus {world} is larger than d_ff={d_ff}", f"use at most {d_ff} ranks so every rank gets a slice"
        )
    return even_bounds(d_ff, world)


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
    m = EXPERT_KEY.match(name)
    if m:
        return KeyRole("expert", name, m.group(3), int(m.group(1)), int(m.group(2)))
    if name == EMBED_KEY:
        return KeyRole("replicate", EMBED_KEY)
    if name == ENCODER_EMBED_KEY:
        # The encoder's embedding is tied to `shared`; keep one copy under the shared name.
        return KeyRole("drop") if has_shared_embedding else KeyRole("replicate", EMBED_KEY)
    if name.startswith("encoder."):
        return KeyRole("replicate", name)
    return KeyRole("drop")


def slice_expert(matrix: str, tensor, lo: int, hi: int):
    """Rows [lo, hi) of wi ([d_ff, d_model]) or columns [lo, hi) of wo ([d_model, d_ff])."""
    if matrix == "wi":
        return tensor[lo:hi]
    return tensor[:, lo:hi]


def sliced_shape(matrix: str, shape: tuple[int, ...], lo: int, hi: int) -> tuple[int, ...]:
    return (hi - lo, shape[1]) if matrix == "wi" else (shape[0], hi - lo)


def rank_file_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"
