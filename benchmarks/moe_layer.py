"""One MoEShard layer at switch-base expert size, against its floor and with each exchange strategy.

Usage: python benchmarks/moe_layer.py [--experts 8,128] [--tokens 960] [--workers 2] [--repeats 10]
         [--skews 0,0.6] [--strategies alltoall,padded] [--backends grouped_mm,loop]
Each worker runs 1 thread (gloo, CPU). The floor of a layer on one worker is the larger of
its expert FLOPs at the measured matmul rate and its expert weight bytes at the measured
copy bandwidth, both measured here on 1 thread. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers.activations import ACT2FN

from moeshard_cli.moe.dispatch import ShardedDispatch
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.experts import GroupedExperts
from moeshard_cli.moe.layer import ShardedSparseMLP, TokenContext
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.shard.plan import slice_bounds

D, D_FF = 768, 3072


def floors(tokens_all: int, experts: float, width: int) -> tuple[float, float]:
    """(seconds for the FLOPs, seconds for the weight bytes) of one worker's layer, on 1 thread.

    `experts` is the mean number of experts that received tokens (only those are read)."""
    x = torch.randn(tokens_all, D)
    w = torch.randn(D, width)
    x @ w
    t0 = time.perf_counter()
    for _ in range(3):
        x @ w
    rate = 3 * 2 * tokens_all * D * width / (time.perf_counter() - t0)
    big = torch.randn(512 * 2**20 // 4)  # larger than any cache: a read from memory
    big.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        big.sum()
    bandwidth = 3 * big.numel() * 4 / (time.perf_counter() - t0)
    flops = 2 * 2 * tokens_all * D * width
    weight_bytes = experts * 2 * D * width * 4
    return flops / rate, weight_bytes / bandwidth


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for E in args.experts:
        lo, hi = slice_bounds(D_FF, world)[rank]
        gen = torch.Generator().manual_seed(rank)
        w_in = torch.randn(E, D, hi - lo, generator=gen) * D**-0.5
        w_out = torch.randn(E, hi - lo, D, generator=gen) * D**-0.5
        ctx = TokenContext()
        ctx.set_batch(torch.ones(1, args.tokens, dtype=torch.long), torch.arange(args.tokens)[None] + rank * args.tokens)
        x = torch.randn(1, args.tokens, D, generator=gen)
        for backend in args.backends:
            experts = GroupedExperts(w_in, w_out, ACT2FN["relu"], backend)
            for strategy in args.strategies:
                timer = SectionTimer(torch.device("cpu"))
                layer = ShardedSparseMLP(D, E, False, ShardedDispatch(experts, Collectives(timer=timer, strategy=strategy), timer), RouterSpec(), ctx, 1)
                torch.nn.init.normal_(layer.router.classifier.weight, std=D**-0.5)
                for skew in args.skews:
                    layer.spec = RouterSpec("skewed", skew, 0.1, 0)
                    samples, comm, used = [], [], []
                    with torch.inference_mode():
                        for it in range(args.repeats + 2):
                            timer.totals.clear()
                            dist.barrier()
                            t0 = time.perf_counter()
                            layer(x)
                            elapsed = torch.tensor([time.perf_counter() - t0, timer.totals["comm"]])
                            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                            if it >= 2:
                                samples.append(elapsed[0].item())
                                comm.append(elapsed[1].item())
                                used.append(int((layer.load.tokens_E > 0).sum()))
                            layer.load.reset()
                    rows.append((E, backend, strategy, skew, statistics.median(samples), statistics.median(comm), statistics.fmean(used)))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", default="8,128")
    p.add_argument("--tokens", type=int, default=960, help="tokens per worker")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skews", default="0,0.6")
    p.add_argument("--strategies", default="alltoall,padded")
    p.add_argument("--backends", default="grouped_mm,loop")
    args = p.parse_args()
    args.experts = [int(e) for e in args.experts.split(",")]
    args.skews = [float(s) for s in args.skews.split(",")]
    args.strategies = args.strategies.split(",")
    args.backends = args.backends.split(",")
    from moeshard_cli.launch import free_port

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args.workers, free_port(), args, queue), nprocs=args.workers)
    rows = queue.get()
    torch.set_num_threads(1)
    width = -(-D_FF // args.workers)
    print("| E | backend | exchange | skew | experts hit | layer ms | comm ms (share) | floor ms (FLOPs / bytes) | layer / floor |\n|---|---|---|---|---|---|---|---|---|")
    for E, backend, strategy, skew, t, c, used in rows:
        f_flops, f_bytes = floors(args.tokens * args.workers, used, width)
        floor = max(f_flops, f_bytes)
        print(f"| {E} | {backend} | {strategy} | {skew:g} | {used:.0f} | {t * 1e3:.1f} | {c * 1e3:.1f} ({c / t:.0%}) | {floor * 1e3:.1f} ({f_flops * 1e3:.1f} / {f_bytes * 1e3:.1f}) | {t / floor:.2f} |")


if __name__ == "__main__":
    main()
