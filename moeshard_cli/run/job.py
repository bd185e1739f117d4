"""What the launcher hands each worker of `moeshard run`: a few paths and scalars, never the corpus."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.elastic.multiprocessing.errors import record

from moeshard_cli.run.inputs import InputSpec
from moeshard_cli.run.options import RunOptions
from moeshard_cli.run.outputs import OutputLayout, Position


@dataclass
class RunJob:
    """Everything a worker needs: small, so the launch never blocks on a large payload."""

    options: RunOptions  # as resolved by the parent: the family's pooling, the window in whole steps, the device picked
    shards: str
    input: InputSpec
    lines: int
    fingerprint: str
    start: Position
    lines_done: int
    layout: OutputLayout | None  # node 0 only: rank 0 writes
    journal: str | None


@record
def worker_main(job: RunJob):
    """The launch entry point; the heavy imports (transformers) happen in the worker, not the launcher."""
    from moeshard_cli.run.worker import encode

    return encode(job)
