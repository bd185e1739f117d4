"""`moeshard run`, the parent side: check everything, lay out or resume the output, launch, finalize.

options -> output and shard set checks (rank files verified, cached) -> one pass over the input
(lines, UTF-8, sha256) -> node 0: a new output laid out, or the unfinished one resumed from its
journal -> elastic launch of run/worker.py with a small job -> node 0: header, rename -> summary.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeshard_cli import __version__
from moeshard_cli.errors import Interrupted, UserError
from moeshard_cli.launch import launch, pick_device
from moeshard_cli.declare import output_options
from moeshard_cli.shard.manifest import MANIFEST, ShardSet, check_files, read_shard_set
from moeshard_cli.run import outputs
from moeshard_cli.run.outputs import Position
from moeshard_cli.run.inputs import InputInfo, input_spec, record_ids, scan_input, spool_stdin
from moeshard_cli.run.output_life import AlreadyComplete, OutputLife, RunIdentity
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
    already_complete: bool = False  # --resume found the output finished by this same run

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
            "metadata": {k: v for k, v in self.metadata.items() if k != "legacy"},
        }


def run(opts: RunOptions, pool=None) -> RunSummary:
    """The library entry point of `moeshard run` (the command line builds `opts` from its flags); its
    workers are launched for this run, or are `pool`'s (run/pool.py: one node, started once)."""
    start_time = time.perf_counter()
    opts.validate()
    output, shards_dir = opts.output_path, opts.shards_dir
    shards = read_shard_set(shards_dir)
    opts.for_family(shards.family)
    fmt = output_format(output, opts.mode)
    world = shards.world_size
    if world % opts.nnodes:
        raise UserError(f"the shard set has {world} ranks, which does not split over {opts.nnodes} nodes", "use a number of nodes that divides the world size")
    if pool is not None and (world != pool.world or opts.nnodes > 1):
        raise UserError(f"the shard set {shards_dir} has {world} ranks, the worker pool {pool.world} on one node",
                        f"use a shard set for {pool.world} workers with this pool, or start a pool for this one")
    local = world // opts.nnodes
    check_files(shards, verify=opts.verify, ranks=list(range(opts.node_rank * local, (opts.node_rank + 1) * local)))
    device = pool.device if pool is not None else pick_device(opts.device, local)
    _check_backend(opts.expert_backend, device, shards)
    with _input(opts, output) as spec:
        info = scan_input(spec)
        # the options as the workers use them: the family's pooling, whole steps per window, the device picked
        resolved = replace(opts, pooling=opts.mode, window=round_window(opts.window, opts.batch_size, world), device=device)
        fingerprint = _fingerprint(resolved, info, shards, fmt.name)
        digest = outputs.fingerprint_digest(fingerprint)
        metadata = _metadata(resolved, info, shards, digest, fmt.name)
        try:
            result, start = _encode(opts, resolved, info, shards, fmt.name, fingerprint, digest, metadata, world, pool)
        except AlreadyComplete as done:
            print(f"{done.output} is already complete (same input, shard set and options): nothing to resume", file=sys.stderr, flush=True)
            return RunSummary(shards_dir, output, world, device, info.lines, 0, None, time.perf_counter() - start_time,
                              metadata=metadata, already_complete=True)
    truncated = (start.truncated_before if start else 0) + (result["truncated"] if result else 0)
    if result and result["truncated"]:
        _warn(f"{_count(result['truncated'], 'line')} longer than --max-length {opts.max_length} tokens, cut to it "
              f"({_first(result['truncated_lines'], result['truncated'])})")
    return RunSummary(shards_dir, output, world, device, info.lines, truncated, result, time.perf_counter() - start_time,
                      resumed_at=start.lines_done if start else 0, metadata=metadata)


def _encode(opts: RunOptions, resolved: RunOptions, info: InputInfo, shards: ShardSet, fmt: str, fingerprint: dict, digest: str,
            metadata: dict, world: int, pool=None):
    """Node 0 lays out (or resumes) the output; every node launches its workers; node 0 finalizes."""
    output = opts.output_path
    life = OutputLife(output, resume=opts.resume, restart=opts.restart, verify_all=opts.verify_partial, force=opts.force) \
        if opts.node_rank == 0 else None
    with life or nullcontext():
        start = None
        if life:  # node 0 writes: its output begins fresh or where the unfinished run stopped
            life.claim(info.lines, digest)
            start = life.start(RunIdentity(digest, fingerprint, list(opts.argv)),
                               outputs.plan_layout(output, fmt, opts.mode, info.lines, 3 if opts.score else shards.dims.d_model, metadata))
        _warn_about_input(info)  # once the run is sure to go ahead
        job = RunJob(options=resolved, shards=str(shards.root), input=info.spec, lines=info.lines, fingerprint=digest,
                     start=start.position if start else Position(), lines_done=start.lines_done if start else 0,
                     layout=start.layout if start else None, journal=str(start.journal) if start else None)
        if opts.nnodes > 1:
            print(f"node {opts.node_rank} of {opts.nnodes}: waiting up to {opts.timeout:g} s for the other nodes at {opts.rdzv_endpoint}",
                  flush=True)
        try:
            if pool is not None:
                returned = pool.run_job(job)
            else:
                returned = launch(worker_main, job, world, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, opts.debug, timeout=opts.timeout,
                                  device=resolved.device, preload=worker_modules(shards.family))
        except (UserError, Interrupted) as exc:
            raise life.stop(exc, info.lines) if life else exc
        result = returned.get(0)
        if life:
            life.finish(result["token_end"], record_ids(info.spec, info.lines))
    return result, start


@contextmanager
def _input(opts: RunOptions, output: Path):
    """The input as workers read it: the file, or standard input spooled next to the output
    (removed at the end; a run that read standard input cannot be resumed)."""
    if not opts.reads_stdin:
        yield input_spec(opts.input, opts.input_format, opts.text_field, opts.id_field)
        return
    spool = output.with_name(f".{output.name}.stdin-{os.getpid()}")
    try:
        _, compression = spool_stdin(spool)
        yield input_spec(spool, opts.input_format or "txt", opts.text_field, opts.id_field, compression=compression, shown="-")
    finally:
        spool.unlink(missing_ok=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def _first(numbers, count: int, what: str = "line") -> str:
    """The first few line (or record) numbers, counted from 1 as editors count."""
    shown = ", ".join(map(str, numbers))
    return f"{what} {shown}" if count == 1 else f"{what}s {shown}" + (", ..." if count > len(numbers) else "")


def _warn_about_input(info: InputInfo) -> None:
    """What the data holds that the user may not expect, said before the work starts."""
    what = "line" if info.spec.format in ("txt", "jsonl") else "record"
    if info.empty.count:
        _warn(f"{_count(info.empty.count, f'empty {what}')} ({_first(info.empty.first, info.empty.count, what)}), encoded as the "
              f"tokenizer's empty input: the output keeps one row per {what}")
    if info.blank.count:
        _warn(f"{_count(info.blank.count, f'whitespace-only {what}')} ({_first(info.blank.first, info.blank.count, what)}), encoded as they are")
    if info.bom:
        _warn(f"{info.spec.name} starts with a UTF-8 byte order mark; it is dropped, not encoded into the first line")


def _fingerprint(resolved: RunOptions, info: InputInfo, shards: ShardSet, fmt: str) -> dict:
    """Everything that changes the output's bytes: a resumed run must match it exactly."""
    return {
        "moeshard": __version__,
        "input": {"sha256": info.sha256, "bytes": info.bytes, "lines": info.lines},
        "shards": {"manifest_sha256": _sha256(shards.root / MANIFEST), "world_size": shards.world_size},
        "options": {**output_options(resolved), "format": fmt},
    }


def _metadata(resolved: RunOptions, info: InputInfo, shards: ShardSet, digest: str, fmt: str) -> dict:
    """What the output records about how it was made: typed JSON, absolute paths."""
    source, spec = shards.data["source"], info.spec
    record = {
        "moeshard_version": __version__,
        "run_fingerprint": digest,
        "input": {"path": "-" if spec.shown == "-" else str(Path(spec.path).resolve()), "format": spec.format,
                  "compression": spec.compression, "text_field": spec.text_field, "id_field": spec.id_field,
                  "sha256": info.sha256, "bytes": info.bytes, "records": info.lines},
        "model": {"source": shards.source_label, "source_kind": source.get("kind"), "source_revision": source.get("revision"),
                  "family": shards.family.name, "dtype": shards.dtype},
        "shards": {"path": str(shards.root.resolve()), "world_size": shards.world_size,
                   "manifest_sha256": _sha256(shards.root / MANIFEST)},
        "options": output_options(resolved),
        # not the output's own path: a resumed or renamed file holds the bytes of an uninterrupted run
        "output": {"format": fmt, "rows": info.lines, "row": "score" if resolved.score else resolved.pooling},
    }
    # the flat string keys of earlier versions, for readers of safetensors' metadata
    record["legacy"] = {
        "format": "pt", "source": shards.source_label, "source_kind": source.get("kind"), "source_revision": source.get("revision"),
        "shards": str(shards.root.resolve()), "world_size": shards.world_size, "dtype": shards.dtype, "family": shards.family.name,
        "pooling": resolved.mode, "normalize": resolved.normalize, "router": resolved.router, "max_length": resolved.max_length,
        "attention": resolved.attention, "input": record["input"]["path"], "input_sha256": info.sha256, "lines": info.lines,
        "moeshard_version": __version__, "run_fingerprint": digest,
    }
    return record


def worker_modules(family) -> tuple[str, ...]:
    """What every worker imports before its first batch: imported once by a launcher whose CPU workers fork."""
    return ("moeshard_cli.run.worker", "transformers.models.auto.tokenization_auto", "transformers.modeling_utils",
            f"transformers.models.{family.model_type}.modeling_{family.model_type}")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_backend(backend: str, device: str, shards: ShardSet) -> None:
    import torch

    from moeshard_cli.dtypes import DTYPES
    from moeshard_cli.moe.experts import resolve_backend

    resolve_backend(backend, torch.device(device), shards.dims.d_model, DTYPES[shards.dtype])

