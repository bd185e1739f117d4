"""Start one worker per rank through torch.distributed's elastic launcher (the engine behind torchrun).

Single node: a c10d rendezvous on a free localhost port. Several nodes: every node runs
the same command with --nnodes, --node-rank and a shared --rdzv-endpoint; node 0 hosts
the rendezvous store. max_restarts=0: when one worker dies the agent stops the others at
once and the failure names the dead rank, so nobody hangs in a collective.
"""

from __future__ import annotations

import logging
import socket
import tempfile

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from moeshard_cli.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(entrypoint, job, world: int, nnodes: int = 1, node_rank: int = 0, endpoint: str | None = None,
           debug: bool = False, join_timeout: float = 600) -> dict:
    """Run `entrypoint(job)` on every local rank; returns {global rank: return value} for this node."""
    if world % nnodes:
        raise UserError(f"the shard set has {world} ranks, which does not split over {nnodes} nodes", "use a number of nodes that divides the world size")
    if nnodes > 1 and not endpoint:
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT", "give every node the address of node 0, e.g. --rdzv-endpoint node0:29400")
    if not debug:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    log_dir = tempfile.mkdtemp(prefix="moeshard-logs-")
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=world // nnodes, run_id="moeshard",
        rdzv_backend="c10d", rdzv_endpoint=endpoint or f"127.0.0.1:{free_port()}",
        rdzv_configs={"is_host": node_rank == 0, "join_timeout": join_timeout}, max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ERR, tee=Std.ERR if debug else Std.NONE),
    )
    try:
        return elastic_launch(config, entrypoint)(job)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise UserError(f"worker rank {rank} failed: {describe_failure(failure)}", f"the whole run was stopped; worker logs are in {log_dir}") from exc


def describe_failure(failure) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    message = failure.message if isinstance(failure.message, str) else str(failure.message)
    first = message.strip().splitlines()[0] if message.strip() else f"exit code {failure.exitcode}"
    return first[:300]
