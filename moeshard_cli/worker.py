"""One worker of `moeshard run`: load its rank file, encode its batches, hand results to rank 0.

Started by torch.distributed's elastic launcher (launch.py), one process per rank, with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in its environment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from transformers.activations import ACT2FN

from moeshard_cli.launch import worker_process_group
from moeshard_cli.manifest import read_shard_set
from moeshard_cli.model import DTYPES, build_sharded_encoder, switch_config
from moeshard_cli.moe.dispatch import ShardedDispatch
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.experts import GroupedExperts, resolve_backend
from moeshard_cli.moe.layer import ShardedSparseMLP, TokenContext
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.outputs import write_embeddings
from moeshard_cli.reference import token_ids_for


@dataclass
class RunJob:
    shards: str
    token_ids: list[list[int]]
    batches: list[list[list[int]]]  # per rank, its batches of line indices
    pooling: str
    device: str  # "cpu" | "cuda"
    backend: str
    router: RouterSpec
    timeout: float
    output: str
    metadata: dict[str, str] = field(default_factory=dict)
    show_progress: bool = True


def make_sharded_mlp(config, spec: RouterSpec, ctx: TokenContext, comm: Collectives, timer: SectionTimer, backend: str):
    def make(layer: int, _config, w_in_EDF, w_out_EFD):
        experts = GroupedExperts(w_in_EDF, w_out_EFD, ACT2FN[config.dense_act_fn], backend)
        dispatch = ShardedDispatch(experts, comm, timer)
        return ShardedSparseMLP(config.d_model, config.num_experts, config.router_bias, dispatch, spec, ctx, layer)

    return make


def batch_tensors(token_ids: list[list[int]], lines: list[int], pad_id: int, device):
    """input_ids, attention_mask and global token ids [B, S] for a batch of line indices."""
    width = max(len(token_ids[i]) for i in lines)
    ids = torch.full((len(lines), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lines), width), dtype=torch.long)
    for row, i in enumerate(lines):
        ids[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
        mask[row, : len(token_ids[i])] = 1
    return ids.to(device), mask.to(device), token_ids_for(lines, width).to(device)


@record
def worker_main(job: RunJob):
    with worker_process_group(job.device, job.timeout) as (rank, world, device):
        return _encode(job, rank, world, device)


def _encode(job: RunJob, rank: int, world: int, device: torch.device):
    shards = read_shard_set(Path(job.shards))
    timer = SectionTimer(device)
    ctx, comm = TokenContext(), Collectives(timer=timer)
    config = switch_config(shards.config)
    backend = resolve_backend(job.backend, device, config.d_model, DTYPES[shards.dtype])
    model, layers = build_sharded_encoder(shards, rank, device, make_sharded_mlp(config, job.router, ctx, comm, timer, backend))
    pad_id = config.pad_token_id or 0

    mine = job.batches[rank]
    steps = max(len(b) for b in job.batches)
    results: dict[int, torch.Tensor] = {}
    forward_s: list[float] = []
    progress = _Progress(job, rank) if job.show_progress and rank == 0 else None
    start = time.perf_counter()
    with torch.inference_mode():
        for step in range(steps):
            lines = mine[step] if step < len(mine) else None
            # A worker with no batch left still joins every collective, on an all-padding dummy.
            ids, mask, gid = batch_tensors(job.token_ids, lines, pad_id, device) if lines else (
                torch.full((1, 1), pad_id, device=device), torch.zeros((1, 1), dtype=torch.long, device=device), torch.zeros((1, 1), dtype=torch.long, device=device))
            ctx.set_batch(mask, gid)
            t0 = time.perf_counter()
            hidden_BSD = model(input_ids=ids, attention_mask=mask).last_hidden_state
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forward_s.append(time.perf_counter() - t0)
            if lines:
                _collect(results, lines, hidden_BSD.float(), mask, job.pooling)
            if progress:
                progress.step(step)
    wall = time.perf_counter() - start
    if progress:
        progress.close()
    stats = {"rank": rank, "forward_s": forward_s, "timer": timer.flush(), "tokens": int(sum(len(job.token_ids[i]) for b in mine for i in b))}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((results, stats), gathered, dst=0)
    if rank != 0:
        return None
    all_results: dict[int, torch.Tensor] = {}
    for part, _ in gathered:
        all_results.update(part)
    write_embeddings(Path(job.output), all_results, job.pooling, job.metadata)
    loads = [{"layer": i, "tokens_E": m.load.tokens_E.tolist(), "tokens_G": m.load.tokens_G.tolist()}
             for i, m in zip(layers, (model.encoder.block[i].layer[-1].mlp for i in layers))]
    return {"wall_s": wall, "ranks": [s for _, s in gathered], "layers": loads, "backend": backend}


def _collect(results, lines, hidden_BSD, mask, pooling):
    for row, i in enumerate(lines):
        n = int(mask[row].sum())
        tokens_SD = hidden_BSD[row, :n].cpu()
        results[i] = tokens_SD.mean(0) if pooling == "mean" else tokens_SD.clone()


class _Progress:
    """Rank 0's view of the run: all workers move in lockstep, so step k means batches < (k+1)*world are done."""

    def __init__(self, job: RunJob, rank: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        world = len(job.batches)
        self.per_step = []
        steps = max(len(b) for b in job.batches)
        for s in range(steps):
            lines = [job.batches[r][s] for r in range(world) if s < len(job.batches[r])]
            self.per_step.append((sum(len(b) for b in lines), sum(len(job.token_ids[i]) for b in lines for i in b)))
        self.bar = Progress(TextColumn("[bold]encoding"), BarColumn(), MofNCompleteColumn(), TextColumn("lines"),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=True)
        self.task = self.bar.add_task("encoding", total=sum(n for n, _ in self.per_step), rate="")
        self.tokens, self.t0 = 0, time.perf_counter()
        self.bar.start()

    def step(self, s: int) -> None:
        lines, tokens = self.per_step[s]
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, advance=lines, rate=f"{rate:,.0f} tok/s")

    def close(self) -> None:
        self.bar.stop()
