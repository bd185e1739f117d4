"""What the launcher hands each worker of `moeshard run`: a few paths and scalars, never the corpus."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.elastic.multiprocessing.errors import record

from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.run.feed import Position
from moeshard_cli.run.outputs import OutputLayout
from moeshard_cli.ui import Display


@dataclass
class RunJob:
    """Everything a worker needs: small, so the launch never blocks on a large payload."""

    shards: str
    input: str
    lines: int
    window: int
    batch_size: int
    max_length: int
    pooling: str
    normalize: bool
    device: str
    backend: str
    router: RouterSpec
    timeout: float
    fingerprint: str
    start: Position
    lines_done: int
    layout: OutputLayout | None  # node 0 only: rank 0 writes
    journal: str | None
    progress: Display = field(default_factory=Display)
    attention: str = "eager"


@record
def worker_main(job: RunJob):
    """The launch entry point; the heavy imports (transformers) happen in the worker, not the launcher."""
    from moeshard_cli.run.worker import encode

    return encode(job)
