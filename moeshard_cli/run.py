"""`moeshard run`: check everything, tokenize, launch the workers, summarise.

input and output checks -> shard set checks (manifest, files, devices) -> token ids -> batches per rank ->
elastic launch of worker.py -> rank 0 writes the output -> summary.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeshard_cli.corpus import plan_batches, read_lines, tokenize
from moeshard_cli.errors import UserError
from moeshard_cli.launch import launch
from moeshard_cli.manifest import check_files, default_shard_set, read_shard_set
from moeshard_cli.model import DTYPES
from moeshard_cli.moe.experts import resolve_backend
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.outputs import check_writable
from moeshard_cli.worker import RunJob, worker_main

MAX_CPU_WORKERS_PER_CORE = 4


@dataclass
class RunOptions:
    input: Path
    shards: Path | None = None
    output: Path | None = None
    batch_size: int = 32
    max_length: int = 512
    pooling: str = "mean"
    device: str = "auto"
    backend: str = "auto"
    router: RouterSpec = field(default_factory=RouterSpec)
    timeout: float = 300.0
    verify: bool = False
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    debug: bool = False
    show_progress: bool = True


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

    def figures(self) -> dict:
        """The numbers of the results table, for people (report.py) and machines (--json)."""
        if self.result is None:
            return {}
        res = self.result
        rank0 = res["ranks"][0]["forward_s"]
        tokens = sum(r["tokens"] for r in res["ranks"])
        wall = res["wall_s"]
        timers = [r["timer"] for r in res["ranks"]]
        return {
            "shards": str(self.shards), "output": str(self.output), "world_size": self.world, "device": self.device,
            "backend": res["backend"], "lines": self.lines, "truncated_lines": self.truncated, "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0, "batches": len(rank0),
            "ttft_s": {"mean": statistics.fmean(rank0), "p50": _quantile(rank0, 0.5), "p90": _quantile(rank0, 0.9)},
            "comm_s": statistics.fmean(t.get("comm", 0.0) for t in timers),
            "compute_s": statistics.fmean(t.get("compute", 0.0) for t in timers),
            "layers": [{"layer": l["layer"], "max_tokens_per_expert": max(l["tokens_E"]),
                        "mean_tokens_per_expert": sum(l["tokens_E"]) / len(l["tokens_E"]), "tokens_per_worker": l["tokens_G"]}
                       for l in res["layers"]],
        }


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def pick_device(requested: str, local_workers: int) -> str:
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {requested} is unknown", "use auto, cpu or cuda")
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


def run(opts: RunOptions) -> RunSummary:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    if opts.pooling not in ("mean", "none"):
        raise UserError(f"--pooling {opts.pooling} is unknown", "use --pooling mean or --pooling none")
    if opts.timeout <= 0:
        raise UserError(f"--timeout {opts.timeout} must be positive", "pass the collective timeout in seconds, e.g. --timeout 300")
    output = opts.output or opts.input.with_name(opts.input.name + ".moeshard.safetensors")
    lines = read_lines(opts.input)
    check_writable(output)
    shards_dir = opts.shards or default_shard_set()
    shards = read_shard_set(shards_dir)
    check_files(shards, verify=opts.verify)
    world = shards.world_size
    device = pick_device(opts.device, world // max(opts.nnodes, 1))
    config = shards.config
    resolve_backend(opts.backend, torch.device(device), config["d_model"], DTYPES[shards.dtype])
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(shards_dir))
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer saved in {shards_dir} ({type(exc).__name__})", "re-shard from a checkpoint that ships its tokenizer files") from exc
    tokens = tokenize(lines, tokenizer, opts.max_length)
    job = RunJob(
        shards=str(shards_dir), token_ids=tokens.ids, batches=plan_batches([len(t) for t in tokens.ids], opts.batch_size, world),
        pooling=opts.pooling, device=device, backend=opts.backend, router=opts.router, timeout=opts.timeout,
        output=str(output), show_progress=opts.show_progress,
        metadata={"source": shards.source_label, "shards": str(shards_dir), "world_size": str(world), "dtype": shards.dtype,
                  "pooling": opts.pooling, "router": opts.router.kind, "max_length": str(opts.max_length)},
    )
    returned = launch(worker_main, job, world, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, opts.debug, join_timeout=opts.timeout)
    return RunSummary(shards_dir, output, world, device, len(lines), tokens.truncated, returned.get(0), time.perf_counter() - start)
