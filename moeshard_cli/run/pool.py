"""A pool of run workers kept alive across jobs: one launch, many `moeshard run` jobs.

`moeshard run` launches its workers for one job (launch.py, run/worker.py). A pool makes the same
elastic launch once, from a thread of the parent, and its workers then serve one job after
another: each loads its rank file once, then waits for the next job in a TCPStore that the
parent hosts on 127.0.0.1 (`job-N`: the same RunJob `moeshard run` hands its workers), encodes
it with `EncodeSession` (the code `moeshard run` runs) and rank 0 posts its figures (`result-N`).
The parent still does everything else of a run (checks, output layout, journal, finish):
`run.command.run(opts, pool=...)`. Everything launch.py guarantees holds: a dead worker stops
the others at once and the pending call raises the UserError that names its rank; `close()`
(or Ctrl-C in a call) ends the workers.

A job for another shard set of the same world size reloads the workers' model (tests serve
several shard sets from one pool); the device and the world size are the pool's.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from moeshard_cli.errors import Interrupted, UserError
from moeshard_cli.launch import launch, loopback_store, pick_device, worker_process_group
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.shard.manifest import check_files, read_shard_set

POLL_S = 0.01  # how often a waiting call looks for its result and for a dead launch
IDLE = timedelta(days=365)  # a worker waits this long for the next job (it dies with the parent anyway)
CLOSE_GRACE_S = 30.0  # a closing pool's workers get this long to leave before they are killed


@dataclass
class PoolSpec:
    """What each pool worker starts with: a few scalars, like every launch's job."""

    store_port: int
    shards: str
    device: str
    backend: str
    attention: str
    timeout: float


@record
def serve(spec: PoolSpec) -> None:
    """A pool worker: load the first shard set, then encode every job the parent posts until it posts None."""
    import torch.distributed as dist

    from moeshard_cli.run.worker import EncodeSession

    with worker_process_group(spec.device, spec.timeout) as (rank, world, device):
        store = dist.TCPStore("127.0.0.1", spec.store_port, is_master=False, timeout=IDLE)
        store.set(f"pid-{rank}", str(os.getpid()))  # from now on the parent can stop it (pool.close)
        session = EncodeSession(rank, world, device, spec.timeout)
        session.load(spec.shards, spec.backend, spec.attention, RouterSpec())
        store.set(f"ready-{rank}", "1")
        for n in itertools.count():
            job = pickle.loads(store.get(f"job-{n}"))
            if job is None:
                return None
            result = session.encode(job)
            if rank == 0:
                store.set(f"result-{n}", pickle.dumps(result))


class WorkerPool:
    """`with WorkerPool(shards) as pool: run(opts, pool=pool)`, as often as needed."""

    def __init__(self, shards: Path, device: str = "auto", backend: str = "auto", attention: str = "eager",
                 timeout: float = 300.0, verify: bool = True, debug: bool = False):
        shard_set = read_shard_set(Path(shards))
        check_files(shard_set, verify=verify)
        self.world = shard_set.world_size
        self.device = pick_device(device, self.world)
        self.timeout = timeout
        self.store = loopback_store(timedelta(seconds=timeout))
        spec = PoolSpec(self.store.port, str(shards), self.device, backend, attention, timeout)
        self.pids: list[int] = []
        self._jobs = 0
        self._pending = False
        self._failure: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        tempdir, main = tempfile.tempdir, sys.modules["__main__"]
        self._thread = threading.Thread(target=self._launch, args=(spec, debug), name="moeshard-pool", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        try:
            self._wait_until_started()
        except BaseException:
            self.close()
            raise
        finally:
            # launch() points the temporary folder at its log folder and hides the main module while the
            # workers start, and puts both back only when the launch ends: the pool's parent needs them now
            tempfile.tempdir, sys.modules["__main__"] = tempdir, main

    def _launch(self, spec: PoolSpec, debug: bool) -> None:
        try:
            launch(serve, spec, self.world, debug=debug, timeout=self.timeout)
        except BaseException as exc:  # handed to the call that waits, or to close()
            self._failure = exc

    def _wait_until_started(self) -> None:
        while not self.store.check([f"ready-{rank}" for rank in range(self.world)]):
            self._check_alive()
            time.sleep(POLL_S)
        self.pids = self._posted_pids()

    def _posted_pids(self) -> list[int]:
        keys = [f"pid-{rank}" for rank in range(self.world)]
        return [int(self.store.get(key)) for key in keys if self.store.check([key])]

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            if isinstance(self._failure, (UserError, Interrupted)):
                raise self._failure
            raise UserError("the worker pool has stopped" + (f" ({self._failure})" if self._failure else ""),
                            "start a new pool") from self._failure

    def run_job(self, job) -> dict:
        """Hand `job` (a RunJob) to every worker; {0: rank 0's figures}, as launch() returns them."""
        with self._lock:
            if self._closed:
                raise UserError("the worker pool is closed", "start a new pool")
            self._check_alive()
            n, self._jobs = self._jobs, self._jobs + 1
            self._pending = True
            self.store.set(f"job-{n}", pickle.dumps(job))
            key = f"result-{n}"
            while not self.store.check([key]):
                self._check_alive()
                time.sleep(POLL_S)
            result = pickle.loads(self.store.get(key))
            self.store.delete_key(key)
            self._pending = False
        return {0: result}

    def close(self) -> None:
        """End the workers: after the last job they leave cleanly; amid one (Ctrl-C in a call) they are stopped."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if not self._thread.is_alive():
            return
        stop = self._pending or not self.pids  # amid a job, or still starting (Ctrl-C in either)
        self.store.set(f"job-{self._jobs}", pickle.dumps(None))  # an idle worker, or one not started yet, leaves at it
        deadline, stopped = time.monotonic() + CLOSE_GRACE_S, set()
        while self._thread.is_alive() and time.monotonic() < deadline:
            if stop:  # each worker once it has posted its pid (a starting one posts it before loading)
                stopped |= self._signal(signal.SIGINT, stopped)  # launch() reads a SIGINT death as an interruption: no logs kept
            self._thread.join(0.1)
        if self._thread.is_alive():
            self._signal(signal.SIGKILL)
            self._thread.join()

    def _signal(self, sig: int, skip: set[int] = frozenset()) -> set[int]:
        """Send `sig` to every worker that has posted its pid (but `skip`); returns those pids."""
        pids = set(self.pids or self._posted_pids()) - skip
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
