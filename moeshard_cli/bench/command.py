"""`moeshard bench`: validate, estimate, launch the bench workers, collect every sample.

The heavy lifting runs in bench/worker.py, one process per worker, started by the same
elastic launcher as `moeshard run`.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

from moeshard_cli import __version__
from moeshard_cli.bench.deepspeed_moe import deepspeed_version
from moeshard_cli.bench.options import BenchOptions, uses_deepspeed
from moeshard_cli.bench.weights import SharedExperts, available_memory, check_room, input_blocks, new_run_id, reclaim_orphans, remove_run_files
from moeshard_cli.bench.worker import BenchJob, bench_worker
from moeshard_cli.shard.plan import slice_bounds
from moeshard_cli.shard.sources import resolve
from moeshard_cli.errors import UserError
from moeshard_cli.launch import check_device, launch, pick_device
from moeshard_cli.options import flag
from moeshard_cli.ui import Display, human_bytes


def check_machine(opts: BenchOptions) -> None:
    """After `opts.check_values()`: whether this install and machine can run the sweep. The extras
    come after the values, so a wrong flag is named as such even without deepspeed."""
    require_extra(opts)
    if opts.plot_path:
        check_plotting()
    with flag("--device", "use auto, cpu or cuda"):
        check_device(opts.device)
    check_memory(opts)


def check_memory(opts: BenchOptions) -> None:
    """Refuse sizes that cannot fit, before an hour of bench: a lower bound of one forward's activations."""
    workers = opts.gpus or 2
    room = _memory_per_worker(pick_device(opts.device, workers), workers)  # (raises if this machine cannot host them)
    for name in opts.models:
        dims = resolve(name).dims
        for batch in opts.batches:
            need = activation_bytes(dims, batch, opts.seq_len, workers)
            if need > room:
                raise UserError(f"--seq-len {opts.seq_len} with --batch-sizes {batch} needs at least {human_bytes(need)} per worker "
                                f"for {name}, this machine has {human_bytes(room)} per worker",
                                "use a smaller --seq-len or --batch-sizes (the paper: --seq-len 120, --batch-sizes 10 to 450)")


def require_extra(opts: BenchOptions) -> None:
    """The bench's own dependencies are an extra, left out of the base install."""
    needed = ["psutil"] + ["deepspeed"] * uses_deepspeed(opts.system_names) + ["matplotlib"] * bool(opts.plot_path)
    missing = [name for name in needed if not _installed(name)]
    if missing:
        raise UserError(f"moeshard bench needs {', '.join(missing)}, which the base install leaves out",
                        'install the bench extra: pip install "moeshard[bench]"')


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


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


# Fixed costs of a sweep on the 2-core machine (docs/benchmarks.md), per unit of `slowdown`: starting the
# workers (processes, imports, the process group), DeepSpeed's import and groups, building each model
# (its shell, its replicated weights, each system's layers), and per forward the Python and collective
# overhead of each layer. On a machine shared with other work they take `slowdown` times longer.
START_S, DEEPSPEED_START_S, MODEL_SETUP_S, LAYER_OVERHEAD_S = 5.0, 6.0, 8.0, 0.004
FILL_BYTES_PER_S = 0.4e9  # drawing the built-in experts' random weights into shared memory, per worker


def slowdown(cpu_s: float = 0.2) -> float:
    """How much longer than its CPU time a CPU-bound loop takes on this thread: about 1 on an idle
    machine, 5 when five times as many threads as cores want to run (wall over thread CPU time)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    while time.thread_time() - cpu < cpu_s:
        sum(range(1000))
    return max(1.0, (time.perf_counter() - wall) / (time.thread_time() - cpu))


@dataclass
class Estimate:
    """The time a sweep should take, in parts, and each cell's share (the ETA's units of work)."""

    parts: dict[str, float]
    slowdown: float = 1.0
    cells: dict[tuple, float] = field(default_factory=dict)  # (model, batch, skew, system) or (model, "set-up") -> seconds

    @property
    def total_s(self) -> float:
        return sum(self.parts.values())

    def record(self) -> dict:
        """For the JSON, beside the real time."""
        return {"seconds": round(self.total_s, 1), "parts": {k: round(v, 1) for k, v in self.parts.items()}, "slowdown": round(self.slowdown, 2)}


def estimate(opts: BenchOptions, workers: int, slower: float | None = None) -> Estimate:
    """A FLOP count at a matmul rate measured here and now (so under the machine's present load), plus
    the fixed costs above times `slower` (default: `slowdown()` measured now): start-up, filling the
    shared experts, and every forward the sweep runs (repeats cut as the bench cuts them)."""
    slower = slowdown() if slower is None else slower
    start = START_S + (DEEPSPEED_START_S if uses_deepspeed(opts.system_names) else 0.0)
    est = Estimate({"start-up": start * slower, "model set-up": 0.0, "forwards": 0.0}, slower)
    for name in opts.models:
        source = resolve(name)
        dims, matrices = source.dims, input_blocks(source.family) + 1
        rate = _matmul_rate(dims.d_model, dims.d_ff) / max(1, workers)  # per worker, its share of the cores
        expert_bytes = matrices * dims.moe_layers * dims.num_experts * dims.d_model * dims.d_ff * 4
        setup = est.cells[name, "set-up"] = (MODEL_SETUP_S + expert_bytes / FILL_BYTES_PER_S / max(1, workers)) * slower
        est.parts["model set-up"] += setup
        for batch in opts.batches:
            for skew in opts.skews:
                for system in opts.system_names:
                    per_forward = _forward_flops(dims, matrices, batch * opts.seq_len, _expert_factor(system, dims.num_experts, skew, opts)) / rate
                    per_forward += LAYER_OVERHEAD_S * dims.num_layers * slower
                    warm = opts.warmup if per_forward < opts.max_cell_seconds / 10 else 1
                    seconds = (warm + min(opts.iters, max(3, int(opts.max_cell_seconds / per_forward)))) * per_forward
                    est.cells[name, batch, skew, system] = seconds
                    est.parts["forwards"] += seconds
    return est


def _matmul_rate(d_model: int, d_ff: int) -> float:
    """FLOP/s of an expert-sized matmul on this process's threads: the median of a few, after one
    untimed (the first pays for allocation and thread start). At least 256 wide: on a tiny model's
    matrices it would time the call, which LAYER_OVERHEAD_S already counts, not the arithmetic."""
    d_model, d_ff = max(d_model, 256), max(d_ff, 256)
    a, b = torch.randn(1024, d_model), torch.randn(d_model, d_ff)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024 * d_model * d_ff / statistics.median(times)


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


def bench(opts: BenchOptions, display: Display = Display("off"), debug: bool = False, est: Estimate | None = None) -> dict:
    """Run a checked sweep (`opts.check_values()`, `check_machine(opts)` first). `est` paces the ETA."""
    device = pick_device(opts.device, opts.gpus or 1)
    workers = opts.gpus or default_workers(device)
    pick_device(device, workers)  # raises if this machine cannot host that many
    sources = {m: resolve(m) for m in opts.models}  # fail here, in one line, rather than in every worker
    reclaim_orphans()
    check_room({m: shared_bytes(s, workers) for m, s in sources.items()})
    run_id = new_run_id()
    job = BenchJob(options=opts, run_id=run_id, device=device, display=display, cell_seconds=est.cells if est else {})
    start = time.time()
    try:
        done = launch(bench_worker, job, workers, debug=debug, timeout=opts.timeout).get(0)
    finally:
        remove_run_files(run_id)
    return {"moeshard": __version__, "config": opts.config() | {"workers": workers, "device": device},
            "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
            "seconds": time.time() - start, "estimate": est.record() if est else None,
            "phases": {"start_s": done["started"] - start, "model_setup_s": done["model_setup_s"]}, "cells": done["cells"]}
