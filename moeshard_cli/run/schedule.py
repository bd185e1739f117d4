"""Which lines each rank encodes in each step of a window: pure functions, no I/O.

Lines of a window are sorted longest first, so a step's lines have similar lengths and
little padding. A step takes `world * batch_size` consecutive lines of that order and deals
them longest first, each to the rank with the fewest tokens so far that still has room:
every rank gets about the same number of tokens (attention and the dense layers are not
balanced by expert sharding, so the slowest rank sets the pace of each step).
"""

from __future__ import annotations

import heapq
from typing import Sequence


def plan_window(lengths: Sequence[int], batch_size: int, world: int) -> list[list[list[int]]]:
    """steps[s][rank] = the window-local line indices rank `rank` encodes in step s.

    Every line appears exactly once. A step holds `world * batch_size` lines (the last one
    fewer); each rank gets at most `ceil(lines in the step / world)` of them.
    """
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch size {batch_size} and world size {world} must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    step_lines = world * batch_size
    return [_deal(order[start:start + step_lines], lengths, world) for start in range(0, len(order), step_lines)]


def _deal(group: list[int], lengths: Sequence[int], world: int) -> list[list[int]]:
    cap = -(-len(group) // world)
    batches: list[list[int]] = [[] for _ in range(world)]
    heap = [(0, rank) for rank in range(world)]  # (tokens so far, rank); full ranks leave the heap
    for line in group:
        tokens, rank = heapq.heappop(heap)
        batches[rank].append(line)
        if len(batches[rank]) < cap:
            heapq.heappush(heap, (tokens + lengths[line], rank))
    return batches


def step_tokens(step: list[list[int]], lengths: Sequence[int]) -> list[int]:
    """Real tokens per rank in one step."""
    return [sum(lengths[i] for i in batch) for batch in step]


def spread(tokens_G: Sequence[int]) -> float:
    """Busiest rank's tokens over the mean (1.0 is perfect balance)."""
    mean = sum(tokens_G) / len(tokens_G)
    return max(tokens_G) / mean if mean else 1.0


def round_window(window: int, batch_size: int, world: int) -> int:
    """Lines per window, rounded up to whole steps so only the corpus's last step is partial."""
    step = batch_size * world
    return max(step, -(-window // step) * step)
