"""`moeshard run`, the parent side: check everything, lay out or resume the output, launch, finalize.

options -> output and shard set checks (rank files verified, cached) -> one pass over the input
(lines, UTF-8, sha256) -> node 0: a new output laid out, or the unfinished one resumed from its
journal -> elastic launch of run/worker.py with a small job -> node 0: header, rename -> summary.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeshard_cli import __version__
from moeshard_cli.errors import Interrupted, UserError
from moeshard_cli.launch import launch, pick_device
from moeshard_cli.declare import output_options
from moeshard_cli.shard.manifest import MANIFEST, ShardSet, check_files, read_shard_set
from moeshard_cli.run import outputs
from moeshard_cli.run.outputs import Position
from moeshard_cli.run.inputs import InputInfo, scan_input
from moeshard_cli.run.output_life import OutputLife, RunIdentity
from moeshard_cli.run.formats import output_format
from moeshard_cli.run.job import RunJob, worker_main
from moeshard_cli.run.options import RunOptions
from moeshard_cli.run.schedule import round_window
from moeshard_cli.ui import quantile

@dataclass
class RunSummary:
    shards: Path
    output: Path
    world: int
    device: str
    lines: int
    truncated: int
    result: dict | None  # rank 0's figures; None on nodes that do not host rank 0
    seconds: float
    resumed_at: int = 0  # lines already written by an earlier, interrupted run
    metadata: dict = field(default_factory=dict)

    def figures(self) -> dict:
        """The numbers of the results table, for people (report.py) and machines (--json)."""
        if self.result is None:
            return {}
        res = self.result
        rank0 = res["ranks"][0]["forward_s"] or [0.0]
        timers = [r["timer"] for r in res["ranks"]]
        loop, tokens = res["loop_s"], res["session_tokens"]
        spreads = res["spreads"] or [1.0]
        padded = sum(r["padded"] for r in res["ranks"])
        return {
            "shards": str(self.shards), "output": str(self.output), "world_size": self.world, "device": self.device,
            "backend": res["backend"], "lines": self.lines, "truncated_lines": self.truncated, "tokens": res["token_end"],
            "resumed_at_line": self.resumed_at, "lines_encoded": res["session_lines"], "tokens_encoded": tokens,
            "wall_s": self.seconds, "loop_s": loop,
            "tokens_per_s": tokens / self.seconds if self.seconds else 0.0, "loop_tokens_per_s": tokens / loop if loop else 0.0,
            "batches": len(res["ranks"][0]["forward_s"]),
            "ttft_s": {"mean": statistics.fmean(rank0), "p50": quantile(rank0, 0.5), "p90": quantile(rank0, 0.9)},
            "token_spread": {"mean": statistics.fmean(spreads), "max": max(spreads)},
            "padding_fraction": 1 - sum(r["tokens"] for r in res["ranks"]) / padded if padded else 0.0,
            "comm_s": statistics.fmean(t.get("comm", 0.0) for t in timers),
            "compute_s": statistics.fmean(t.get("compute", 0.0) for t in timers),
            "layers": [{"layer": l["layer"], "max_tokens_per_expert": max(l["tokens_E"]),
                        "mean_tokens_per_expert": sum(l["tokens_E"]) / len(l["tokens_E"]), "tokens_per_worker": l["tokens_G"]}
                       for l in res["layers"]],
            "metadata": self.metadata,
        }


def run(opts: RunOptions) -> RunSummary:
    """The library entry point of `moeshard run` (the command line builds `opts` from its flags)."""
    start_time = time.perf_counter()
    opts.validate()
    output, shards_dir, writer_node = opts.output_path, opts.shards_dir, opts.node_rank == 0
    shards = read_shard_set(shards_dir)
    opts.for_family(shards.family)
    fmt = output_format(output, opts.mode)
    world = shards.world_size
    if world % opts.nnodes:
        raise UserError(f"the shard set has {world} ranks, which does not split over {opts.nnodes} nodes", "use a number of nodes that divides the world size")
    local = world // opts.nnodes
    check_files(shards, verify=opts.verify, ranks=list(range(opts.node_rank * local, (opts.node_rank + 1) * local)))
    device = pick_device(opts.device, local)
    _check_backend(opts.expert_backend, device, shards)
    info = scan_input(opts.input)
    # the options as the workers use them: the family's pooling, whole steps per window, the device picked
    resolved = replace(opts, pooling=opts.mode, window=round_window(opts.window, opts.batch_size, world), device=device)
    fingerprint = _fingerprint(resolved, info, shards, fmt.name)
    digest = outputs.fingerprint_digest(fingerprint)
    metadata = _metadata(resolved, info, shards, digest)

    life = OutputLife(output, resume=opts.resume, restart=opts.restart, verify_all=opts.verify_partial) if writer_node else None
    with life or nullcontext():
        start = None
        if life:  # node 0 writes: its output begins fresh or where the unfinished run stopped
            life.claim(info.lines)
            start = life.start(RunIdentity(digest, fingerprint, list(opts.argv)),
                               outputs.plan_layout(output, fmt.name, opts.mode, info.lines, 3 if opts.score else shards.dims.d_model, metadata))
        job = RunJob(options=resolved, shards=str(shards_dir), input=str(opts.input), lines=info.lines, fingerprint=digest,
                     start=start.position if start else Position(), lines_done=start.lines_done if start else 0,
                     layout=start.layout if start else None, journal=str(start.journal) if start else None)
        if opts.nnodes > 1:
            print(f"node {opts.node_rank} of {opts.nnodes}: waiting up to {opts.timeout:g} s for the other nodes at {opts.rdzv_endpoint}",
                  flush=True)
        try:
            returned = launch(worker_main, job, world, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, opts.debug, timeout=opts.timeout)
        except (UserError, Interrupted) as exc:
            raise life.stop(exc, info.lines) if life else exc
        result = returned.get(0)
        if life:
            life.finish(result["token_end"])
    truncated = (start.truncated_before if start else 0) + (result["truncated"] if result else 0)
    return RunSummary(shards_dir, output, world, device, info.lines, truncated, result, time.perf_counter() - start_time,
                      resumed_at=start.lines_done if start else 0, metadata=metadata)


def _fingerprint(resolved: RunOptions, info: InputInfo, shards: ShardSet, fmt: str) -> dict:
    """Everything that changes the output's bytes: a resumed run must match it exactly."""
    return {
        "moeshard": __version__,
        "input": {"sha256": info.sha256, "bytes": info.bytes, "lines": info.lines},
        "shards": {"manifest_sha256": _sha256(shards.root / MANIFEST), "world_size": shards.world_size},
        "options": {**output_options(resolved), "format": fmt},
    }


def _metadata(resolved: RunOptions, info: InputInfo, shards: ShardSet, digest: str) -> dict[str, str]:
    source = shards.data["source"]
    return {
        "format": "pt", "source": shards.source_label, "source_kind": str(source.get("kind")),
        "source_revision": str(source.get("revision")), "shards": str(shards.root), "world_size": str(shards.world_size),
        "dtype": shards.dtype, "family": shards.family.name, "pooling": resolved.mode, "normalize": str(resolved.normalize).lower(),
        "router": resolved.router, "max_length": str(resolved.max_length), "attention": resolved.attention, "input": str(info.path),
        "input_sha256": info.sha256, "lines": str(info.lines), "moeshard_version": __version__, "run_fingerprint": digest,
    }


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_backend(backend: str, device: str, shards: ShardSet) -> None:
    import torch

    from moeshard_cli.dtypes import DTYPES
    from moeshard_cli.moe.experts import resolve_backend

    resolve_backend(backend, torch.device(device), shards.dims.d_model, DTYPES[shards.dtype])

