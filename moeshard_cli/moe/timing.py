"""Time spent in communication and in expert compute, without syncing the device per section."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class SectionTimer:
    """Accumulates seconds per section; on CUDA it records events and resolves them in `flush()`."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self._events: list = []

    def reset(self) -> None:
        """Start counting afresh (a pool worker's next job)."""
        self.totals.clear()
        self._events.clear()

    @contextmanager
    def section(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - t0

    def flush(self) -> dict[str, float]:
        """Resolve pending CUDA events (call after the device is synced) and return the totals."""
        for name, start, end in self._events:
            self.totals[name] += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return dict(self.totals)
