"""What people see while a command works: progress (a bar, log lines or nothing), byte sizes,
durations, quantiles.

Tables live with their commands (shard/report.py, run/report.py, bench/report.py).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

INTERVAL_ENV = "MOESHARD_PROGRESS_SECONDS"  # seconds between two plain progress lines (tests set it short)


def progress_bar(label: str, *columns, console: Console | None = None) -> Progress:
    """A transient bar: bold label, bar, then `columns` (counts, rates, time). Start it with `.start()`.
    Off a terminal it draws nothing (a transient bar left an empty line at the top of piped output)."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), *columns, console=console, transient=True,
                    disable=console is not None and not console.is_terminal)


@dataclass(frozen=True)
class Display:
    """How a command shows its progress, decided once in the CLI process and handed to its workers
    (whose stdout is the launcher's: their stderr goes to log files).

    bar: a transient rich bar (stdout is a terminal); lines: a plain line every `interval_s`
    (CI, nohup, Slurm, `> log`); off: nothing (-q). `verbose` (-v) adds detail where a command has it.
    """

    mode: str = "bar"
    verbose: bool = False
    interval_s: float = 5.0

    @classmethod
    def choose(cls, console: Console, verbosity: int) -> "Display":
        """-q (verbosity < 0) silences progress; otherwise a bar on a terminal, lines elsewhere."""
        mode = "off" if verbosity < 0 else "bar" if console.is_terminal else "lines"
        return cls(mode, verbosity > 0, float(os.environ.get(INTERVAL_ENV, "5")))

    def tracker(self, label: str, total: float, done: float = 0, count: Callable[[float, float], str] | None = None,
                console: Console | None = None) -> "Tracker":
        return Tracker(self, label, total, done, count, console)


def count_of(unit: str) -> Callable[[float, float], str]:
    """`done/total unit` with thousands separators: "1,200/20,000 lines"."""
    return lambda done, total: f"{done:,.0f}/{total:,.0f} {unit}"


def bytes_count(done: float, total: float) -> str:
    return f"{human_bytes(done)}/{human_bytes(total)}"


class Tracker:
    """One command's progress toward `total` units (lines, bytes, or estimated seconds of work), shown
    as `display` says. `count(done, total)` says how far it is in words; without it (units that mean
    nothing to a reader) only the percentage shows. `advance(n, detail)` adds `detail` (a rate, the
    current item) to the bar and to the next line. The ETA assumes the rest goes at the pace so far."""

    def __init__(self, display: Display, label: str, total: float, done: float = 0, count=None, console: Console | None = None):
        self.display, self.label, self.total, self.done, self.count = display, label, total, done, count
        self.detail = ""
        self.t0 = self.last_line = time.monotonic()
        self.first = done  # a resumed job's pace counts only what it does now
        self.bar = None
        if display.mode == "bar":
            self.bar = progress_bar(label, TextColumn("{task.fields[where]}"), TextColumn("{task.fields[detail]}"),
                                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(label, total=total, completed=done, where=self._where(), detail="")
            self.bar.start()

    def advance(self, n: float = 0, detail: str | None = None) -> None:
        self.done += n
        if detail is not None:
            self.detail = detail
        if self.bar is not None:
            self.bar.update(self.task, advance=n, where=self._where(), detail=self.detail)
        elif self.display.mode == "lines" and time.monotonic() - self.last_line >= self.display.interval_s:
            self.last_line = time.monotonic()
            self.print(self.line())

    def print(self, text: str) -> None:
        """A line of its own (-v detail), above the bar when there is one."""
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        elif self.display.mode != "off":
            print(text, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        parts = [f"{self.label}: {self._where()}".rstrip(), self.detail, f"elapsed {clock(elapsed)}"]
        eta = self.eta(elapsed)
        if eta is not None:
            parts.append(f"ETA {clock(eta)}")
        return ", ".join(p for p in parts if p)

    def eta(self, elapsed: float) -> float | None:
        now = self.done - self.first
        if now <= 0 or self.total <= 0:
            return None
        return max(0.0, (self.total - self.done) * elapsed / now)

    def _where(self) -> str:
        pct = f"{100 * self.done / self.total:.0f}%" if self.total else ""
        return f"{self.count(self.done, self.total)} ({pct})" if self.count else pct

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def byte_progress(console: Console, label: str, display: Display):
    """Yields `start(total) -> advance(n)`: byte progress that appears once the total is known."""
    trackers = []

    def start(total: int):
        trackers.append(display.tracker(label, total, count=bytes_count, console=console))
        t0 = time.monotonic()

        def advance(n: int) -> None:
            tracker = trackers[-1]
            tracker.advance(n, f"{human_bytes((tracker.done + n) / max(time.monotonic() - t0, 1e-9))}/s")

        return advance

    try:
        yield start
    finally:
        for tracker in trackers:
            tracker.close()


def clock(seconds: float) -> str:
    """H:MM:SS, as rich's time columns show it."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def human_bytes(n: float) -> str:
    """Binary units, as the byte progress bar shows them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(seconds: float) -> str:
    """A duration as tables show it: "850 ms" below a second, then "35.9 s", then "6 min 20 s"."""
    if seconds < 1:
        return f"{seconds * 1e3:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
