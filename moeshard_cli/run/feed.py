"""The prefetch thread of a worker: windows of lines, tokenized and scheduled ahead of the encode loop.

Each rank reads the window's lines but tokenizes only its own share (a contiguous chunk), so
the tokenizer's work is split over the ranks instead of repeated on each. The ranks then
all-gather the token counts, which every rank turns into the same schedule (schedule.py), and
swap token ids so that each rank holds exactly the lines it encodes. Both collectives run on
a gloo group of their own: this thread never shares a group with the encode loop's collectives.
"""

from __future__ import annotations

import queue
from array import array
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeshard_cli.moe.exchange import all_gather_single
from moeshard_cli.shard.plan import even_bounds
from moeshard_cli.run.inputs import InputSpec, read_windows, tokenize
from moeshard_cli.run.outputs import Position
from moeshard_cli.run.schedule import plan_window


@dataclass
class PlannedWindow:
    index: int
    first_line: int
    byte_start: int
    byte_end: int
    token_base: int  # global token offset of the window's first line (for --pooling none)
    lengths: list[int]  # tokens of every line of the window
    truncated_at: list[int]  # window-local indices of the lines cut to --max-length
    steps: list[list[list[int]]]  # steps[s][rank]: window-local line indices
    ids: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)  # this rank's lines only (int32)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def truncated(self) -> int:
        return len(self.truncated_at)


class WindowFeed:
    """Iterate over PlannedWindows from `start`; a thread prepares the next while one is encoded.

    The next window is prepared once the encode loop asks for it (`want`), a quarter into the
    current one: not at its start, where the longest lines of the sorted window make the
    largest activations, so the two peaks never meet.
    """

    def __init__(self, spec: InputSpec, tokenizer, max_length: int, window: int, batch_size: int, start: Position,
                 rank: int, world: int, group):
        self._args = (spec, tokenizer, max_length, window, batch_size, start, rank, world, group)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._wanted = start.line // window  # the highest window index asked for
        self._asked = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="moeshard-feed", daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def want(self, index: int) -> None:
        """Ask for window `index` to be prepared."""
        with self._asked:
            if index > self._wanted:
                self._wanted = index
                self._asked.notify()

    def close(self) -> None:
        self._stop.set()
        with self._asked:
            self._asked.notify()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def _produce(self) -> None:
        spec, tokenizer, max_length, window, batch_size, start, rank, world, group = self._args
        try:
            token_base, index = start.token, start.line // window
            windows = read_windows(spec, window, start.line, start.byte)
            while self._wait_for(index) and (w := next(windows, None)) is not None:
                planned = plan(w, tokenizer, max_length, batch_size, rank, world, group, token_base)
                token_base, index = token_base + planned.tokens, index + 1
                if not self._put(planned):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the encode loop, which raises it
            self._put(exc)

    def _wait_for(self, index: int) -> bool:
        with self._asked:
            self._asked.wait_for(lambda: self._wanted >= index or self._stop.is_set())
        return not self._stop.is_set()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False


def plan(w, tokenizer, max_length: int, batch_size: int, rank: int, world: int, group, token_base: int) -> PlannedWindow:
    """Tokenize this rank's chunk of the window, agree on the schedule, and fetch this rank's lines."""
    bounds = even_bounds(len(w.texts), world)
    lo, hi = bounds[rank]
    ids, cut = tokenize(w.texts[lo:hi], tokenizer, max_length)
    if world == 1:
        lengths = [len(r) for r in ids]
        steps = plan_window(lengths, batch_size, world)
        mine = {i: torch.tensor(r, dtype=torch.int32) for i, r in enumerate(ids)}
        return PlannedWindow(w.index, w.first_line, w.byte_start, w.byte_end, token_base, lengths, cut, steps, mine)
    lengths, truncated = _all_lengths([len(r) for r in ids], cut, bounds, group)
    steps = plan_window(lengths, batch_size, world)
    mine = _swap_ids(ids, lengths, steps, bounds, rank, world, group)
    return PlannedWindow(w.index, w.first_line, w.byte_start, w.byte_end, token_base, lengths, truncated, steps, mine)


def _all_lengths(own: list[int], cut: list[int], bounds, group) -> tuple[list[int], list[int]]:
    """Every rank's token counts in window order, and the window-local indices of the truncated
    lines (`cut`: this rank's, sent as negative counts)."""
    width = max(hi - lo for lo, hi in bounds)
    send = torch.zeros(width, dtype=torch.int64)
    send[:len(own)] = torch.tensor(own, dtype=torch.int64)
    send[cut] *= -1
    out = torch.empty(len(bounds) * width, dtype=torch.int64)
    all_gather_single(out, send, group=group)
    rows = out.view(len(bounds), width)
    signed = [n for (lo, hi), row in zip(bounds, rows.tolist()) for n in row[:hi - lo]]
    return [abs(n) for n in signed], [i for i, n in enumerate(signed) if n < 0]


def _swap_ids(own_ids: list[list[int]], lengths: list[int], steps, bounds, rank: int, world: int, group) -> dict[int, torch.Tensor]:
    """All-to-all the token ids: each rank sends the lines it tokenized to the rank that encodes them."""
    owner = [0] * len(lengths)
    for step in steps:
        for g, batch in enumerate(step):
            for i in batch:
                owner[i] = g
    lo = bounds[rank][0]
    send_lines = [[lo + j for j in range(len(own_ids)) if owner[lo + j] == q] for q in range(world)]
    send = array("i")  # 4 bytes a token, not a list of Python ints
    for i in (i for dest in send_lines for i in dest):
        send.extend(own_ids[i - lo])
    recv_lines = [[i for i in range(a, b) if owner[i] == rank] for a, b in bounds]
    send_splits = [sum(lengths[i] for i in dest) for dest in send_lines]
    recv_splits = [sum(lengths[i] for i in src) for src in recv_lines]
    out = torch.empty(sum(recv_splits), dtype=torch.int32)
    dist.all_to_all_single(out, torch.frombuffer(send, dtype=torch.int32) if send else torch.empty(0, dtype=torch.int32),
                           recv_splits, send_splits, group=group)
    mine, at = {}, 0
    for i in (i for src in recv_lines for i in src):
        mine[i] = out[at:at + lengths[i]]  # a view: the window's ids stay one buffer
        at += lengths[i]
    return mine
