"""Start one worker per rank through torch.distributed's elastic launcher (the engine behind torchrun).

Single node: a c10d rendezvous on a free localhost port. Several nodes: every node runs
the same command with --nnodes, --node-rank and a shared --rdzv-endpoint; node 0 hosts
the rendezvous store. The c10d rendezvous orders nodes by host name and process id, not by
--node-rank, so each worker's rank is set from --node-rank before it starts: node 0 always
holds rank 0 (which writes the output). max_restarts=0: when one worker dies the agent stops
the others at once and the failure names the dead rank, so nobody hangs in a collective.
The job handed to each worker is a few paths and scalars: a large pickled payload can block
the launcher on the pipe of a worker that died at start-up, before it is ever monitored.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from moeshard_cli.errors import Interrupted, UserError

MAX_CPU_WORKERS_PER_CORE = 4
PARENT_ENV = "MOESHARD_PARENT_PID"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEVICES = ("auto", "cpu", "cuda")


def check_device(requested: str) -> None:
    if requested not in DEVICES:
        raise ValueError(f"{requested} is unknown")


def pick_device(requested: str, local_workers: int) -> str:
    """cuda when asked (or on auto, when this node has a GPU per local rank), else cpu."""
    check_device(requested)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "cuda" or (requested == "auto" and gpus):
        if gpus < local_workers:
            if requested == "auto":
                return "cpu"
            raise UserError(f"this node has {gpus} GPUs but the shard set needs {local_workers} ranks here (NCCL needs one GPU per rank)",
                            "re-shard with --gpus equal to the GPUs per node, spread ranks over nodes with --nnodes, or use --device cpu")
        return "cuda"
    cores = os.cpu_count() or 1
    if local_workers > MAX_CPU_WORKERS_PER_CORE * cores:
        raise UserError(f"{local_workers} CPU workers on {cores} cores is more than this machine can host",
                        f"re-shard for at most {MAX_CPU_WORKERS_PER_CORE * cores} ranks, or spread them with --nnodes")
    return "cpu"


def launch(entrypoint, job, world: int, nnodes: int = 1, node_rank: int = 0, endpoint: str | None = None,
           debug: bool = False, timeout: float = 600) -> dict:
    """Run `entrypoint(job)` on every local rank; returns {global rank: return value} for this node.

    A dead worker raises a UserError naming its rank (worker logs are kept); Ctrl-C and SIGTERM
    stop every worker and raise Interrupted (the log directory is removed).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if world % nnodes or not 0 <= node_rank < nnodes or (nnodes > 1 and not endpoint):
        raise ValueError(f"launch of {world} ranks as node {node_rank} of {nnodes} (endpoint {endpoint}): checked by the command first")
    if not debug:
        # The launcher logs each failure and signal (each module's logger has its own level);
        # the UserError or Interrupted below says it in one line.
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("torch.distributed.elastic", "torch.multiprocessing", "torch.distributed.launcher")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    local = world // nnodes
    log_dir = tempfile.mkdtemp(prefix="moeshard-logs-")
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=local, run_id="moeshard",
        rdzv_backend="c10d", rdzv_endpoint=endpoint or f"127.0.0.1:{free_port()}",
        # Whole seconds. read_timeout bounds each of the two tries (and the pause between them) a node
        # makes to reach node 0's store; its default, 60 s, made a node wait minutes past --timeout.
        rdzv_configs={"is_host": node_rank == 0, "join_timeout": math.ceil(timeout), "read_timeout": max(1, math.ceil(timeout / 3))},
        max_restarts=0,
        monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ERR, tee=Std.ERR if debug else Std.NONE),
    )
    os.environ[PARENT_ENV] = str(os.getpid())
    # Workers allocate from several threads (encode loop, prefetch, writer, gloo); glibc's default of
    # one arena per thread let their fragmentation grow a long run's peak memory (docs/benchmarks.md).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        returned = elastic_launch(config, as_node_rank)(entrypoint, node_rank, job)
    except SignalException as exc:
        shutil.rmtree(log_dir, ignore_errors=True)
        raise Interrupted(exc.sigval) from None
    except (RendezvousError, DistError) as exc:  # the nodes never met: a wrong endpoint, a node not started
        shutil.rmtree(log_dir, ignore_errors=True)
        where = endpoint or "localhost"
        raise UserError(f"node {node_rank} of {nnodes} could not meet the others at {where} within {timeout:g} s ({_rendezvous_reason(exc)})",
                        f"start the same command on all {nnodes} nodes within --timeout, with --rdzv-endpoint naming node 0 and a port it can open") from None
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        if failure.signal_name() in ("SIGINT", "SIGTERM") and failure.local_rank >= 0 and _interrupted(failure):
            shutil.rmtree(log_dir, ignore_errors=True)
            raise Interrupted(signal.Signals[failure.signal_name()]) from None
        rank = node_rank * local + failure.local_rank
        raise UserError(f"worker rank {rank} failed: {describe_failure(failure)}", f"the whole run was stopped; worker logs are in {log_dir}") from exc
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)  # the launcher installs its own for the duration
    shutil.rmtree(log_dir, ignore_errors=True)
    # the launcher numbers ranks by its own node order; the workers ran with node_rank's
    return {node_rank * local + r % local: value for r, value in returned.items()}


def _rendezvous_reason(exc: BaseException) -> str:
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError

    if isinstance(exc, RendezvousConnectionError):
        return "node 0's rendezvous store did not answer"
    if isinstance(exc, RendezvousTimeoutError):
        return "not every node arrived"
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _interrupted(failure) -> bool:
    """A worker killed by SIGINT was hit by Ctrl-C in the terminal (workers die on it at once)."""
    return failure.exitcode < 0 and failure.signal_name() == "SIGINT"


def as_node_rank(entrypoint, node_rank: int, job):
    """In each worker: take the global rank from --node-rank and the local rank, then run."""
    os.environ["RANK"] = str(node_rank * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ["LOCAL_RANK"]))
    return entrypoint(job)


def describe_failure(failure) -> str:
    """A failed worker's signal, its exit code, or the first line of its exception."""
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    if not os.path.isfile(failure.error_file):  # it exited without raising (sys.exit, a crash in C++)
        return f"exit code {failure.exitcode}"
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
    lines = str(message).strip().splitlines()
    # gloo prefixes its errors with "[source file:line] ", noise to a user
    first = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", lines[0]) if lines else f"exit code {failure.exitcode}"
    if first.startswith("UserError: "):  # a check only a worker can make: it names the fix itself
        return first[len("UserError: "):][:400]
    return first[:300]


# A failing worker keeps its connections open this long before it exits. Its peers, stuck in
# a collective, fail only once it is gone, so the launcher sees the cause exit first and
# names the right rank instead of a peer reporting "connection closed".
FAILURE_GRACE_S = 1.0


def release_free_memory() -> None:
    """Hand memory freed inside the heap back to the OS (glibc's malloc_trim); a no-op elsewhere."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """A worker must not outlive its launcher (a SIGKILLed `moeshard` would leave it running and writing)."""
    if _LIBC is not None:
        PR_SET_PDEATHSIG = 1
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # it died before the line above
        os._exit(1)


def exit_fast_after_success() -> None:
    """Skip the interpreter's teardown once the worker has handed back its result.

    Tearing down torch and transformers at exit took ~1 s per worker on the 2-core machine, and the
    launcher waits for every worker to exit. Registered only on success: a failing worker keeps
    Python's normal exit and its exit code.
    """
    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(leave)  # runs first (atexit is last in, first out), after the result was sent


@contextmanager
def worker_process_group(device_kind: str, timeout: float):
    """The worker side of a launch: pick the device, join the process group, leave it cleanly.

    Yields (rank, world, device). On CPU each worker gets cores / local workers threads;
    on CUDA one GPU per local rank and NCCL. Ctrl-C kills a worker at once (its launcher
    reports the interruption), even inside a collective.
    """
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
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
    exit_fast_after_success()
