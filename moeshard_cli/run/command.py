"""`moeshard run`, the parent side: check everything, lay out or resume the output, launch, finalize.

options -> output and shard set checks (rank files verified, cached) -> one pass over the input
(lines, UTF-8, sha256) -> node 0: a new output laid out, or the unfinished one resumed from its
journal -> elastic launch of run/worker.py with a small job -> node 0: header, rename -> summary.
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeshard_cli import __version__
from moeshard_cli.errors import Interrupted, UserError
from moeshard_cli.launch import check_device, launch, pick_device, resolve_host
from moeshard_cli.model import ATTENTIONS, check_attention
from moeshard_cli.moe.experts import BACKENDS, check_backend
from moeshard_cli.options import at_least, check_router_flags, endpoint, flag
from moeshard_cli.shard.manifest import MANIFEST, ShardSet, check_files, default_shard_set, read_shard_set
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.run import outputs
from moeshard_cli.run.feed import Position
from moeshard_cli.run.inputs import InputInfo, scan_input
from moeshard_cli.run.output_life import OutputLife, RunIdentity
from moeshard_cli.run.outputs import output_format
from moeshard_cli.run.job import RunJob, worker_main
from moeshard_cli.run.schedule import round_window
from moeshard_cli.ui import quantile

POOLINGS = ("mean", "last", "none")


@dataclass
class RunOptions:
    input: Path
    shards: Path | None = None
    output: Path | None = None
    batch_size: int = 32
    max_length: int = 512
    window: int = 8192
    pooling: str | None = None  # None: the family's default (mean for encoders, last for decoders)
    score: bool = False  # per-line log-likelihood instead of embeddings (decoder families)
    normalize: bool = False
    attention: str = "eager"
    device: str = "auto"
    backend: str = "auto"
    router: str = "model"
    skew: float = 0.0
    hot_experts: float = 0.1
    seed: int = 0
    timeout: float = 300.0
    verify: bool = True
    resume: bool = False
    restart: bool = False
    verify_partial: bool = False  # with --resume: every written row's checksum, not only the last steps'
    json_path: Path | None = None
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    debug: bool = False
    show_progress: bool = True
    argv: list[str] = field(default_factory=lambda: sys.argv[1:])

    def validate(self) -> None:
        """Every option, before any work; raises the one-line UserError that names the flag."""
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise UserError(f"--pooling {self.pooling} is unknown", f"use one of {', '.join(POOLINGS)}")
        if self.score and self.pooling is not None:
            raise UserError(f"--score and --pooling {self.pooling} exclude each other", "--score writes one score per line: drop --pooling")
        at_least("--batch-size", self.batch_size, 1, "32")
        at_least("--max-length", self.max_length, 2, "512 (room for one token and the end-of-sequence token)")
        at_least("--window", self.window, 1, "8192")
        at_least("--timeout", self.timeout, 1, "300")
        check_router_flags(self.router, [self.skew], self.hot_experts)
        with flag("--device", "use auto, cpu or cuda"):
            check_device(self.device)
        with flag("--expert-backend", f"use one of {', '.join(BACKENDS)}"):
            check_backend(self.backend)
        with flag("--attention", f"use one of {', '.join(ATTENTIONS)}"):
            check_attention(self.attention)
        at_least("--nnodes", self.nnodes, 1, "2")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1}", "number the nodes 0 to --nnodes - 1, with 0 on the node at --rdzv-endpoint")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT", "give every node the address of node 0, e.g. --rdzv-endpoint node0:29400")
        if self.rdzv_endpoint:
            resolve_host(endpoint(self.rdzv_endpoint)[0])
        if self.resume and self.restart:
            raise UserError("--resume and --restart exclude each other", "pass --resume to continue the unfinished run, --restart to discard it")
        if self.node_rank == 0:  # the node that writes: its files are checked before any work
            outputs.guard_user_files({"--output": self.output_path, "--json": self.json_path}, self.input, self.shards_dir)
        with flag("--output", "end it in .csv for --score, else in .safetensors (or .npy, one row per line)"):
            output_format(self.output_path, self.mode)

    @property
    def shards_dir(self) -> Path:
        return self.shards or default_shard_set()

    @property
    def mode(self) -> str:
        """What each line becomes: "score", or its pooling (the family's default until `for_family`)."""
        return "score" if self.score else self.pooling or "mean"

    def for_family(self, family) -> None:
        """Settle what depends on the shard set's family: the default pooling, and whether it can score."""
        if self.score and not family.decoder:
            raise UserError(f"--score needs a decoder family with an LM head; the shard set holds {family.name}, an encoder",
                            "shard a decoder MoE (Qwen3-MoE, OLMoE, Mixtral), or drop --score to write embeddings")
        if self.pooling is None and not self.score:
            self.pooling = "last" if family.decoder else "mean"

    @property
    def output_path(self) -> Path:
        return self.output or self.input.with_name(self.input.name + (".moeshard-scores.csv" if self.score else ".moeshard.safetensors"))

    @property
    def router_spec(self) -> RouterSpec:
        return RouterSpec(self.router, self.skew, self.hot_experts, self.seed)


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
    _check_backend(opts.backend, device, shards)
    info = scan_input(opts.input)
    window = round_window(opts.window, opts.batch_size, world)
    fingerprint = _fingerprint(opts, info, shards, device, fmt, window)
    digest = outputs.fingerprint_digest(fingerprint)
    metadata = _metadata(opts, info, shards, digest)

    life = OutputLife(output, resume=opts.resume, restart=opts.restart, verify_all=opts.verify_partial) if writer_node else None
    with life or nullcontext():
        start = None
        if life:  # node 0 writes: its output begins fresh or where the unfinished run stopped
            life.claim(info.lines)
            start = life.start(RunIdentity(digest, fingerprint, list(opts.argv)),
                               outputs.plan_layout(output, fmt, opts.mode, info.lines, 3 if opts.score else shards.dims.d_model, metadata))
        job = RunJob(shards=str(shards_dir), input=str(opts.input), lines=info.lines, window=window, batch_size=opts.batch_size,
                     max_length=opts.max_length, pooling=opts.mode, normalize=opts.normalize, device=device, backend=opts.backend,
                     router=opts.router_spec, timeout=opts.timeout, fingerprint=digest,
                     start=start.position if start else Position(), lines_done=start.lines_done if start else 0,
                     layout=start.layout if start else None, journal=str(start.journal) if start else None,
                     show_progress=opts.show_progress, attention=opts.attention)
        if opts.nnodes > 1:
            print(f"node {opts.node_rank} of {opts.nnodes}: waiting up to {opts.timeout:g} s for the other nodes at {opts.rdzv_endpoint}",
                  flush=True)
        try:
            returned = launch(worker_main, job, world, opts.nnodes, opts.node_rank, opts.rdzv_endpoint, opts.debug, timeout=opts.timeout,
                              device=device, preload=worker_modules(shards.family))
        except (UserError, Interrupted) as exc:
            raise life.stop(exc, info.lines) if life else exc
        result = returned.get(0)
        if life:
            life.finish(result["token_end"])
    truncated = (start.truncated_before if start else 0) + (result["truncated"] if result else 0)
    return RunSummary(shards_dir, output, world, device, info.lines, truncated, result, time.perf_counter() - start_time,
                      resumed_at=start.lines_done if start else 0, metadata=metadata)


def _fingerprint(opts: RunOptions, info: InputInfo, shards: ShardSet, device: str, fmt: str, window: int) -> dict:
    """Everything that changes the output's bytes: a resumed run must match it exactly."""
    return {
        "moeshard": __version__,
        "input": {"sha256": info.sha256, "bytes": info.bytes, "lines": info.lines},
        "shards": {"manifest_sha256": _sha256(shards.root / MANIFEST), "world_size": shards.world_size},
        "options": {"pooling": opts.mode, "normalize": opts.normalize, "max_length": opts.max_length,
                    "batch_size": opts.batch_size, "window": window, "router": asdict(opts.router_spec),
                    "device": device, "expert_backend": opts.backend, "attention": opts.attention, "format": fmt},
    }


def _metadata(opts: RunOptions, info: InputInfo, shards: ShardSet, digest: str) -> dict[str, str]:
    source = shards.data["source"]
    return {
        "format": "pt", "source": shards.source_label, "source_kind": str(source.get("kind")),
        "source_revision": str(source.get("revision")), "shards": str(shards.root), "world_size": str(shards.world_size),
        "dtype": shards.dtype, "family": shards.family.name, "pooling": opts.mode, "normalize": str(opts.normalize).lower(), "router": opts.router,
        "max_length": str(opts.max_length), "attention": opts.attention, "input": str(info.path), "input_sha256": info.sha256, "lines": str(info.lines),
        "moeshard_version": __version__, "run_fingerprint": digest,
    }


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

