"""Start one worker per rank through torch.distributed's elastic launcher (the engine behind torchrun).

Single node: a c10d rendezvous whose stores listen on 127.0.0.1 only (torch's listen on every
interface, and take anything any host writes into them). Several nodes: every node runs the
same command with --nnodes, --node-rank and a shared --rdzv-endpoint; node 0 hosts the
rendezvous store, listening on the address --rdzv-endpoint names and no other. The c10d rendezvous orders nodes by host name and process id, not by
--node-rank, so each worker's rank is set from --node-rank before it starts: node 0 always
holds rank 0 (which writes the output). max_restarts=0: when one worker dies the agent stops
the others at once and the failure names the dead rank, so nobody hangs in a collective.
The job handed to each worker is a few paths and scalars: a large pickled payload can block
the launcher on the pipe of a worker that died at start-up, before it is ever monitored.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import logging
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moeshard_cli.choices import DEVICES
from moeshard_cli.errors import Interrupted, UserError

MAX_CPU_WORKERS_PER_CORE = 4
PARENT_ENV = "MOESHARD_PARENT_PID"


LOG_PREFIX = "moeshard-logs-"  # + the launcher's pid: a later launch reclaims the folders of a SIGKILLed one
RDZV_BACKEND = "moeshard-c10d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_host(host: str) -> str:
    """The address a --rdzv-endpoint host stands for."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise UserError(f"--rdzv-endpoint host {host!r} does not resolve ({reason})",
                        "check the name, or give node 0's IP address, e.g. --rdzv-endpoint 10.0.0.5:29400") from None


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
           debug: bool = False, timeout: float = 600, device: str = "cpu", preload: tuple[str, ...] = ()) -> dict:
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
    _register_rendezvous()
    reclaim_log_dirs()
    log_dir = tempfile.mkdtemp(prefix=f"{LOG_PREFIX}{os.getpid()}-")
    where = _Rendezvous.open(endpoint, node_rank, nnodes)
    config = LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=local, run_id="moeshard",
        rdzv_backend=RDZV_BACKEND, rdzv_endpoint=where.endpoint, local_addr=where.bind,
        # Whole seconds. read_timeout bounds each of the two tries (and the pause between them) a node
        # makes to reach node 0's store; its default, 60 s, made a node wait minutes past --timeout.
        rdzv_configs={"join_timeout": math.ceil(timeout), "read_timeout": max(1, math.ceil(timeout / 3)),
                      "listen_fd": where.listen_fd, "bind": where.bind},
        max_restarts=0,
        monitor_interval=0.1, start_method=_start_method(device, preload),
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ERR, tee=Std.ERR if debug else Std.NONE),
    )
    os.environ[PARENT_ENV] = str(os.getpid())
    # Workers allocate from several threads (encode loop, prefetch, writer, gloo); glibc's default of
    # one arena per thread let their fragmentation grow a long run's peak memory (docs/benchmarks.md).
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    payload = pickle.dumps((entrypoint, job))  # unpickled by the worker once it is tied to this process
    try:
        with where, _worker_sockets_on(where), _temporary_files_in(log_dir), _workers_start_with_sigint_blocked(), _workers_skip_main_module():
            returned = elastic_launch(config, as_node_rank)(payload, node_rank)
    except SignalException as exc:
        shutil.rmtree(log_dir, ignore_errors=True)
        raise Interrupted(exc.sigval) from None
    except (RendezvousError, DistError) as exc:  # the nodes never met: a wrong endpoint, a node not started
        shutil.rmtree(log_dir, ignore_errors=True)
        raise UserError(f"node {node_rank} of {nnodes} could not meet the others at {endpoint or 'localhost'} within {timeout:g} s ({_rendezvous_reason(exc)})",
                        f"start the same command on all {nnodes} nodes within --timeout, with --rdzv-endpoint naming node 0 and a port it can open") from None
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        if failure.signal_name() in ("SIGINT", "SIGTERM") and failure.local_rank >= 0 and _interrupted(failure):
            shutil.rmtree(log_dir, ignore_errors=True)
            raise Interrupted(signal.Signals[failure.signal_name()]) from None
        rank, reason = node_rank * local + failure.local_rank, describe_failure(failure)  # reads the error file: before _keep moves it
        raise UserError(f"worker rank {rank} failed: {reason}", f"the whole run was stopped; worker logs are in {_keep(log_dir)}") from exc
    finally:
        if threading.current_thread() is threading.main_thread():  # a pool launches from a thread, where torch installs none
            for sig, handler in handlers.items():
                signal.signal(sig, handler)  # the launcher installs its own for the duration
    shutil.rmtree(log_dir, ignore_errors=True)
    # the launcher numbers ranks by its own node order; the workers ran with node_rank's
    return {node_rank * local + r % local: value for r, value in returned.items()}


_FORK = {"cpu workers": False}


def fork_cpu_workers() -> None:
    """Called by the `moeshard` command's own process, which computes nothing with torch before it
    launches: its CPU workers may fork from it (see `_start_method`)."""
    _FORK["cpu workers"] = True


def _start_method(device: str, preload: tuple[str, ...]) -> str:
    """Fork CPU workers from a launcher that has imported their modules (`preload`: torch, transformers)
    where that is safe: spawned, each worker paid seconds of CPU to import them again, most of a short
    run's time with 4 workers on 2 cores. Only the `moeshard` command forks: in a process that has run
    an OpenMP parallel region (a library caller's, a test's), a forked worker hangs at its first
    multi-threaded op. CUDA workers are always spawned: a CUDA runtime must not be forked. A caller that
    computes before it launches (bench builds its weights) passes no `preload` and spawns."""
    if device != "cpu" or not preload or not _FORK["cpu workers"]:
        return "spawn"
    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError:  # a family whose module is named otherwise: its workers import it themselves
            pass
    sys.stdout.flush()  # a forked worker flushes what it inherited: the launcher's lines would print twice
    sys.stderr.flush()
    return "fork"


# ---------------------------------------------------------------- the rendezvous: who listens where


@dataclass
class _Rendezvous:
    """Where this node's stores listen (`bind`) and, on node 0, the rendezvous store's socket, bound
    before the launch so that a taken port or a foreign address is a one-line error."""

    endpoint: str
    bind: str
    listen: socket.socket | None = None

    @classmethod
    def open(cls, endpoint: str | None, node_rank: int, nnodes: int) -> "_Rendezvous":
        if endpoint is None:  # one node: nothing listens beyond this machine
            return cls.listening("127.0.0.1", 0, None)
        host, port = _split_endpoint(endpoint)
        address = resolve_host(host)
        if node_rank == 0:
            return cls.listening(address, port, endpoint)
        return cls(endpoint, _route_to(address))

    @classmethod
    def listening(cls, address: str, port: int, endpoint: str | None) -> "_Rendezvous":
        sock = _listening_socket(address, port)
        return cls(endpoint or _join(address, sock.getsockname()[1]), address, sock)

    @property
    def listen_fd(self) -> int | None:
        return self.listen.fileno() if self.listen else None

    def __enter__(self) -> "_Rendezvous":
        return self

    def __exit__(self, *exc) -> None:
        if self.listen:
            self.listen.close()  # the store listens on its own duplicate


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _join(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _route_to(address: str) -> str:
    """This machine's address on the way to `address` (no packet is sent)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return s.getsockname()[0]


def _listening_socket(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise UserError(f"node 0 cannot listen on {_join(address, port)} ({exc.strerror})",
                        "give --rdzv-endpoint a free port and an address of node 0's own") from None
    return sock


def _store(address: str, port: int, listen_fd: int | None, timeout: timedelta):
    """A TCPStore server on a duplicate of an already listening socket, or a client of node 0's."""
    if listen_fd is None:
        return dist.TCPStore(address, port, is_master=False, multi_tenant=True, timeout=timeout)
    return dist.TCPStore(address, port, is_master=True, multi_tenant=True, timeout=timeout, master_listen_fd=os.dup(listen_fd))


def _workers_store(bind: str, timeout: timedelta):
    with _listening_socket(bind, 0) as sock:
        return _store(bind, sock.getsockname()[1], sock.fileno(), timeout)


def loopback_store(timeout: timedelta):
    """A TCPStore server on a free port of 127.0.0.1 (a worker pool's job queue)."""
    return _workers_store("127.0.0.1", timeout)


def _rendezvous_handler(params):
    """torch's c10d rendezvous (`c10d_rendezvous_backend.create_backend`), except where its two stores listen."""
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    class Backend(C10dRendezvousBackend):
        name = RDZV_BACKEND

    host, port = _split_endpoint(params.endpoint)
    bind, timeout = params.config["bind"], timedelta(seconds=params.get_as_int("read_timeout"))
    try:
        store = _store(host, port, params.config.get("listen_fd"), timeout)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        raise RendezvousConnectionError("The connection to the C10d store has failed.") from exc
    handler = create_handler(store, Backend(store, params.run_id), params)
    # The store torch (>= 2.4) opens for the workers' process group, on whichever node the rendezvous
    # ranks first: on `bind` too. Without this it would listen on every interface.
    handler._create_tcp_store_server = lambda addr, port: _workers_store(bind, timeout)
    return handler


def _register_rendezvous() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(RDZV_BACKEND, _rendezvous_handler)


@contextmanager
def _worker_sockets_on(where: _Rendezvous):
    """On one node, gloo's and NCCL's own sockets listen on the loopback interface too (unless the user chose)."""
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    chosen = {k: loopback for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k not in os.environ}
    if where.bind != "127.0.0.1" or loopback is None:
        chosen = {}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for key in chosen:
            os.environ.pop(key, None)


# ---------------------------------------------------------------- the launcher's own leftovers


def reclaim_log_dirs() -> list[Path]:
    """Remove the log folders of launchers that are gone: a SIGKILLed one cannot remove its own.
    Folders kept for a failed run (`_keep`) carry another name and stay."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{LOG_PREFIX}*-*"):
        match = re.match(rf"{LOG_PREFIX}(\d+)-", path.name)
        if match and path.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _keep(log_dir: str) -> str:
    """A failed run's logs are for the user to read: renamed out of reclaim_log_dirs' reach."""
    kept = log_dir.replace(LOG_PREFIX, "moeshard-failed-run-logs-", 1)
    try:
        os.rename(log_dir, kept)
    except OSError:
        return log_dir
    return kept


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _temporary_files_in(log_dir: str):
    """torch.multiprocessing gives every worker an error file in the temporary folder and leaves it
    there when the worker fails (`pytorch-errorfile-*.pickle`): put them in the run's log folder."""
    before, tempfile.tempdir = tempfile.tempdir, log_dir
    try:
        yield
    finally:
        tempfile.tempdir = before


@contextmanager
def _workers_skip_main_module():
    """Spawned workers re-run the parent's main script unless it is hidden while they start: a Python
    script calling the API (api.py) without `if __name__ == "__main__"` would start workers from
    every worker. They need nothing of it: their entry point and job are moeshard's."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@contextmanager
def _workers_start_with_sigint_blocked():
    """Workers are spawned with SIGINT blocked (a blocked mask survives exec): a Ctrl-C while they import
    torch stays pending until `as_node_rank` lets it kill them, silently; it used to print every
    worker's KeyboardInterrupt traceback. The launcher still hears it, through a thread that leaves
    SIGINT unblocked (Python runs the handler in the main thread)."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # started later, it would unblock SIGINT in this thread
    atexit.unregister(_reap_tracker_at_exit)
    atexit.register(_reap_tracker_at_exit)
    done = threading.Event()
    listener = threading.Thread(target=done.wait, name="moeshard-sigint", daemon=True)
    listener.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        done.set()


def _reap_tracker_at_exit() -> None:
    """multiprocessing's resource tracker is a child of the launcher that ends only once the launcher
    is gone: it stayed in the process group as a zombie until init reaped it. At exit, after
    multiprocessing's own finalizers (they unregister the launcher's semaphores from it), it is
    stopped and reaped here; not while a worker torch gave up on still holds its pipe."""
    from multiprocessing import resource_tracker, util

    util._exit_function()  # registered before this handler, so it would run after it
    if not multiprocessing.active_children():
        resource_tracker._resource_tracker._stop()


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


def as_node_rank(payload: bytes, node_rank: int):
    """In each worker: tie its life to the launcher's and let Ctrl-C kill it, before the job's heavy
    imports (transformers, deepspeed: seconds during which a SIGKILLed launcher left it running);
    take the global rank from --node-rank and the local rank; then run."""
    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a forked worker inherits the launcher's handlers
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C held since spawn ends it here
    entrypoint, job = pickle.loads(payload)
    os.environ["RANK"] = str(node_rank * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ["LOCAL_RANK"]))
    _name_process(f"moeshard-w{os.environ['RANK']}")
    return entrypoint(job)


def _name_process(name: str) -> None:
    """What `ps -o comm`, `top` and psutil show for this worker: a forked one would look like its launcher."""
    if _LIBC is not None:
        PR_SET_NAME = 15
        _LIBC.prctl(PR_SET_NAME, name.encode()[:15])


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
    on CUDA one GPU per local rank and NCCL. Ctrl-C kills a worker at once (`as_node_rank`; its
    launcher reports the interruption), even inside a collective.
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
    exit_fast_after_success()
