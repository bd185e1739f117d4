"""`moeshard bench`: validate, estimate, launch the bench workers, collect every sample.

The heavy lifting runs in bench/worker.py, one process per worker, started by the same
elastic launcher as `moeshard run`.
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from moeshard_cli.bench.deepspeed_moe import deepspeed_version
from moeshard_cli.bench.systems import SYSTEMS
from moeshard_cli.bench.weights import remove_run_files
from moeshard_cli.bench.worker import BenchJob, bench_worker
from moeshard_cli.shard.sources import resolve
from moeshard_cli.errors import UserError
from moeshard_cli.launch import check_device, launch, pick_device
from moeshard_cli.options import at_least, check_router_flags, flag, positive
from moeshard_cli.files import check_writable

PAPER = dict(experts=[8, 16, 32, 64, 128, 256], batch_sizes=[10, 50, 100, 250, 450], seq_len=120, gpus=4)


@dataclass
class BenchOptions:
    skews: list[float]
    hot_experts: float
    experts: list[int]
    batch_sizes: list[int]
    seq_len: int
    gpus: int | None
    iters: int
    warmup: int
    systems: list[str]
    capacity_factor: float | None
    model: str | None
    per_layer: bool
    device: str
    seed: int
    max_cell_seconds: float
    timeout: float
    json_path: Path | None = None
    plot_path: Path | None = None
    debug: bool = False
    show_progress: bool = True

    def use_paper_sweep(self) -> None:
        self.experts, self.batch_sizes, self.seq_len, self.gpus = PAPER["experts"], PAPER["batch_sizes"], PAPER["seq_len"], PAPER["gpus"]

    def validate(self) -> None:
        """Every option, before any work; raises the one-line UserError that names the flag."""
        for name, path in (("--plot", self.plot_path), ("--json", self.json_path)):
            if path:
                check_writable(path, name)
        check_router_flags("skewed", self.skews, self.hot_experts)
        if any(e < 1 for e in self.experts):
            raise UserError("--experts must be positive", "e.g. --experts 8,32,128")
        if any(b < 1 for b in self.batch_sizes) or self.seq_len < 1:
            raise UserError("--batch-sizes and --seq-len must be positive", "e.g. --batch-sizes 8 --seq-len 120")
        if self.iters < 1 or self.warmup < 1:
            raise UserError("--iters and --warmup must be at least 1", "e.g. --iters 10 --warmup 2")
        if self.gpus is not None:
            at_least("--gpus", self.gpus, 1, "2")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise UserError(f"--systems names unknown system {unknown[0]}", f"choose from {', '.join(SYSTEMS)}")
        if self.capacity_factor is not None:
            positive("--capacity-factor", self.capacity_factor, "50")
        positive("--max-cell-seconds", self.max_cell_seconds, "12")
        positive("--timeout", self.timeout, "900")
        with flag("--device", "use auto, cpu or cuda"):
            check_device(self.device)


def parse_list(text: str, kind, flag: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag} is empty", f"give a comma-separated list, e.g. {flag} 8,32,128")
    try:
        return [kind(t) for t in items]
    except ValueError as exc:
        raise UserError(f"{flag} {text!r} is not a list of numbers", f"give a comma-separated list, e.g. {flag} 8,32,128") from exc


def default_workers(device: str) -> int:
    if device == "cuda":
        return torch.cuda.device_count()
    return min(2, os.cpu_count() or 1)


def machine() -> dict:
    import transformers

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    info["deepspeed"] = deepspeed_version()  # without importing it: the import picks an accelerator
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def estimate_seconds(opts: BenchOptions, workers: int) -> float:
    """A rough FLOP-count estimate (DeepSpeed's capacity padding included) at a measured matmul rate."""
    a = torch.randn(1024, 768)
    b = torch.randn(768, 3072)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    rate = 5 * 2 * 1024 * 768 * 3072 / (time.perf_counter() - t0) / max(1, workers)  # per worker
    total = 0.0
    for E in opts.experts:
        for B in opts.batch_sizes:
            tokens = B * opts.seq_len
            dense = 2 * tokens * (12 * 4 * 768 * 768 + 6 * 2 * 768 * 3072)  # attention + dense FF
            expert = 2 * tokens * 2 * 768 * 3072 * 6  # one expert per token, 6 MoE layers
            for s in opts.systems:
                factor = {"deepspeed": opts.capacity_factor or min(E, 50), "deepspeed-dropless": 4.0}.get(s, 1.0)
                per_forward = (dense + expert * factor) / rate
                n = opts.warmup + min(opts.iters, max(3, int(opts.max_cell_seconds / max(per_forward, 1e-9))))
                total += n * per_forward * len(opts.skews)
    return total


def bench(opts: BenchOptions) -> dict:
    """Run a validated sweep (opts.validate() first)."""
    device = pick_device(opts.device, opts.gpus or 1)
    workers = opts.gpus or default_workers(device)
    pick_device(device, workers)  # raises if this machine cannot host that many
    models = [opts.model] if opts.model else [f"switch-base-{e}" for e in opts.experts]
    for m in models:
        resolve(m)  # fail here, in one line, rather than in every worker
    run_id = uuid.uuid4().hex[:8]
    job = BenchJob(run_id=run_id, models=models, batch_sizes=opts.batch_sizes, seq_len=opts.seq_len, skews=opts.skews,
                   hot_experts=opts.hot_experts, seed=opts.seed, systems=opts.systems, iters=opts.iters, warmup=opts.warmup,
                   capacity_factor=opts.capacity_factor, per_layer=opts.per_layer, device=device,
                   max_cell_seconds=opts.max_cell_seconds, timeout=opts.timeout, show_progress=opts.show_progress)
    start = time.time()
    try:
        cells = launch(bench_worker, job, workers, debug=opts.debug, timeout=opts.timeout).get(0)
    finally:
        remove_run_files(run_id)
    return {"config": {k: v for k, v in vars(opts).items() if k not in ("debug", "show_progress", "json_path", "plot_path")} | {"workers": workers, "device": device},
            "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
            "seconds": time.time() - start, "cells": cells}
