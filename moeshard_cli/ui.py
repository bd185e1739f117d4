"""What people see while a command works: the one progress-bar style, byte sizes, quantiles.

Tables live with their commands (shard/report.py, run/report.py, bench/report.py).
"""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


def progress_bar(label: str, *columns, console: Console | None = None) -> Progress:
    """A transient bar: bold label, bar, then `columns` (counts, rates, time). Start it with `.start()`.
    Off a terminal it draws nothing (a transient bar left an empty line at the top of piped output)."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), *columns, console=console, transient=True,
                    disable=console is not None and not console.is_terminal)


@contextmanager
def byte_progress(console: Console, label: str):
    """Yields `start(total) -> advance(n)`: a byte progress bar that appears once the total is known."""
    with progress_bar(label, DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(), console=console) as bar:
        def start(total: int):
            task = bar.add_task(label, total=total)
            return lambda n: bar.advance(task, n)

        yield start


def human_bytes(n: float) -> str:
    """Binary units, as the byte progress bar shows them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
