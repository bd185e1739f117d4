"""Start one worker per rank through torch.distributed's elastic launcher (the engine behind torchrun).

Single node: a c10d rendezvous on a free localhost port. Several nodes: every node runs
the same command with --nnodes, --node-rank and a shared --rdzv-endpoint; node 0 hosts
the rendezvous store. The c10d rendezvous orders nodes by host name and process id, not by
--node-rank, so each worker's rank is set from --node-rank before it starts: node 0 always
holds rank 0 (which writes the output). max_restarts=0: when one worker dies the agent stops
the others at once and the failure names the dead rank, so nobody hangs in a collective.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

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
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank {node_rank} is outside 0..{nnodes - 1}", "number the nodes 0 to --nnodes - 1, with 0 on the node at --rdzv-endpoint")
    if not debug:
        # The launcher logs each failure with a traceback; the UserError below says it in one line.
        for name in ("torch.distributed.elastic", "torch.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    local = world // nnodes
    log_dir = tempfile.mkdtemp(prefix="moeshard-logs-")
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=local, run_id="moeshard",
        rdzv_backend="c10d", rdzv_endpoint=endpoint or f"127.0.0.1:{free_port()}",
        rdzv_configs={"is_host": node_rank == 0, "join_timeout": join_timeout}, max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ERR, tee=Std.ERR if debug else Std.NONE),
    )
    try:
        returned = elastic_launch(config, as_node_rank)(entrypoint, node_rank, job)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        rank = node_rank * local + failure.local_rank
        raise UserError(f"worker rank {rank} failed: {describe_failure(failure)}", f"the whole run was stopped; worker logs are in {log_dir}") from exc
    shutil.rmtree(log_dir, ignore_errors=True)
    # the launcher numbers ranks by its own node order; the workers ran with node_rank's
    return {node_rank * local + r % local: value for r, value in returned.items()}


def as_node_rank(entrypoint, node_rank: int, job):
    """In each worker: take the global rank from --node-rank and the local rank, then run."""
    os.environ["RANK"] = str(node_rank * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ["LOCAL_RANK"]))
    return entrypoint(job)


def describe_failure(failure) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    if not os.path.isfile(failure.error_file):  # it exited without raising (sys.exit, a crash in C++)
        return f"exit code {failure.exitcode}"
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    lines = str(message).strip().splitlines()
    # gloo prefixes its errors with "[source file:line] ", noise to a user
    first = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", lines[0]) if lines else f"exit code {failure.exitcode}"
    return first[:300]


# A failing worker keeps its connections open this long before it exits. Its peers, stuck in
# a collective, fail only once it is gone, so the launcher sees the cause exit first and
# names the right rank instead of a peer reporting "connection closed".
FAILURE_GRACE_S = 1.0


@contextmanager
def worker_process_group(device_kind: str, timeout: float):
    """The worker side of a launch: pick the device, join the process group, leave it cleanly.

    Yields (rank, world, device). On CPU each worker gets cores / local workers threads;
    on CUDA one GPU per local rank and NCCL.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    try:
        yield rank, world, device
    except Exception:
        if world > 1:
            time.sleep(FAILURE_GRACE_S)
        raise
    finally:
        dist.destroy_process_group()
