"""`moeshard bench`: validate, estimate, launch the bench workers, collect every sample.

The heavy lifting runs in bench/worker.py, one process per worker, started by the same
elastic launcher as `moeshard run`.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeshard_cli.bench.deepspeed_moe import deepspeed_version
from moeshard_cli.bench.systems import SYSTEMS, uses_deepspeed
from moeshard_cli.bench.weights import SharedExperts, available_memory, check_room, input_blocks, new_run_id, reclaim_orphans, remove_run_files
from moeshard_cli.bench.worker import BenchJob, bench_worker
from moeshard_cli.shard.plan import slice_bounds
from moeshard_cli.shard.sources import resolve
from moeshard_cli.errors import UserError
from moeshard_cli.launch import check_device, launch, pick_device
from moeshard_cli.options import at_least, check_router_flags, flag, positive
from moeshard_cli.files import check_writable
from moeshard_cli.ui import human_bytes

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
        """Every option, before any work; raises the one-line UserError that names the flag.
        The values come first, the extra they need after: a wrong flag is named even without deepspeed."""
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
        at_least("--timeout", self.timeout, 1, "900")
        with flag("--device", "use auto, cpu or cuda"):
            check_device(self.device)
        self.require_extra()
        if self.plot_path:
            check_plotting()
        self.check_memory()

    def check_memory(self) -> None:
        """Refuse sizes that cannot fit, before an hour of bench: a lower bound of one forward's activations."""
        workers = self.gpus or 2
        room = _memory_per_worker(pick_device(self.device, workers), workers)  # (raises if this machine cannot host them)
        for name in models_of(self):
            dims = resolve(name).dims
            for batch in self.batch_sizes:
                need = activation_bytes(dims, batch, self.seq_len, workers)
                if need > room:
                    raise UserError(f"--seq-len {self.seq_len} with --batch-sizes {batch} needs at least {human_bytes(need)} per worker "
                                    f"for {name}, this machine has {human_bytes(room)} per worker",
                                    "use a smaller --seq-len or --batch-sizes (the paper: --seq-len 120, --batch-sizes 10 to 450)")

    def require_extra(self) -> None:
        """The bench's own dependencies are an extra, left out of the base install."""
        needed = ["psutil"] + ["deepspeed"] * uses_deepspeed(self.systems) + ["matplotlib"] * bool(self.plot_path)
        missing = [name for name in needed if not _installed(name)]
        if missing:
            raise UserError(f"moeshard bench needs {', '.join(missing)}, which the base install leaves out",
                            'install the bench extra: pip install "moeshard[bench]"')


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


LIST_EXAMPLES = {"--skew": "0,0.6", "--experts": "8,32,128", "--batch-sizes": "8,32", "--systems": "moeshard,deepspeed,ep"}


def parse_list(text: str, kind, flag: str) -> list:
    example = f"give a comma-separated list, e.g. {flag} {LIST_EXAMPLES[flag]}"
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag} is empty", example)
    try:
        return [kind(t) for t in items]
    except ValueError as exc:
        raise UserError(f"{flag} {text!r} is not a list of numbers", example) from exc


def check_plotting() -> None:
    """--plot is drawn after the whole bench: a matplotlib that cannot load must be found now."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except Exception as exc:
        raise UserError(f"--plot needs matplotlib, which fails to load ({type(exc).__name__}: {str(exc).strip()[:120]})",
                        'reinstall it (pip install "moeshard[bench]"), or leave out --plot and keep the results with --json') from None


def activation_bytes(dims, batch: int, seq_len: int, workers: int) -> int:
    """A lower bound of one forward's activations on a worker (float32): one layer's attention scores
    (one head at least), one expert slice's rows for every worker's tokens, and the gathered hidden states."""
    tokens = batch * seq_len
    scores = batch * seq_len * seq_len
    return 4 * (scores + tokens * dims.d_ff + tokens * workers * dims.d_model)


def _memory_per_worker(device: str, workers: int) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return available_memory() // workers


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


# Fixed costs of a sweep, measured on the 2-core machine (docs/benchmarks.md): starting the workers,
# DeepSpeed's import and groups, and per forward the Python and collective overhead of each layer.
START_S, DEEPSPEED_START_S, LAYER_OVERHEAD_S = 8.0, 6.0, 0.004
FILL_BYTES_PER_S = 0.4e9  # drawing the built-in experts' random weights into shared memory, per worker


def models_of(opts: BenchOptions) -> list[str]:
    return [opts.model] if opts.model else [f"switch-base-{e}" for e in opts.experts]


def estimate_seconds(opts: BenchOptions, workers: int) -> float:
    """A FLOP-count guess at a matmul rate measured here, plus the fixed costs above: start-up,
    filling the shared experts, and every forward the sweep runs (repeats cut as the bench cuts them)."""
    total = START_S + (DEEPSPEED_START_S if uses_deepspeed(opts.systems) else 0.0)
    for name in models_of(opts):
        source = resolve(name)
        dims, matrices = source.dims, input_blocks(source.family) + 1
        rate = _matmul_rate(dims.d_model, dims.d_ff) / max(1, workers)  # per worker, its share of the cores
        expert_bytes = matrices * dims.moe_layers * dims.num_experts * dims.d_model * dims.d_ff * 4
        total += expert_bytes / FILL_BYTES_PER_S / max(1, workers)
        for batch in opts.batch_sizes:
            for skew in opts.skews:
                for system in opts.systems:
                    per_forward = _forward_flops(dims, matrices, batch * opts.seq_len, _expert_factor(system, dims.num_experts, skew, opts)) / rate
                    per_forward += LAYER_OVERHEAD_S * dims.num_layers
                    warm = opts.warmup if per_forward < opts.max_cell_seconds / 10 else 1
                    total += (warm + min(opts.iters, max(3, int(opts.max_cell_seconds / per_forward)))) * per_forward
    return total


def _matmul_rate(d_model: int, d_ff: int) -> float:
    a, b = torch.randn(1024, d_model), torch.randn(d_model, d_ff)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024 * d_model * d_ff / (time.perf_counter() - t0)


def _forward_flops(dims, matrices: int, tokens: int, expert_factor: float) -> float:
    """Attention projections and dense feed-forwards of every layer, plus the experts' rows (K per token)."""
    d = dims.d_model
    dense_layers = dims.num_layers - dims.moe_layers
    per_token = (dims.num_layers * 4 * d * dims.attention_width + dense_layers * matrices * d * dims.dense_ff
                 + dims.moe_layers * matrices * d * dims.d_ff * dims.top_k * expert_factor)
    return 2 * tokens * per_token


def _expert_factor(system: str, num_experts: int, skew: float, opts: BenchOptions) -> float:
    """Rows each system computes per routed token: DeepSpeed pads every expert to its capacity."""
    from moeshard_cli.bench.systems import paper_capacity_factor
    from moeshard_cli.moe.routing import skewed_probabilities

    if system == "deepspeed":
        return opts.capacity_factor or paper_capacity_factor(num_experts)
    if system == "deepspeed-dropless":  # every expert padded to the busiest one
        return num_experts * float(skewed_probabilities(num_experts, skew, opts.hot_experts).max())
    return 1.0


def shared_bytes(source, workers: int) -> int:
    """Bytes of a model's experts in the bench's shared [G, E, D, H] layout."""
    dims = source.dims
    return SharedExperts.size_for(source.family, dims.moe_layers, dims.num_experts, dims.d_model, slice_bounds(dims.d_ff, workers), torch.float32)


def bench(opts: BenchOptions) -> dict:
    """Run a validated sweep (opts.validate() first)."""
    device = pick_device(opts.device, opts.gpus or 1)
    workers = opts.gpus or default_workers(device)
    pick_device(device, workers)  # raises if this machine cannot host that many
    models = models_of(opts)
    sources = {m: resolve(m) for m in models}  # fail here, in one line, rather than in every worker
    reclaim_orphans()
    check_room({m: shared_bytes(s, workers) for m, s in sources.items()})
    run_id = new_run_id()
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
