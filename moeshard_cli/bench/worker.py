"""One worker of `moeshard bench`: every system, configuration and repeat, interleaved.

All systems share the model shell (transformers' attention, norms, embeddings), the router
and the inputs; per configuration only each sparse layer's dispatch is swapped. Repeats are
interleaved round by round (system order rotating) so drift on the machine hits all systems
alike. A sample is one full encoder forward (TTFT), the slowest worker's time.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from moeshard_cli.bench.options import BenchOptions, uses_deepspeed
from moeshard_cli.bench.systems import SharedMLP, Skip, build_dispatch
from moeshard_cli.families import SHARED_EXPERT
from moeshard_cli.bench.tensor_parallel import TensorParallelSystem, checkpoint_for
from moeshard_cli.bench.weights import SharedExperts, available_memory, shm_path
from moeshard_cli.shard.sources import resolve
from moeshard_cli.launch import worker_process_group
from moeshard_cli.model import build_shell, moe_module
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.experts import resolve_backend
from moeshard_cli.moe.layer import TokenContext, token_ids_for
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.shard.plan import expert_layers, slice_bounds
from moeshard_cli.ui import Display, human_seconds


@dataclass
class BenchJob:
    """What each worker gets: the options as given, and what the command resolved from them."""

    options: BenchOptions
    run_id: str
    device: str  # --device auto resolved
    display: Display = Display("off")
    cell_seconds: dict = field(default_factory=dict)  # (model, batch, skew, system) -> estimated s: the progress's pace
    backend: str = "auto"


def _max_all(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _sum_all(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class LayerClock:
    """Wall time of each MoE layer (the family's `moe_block`: router and experts), per forward."""

    def __init__(self, family, model, layers: list[int], device):
        self.times: dict[int, float] = {}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for i in layers:
            ff = family.moe_block(model, i)
            ff.register_forward_pre_hook(lambda m, a, i=i: self._start(i))
            ff.register_forward_hook(lambda m, a, o, i=i: self._stop(i))
        self._t0 = {}

    def _start(self, i):
        self.sync()
        self._t0[i] = time.perf_counter()

    def _stop(self, i):
        self.sync()
        self.times[i] = time.perf_counter() - self._t0[i]


@record
def bench_worker(job: BenchJob):
    opts = job.options
    with worker_process_group(job.device, opts.timeout) as (rank, world, device):
        started = time.time()
        if uses_deepspeed(opts.system_names):
            from moeshard_cli.bench.deepspeed_moe import init_deepspeed_groups

            init_deepspeed_groups()
        cells, setup_s = [], {}
        progress = _Progress(job) if rank == 0 else None
        try:
            for model_name in opts.models:
                cells += _bench_model(job, model_name, rank, world, device, progress, setup_s)
        finally:
            if progress:
                progress.tracker.close()
        return {"cells": cells, "started": started, "model_setup_s": setup_s} if rank == 0 else None


class _Progress:
    """Rank 0's progress over (configuration, system) cells, paced by each cell's estimated seconds
    (cells differ a hundredfold: a count of cells would make a poor ETA)."""

    def __init__(self, job: BenchJob):
        opts = job.options
        cells = [(m, b, k, s) for m in opts.models for b in opts.batches for k in opts.skews for s in opts.system_names]
        setups = [(m, "set-up") for m in opts.models]  # filling the experts of a large model takes a while too
        self.weight = {key: job.cell_seconds.get(key, 1.0 if key in cells else 0.0) for key in cells + setups}
        self.credited = dict.fromkeys(self.weight, 0.0)
        self.cells, self.finished, self.verbose = len(cells), 0, job.display.verbose
        self.tracker = job.display.tracker("bench", sum(self.weight.values()), count=lambda *_: f"{self.finished}/{self.cells} cells")

    def show(self, what: str) -> None:
        self.tracker.advance(0, what)

    def part(self, key: tuple, fraction: float) -> None:
        """`fraction` more of cell `key`'s forwards are done."""
        step = min(self.weight[key] * fraction, self.weight[key] - self.credited[key])
        self.credited[key] += step
        self.tracker.advance(step)

    def set_up(self, model: str) -> None:
        self.part((model, "set-up"), 1.0)

    def done(self, key: tuple, row: dict | None = None) -> None:
        self.finished += 1
        self.part(key, 1.0)
        if self.verbose and row is not None:
            self.tracker.print(_describe(row))


def _describe(row: dict) -> str:
    """One finished cell in a line (-v)."""
    where = f"{row['model']} B={row['batch_size']} skew {row['skew']:g} {row['system']}"
    if row.get("skipped"):
        return f"{where}: skipped ({row['skipped']})"
    s = row["samples_ms"]
    return f"{where}: {human_seconds(statistics.median(s) / 1e3)} median of {len(s)}"


def _bench_model(job: BenchJob, model_name: str, rank: int, world: int, device, progress, setup_s: dict) -> list[dict]:
    opts, t0 = job.options, time.perf_counter()
    source = resolve(model_name)
    family, config, dims = source.family, source.config, source.dims
    E, D = dims.num_experts, dims.d_model
    layers = expert_layers(family, (e.name for e in source.tensors))
    bounds = slice_bounds(dims.d_ff, world)
    need = SharedExperts.size_for(family, len(layers), E, D, bounds, torch.float32)
    free = int(_max_all([-available_memory()])[0] * -1)  # the smallest free memory of any worker
    if need > 0.85 * free:
        reason = f"out of memory: the experts need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        rows = [dict(experts=E, model=model_name, batch_size=b, seq_len=opts.seq_len, skew=k, workers=world, system=n,
                     samples_ms=[], per_layer_ms={}, skipped=reason) for b in opts.batches for k in opts.skews for n in opts.system_names]
        for row in rows if progress else ():
            progress.done((model_name, row["batch_size"], row["skew"], row["system"]), row)
        if progress:
            progress.set_up(model_name)
        return rows
    path = shm_path(job.run_id, E)
    if rank == 0:
        SharedExperts.create(path, need)
    dist.barrier()
    shared = SharedExperts(path, family, layers, E, D, bounds, torch.float32)
    shared.fill(source, rank, world)
    dist.barrier()

    timer = SectionTimer(device, enabled=False)
    comm, ctx = Collectives(timer=timer), TokenContext()
    mlps = {}  # layer -> moeshard's MoE module there; each system only swaps their dispatch

    def make(i):
        mlps[i] = moe_module(family, config, None, RouterSpec(), ctx, i)
        return mlps[i]

    replicated = {e.name: e.load() for e in source.tensors if not family.parse_expert_key(e.name)}
    model, _ = build_shell(family, config, replicated, make, device)
    clock = LayerClock(family, model, layers, device) if opts.per_layer else None
    backend = resolve_backend(job.backend, device, D, torch.float32)
    act = family.act(config)
    free -= need

    shared_mlps = {i: shared_mlp(family, config, source, model, i, act, backend) for i in layers}
    systems: dict[str, dict | TensorParallelSystem | Skip] = {}
    tp_dir = path.with_name(path.stem + "-tp")
    for name in opts.system_names:
        if name == "tp":
            systems[name] = _tensor_parallel(source, tp_dir, rank, world, device)
            continue
        built = {i: build_dispatch(name, i, family, config, shared, comm, timer, act, backend, opts.capacity_factor, free, shared_mlps[i])
                 for i in layers}
        systems[name] = next((d for d in built.values() if isinstance(d, Skip)), None) or built

    setup_s[model_name] = time.perf_counter() - t0
    if progress:
        progress.set_up(model_name)
    cells = []
    for batch in opts.batches:
        gen = torch.Generator().manual_seed(opts.seed * 7919 + batch * 31 + rank)
        ids = torch.randint(2, dims.vocab_size, (batch, opts.seq_len), generator=gen).to(device)
        mask = torch.ones_like(ids)
        ctx.set_batch(mask, token_ids_for(list(range(rank * batch, (rank + 1) * batch)), opts.seq_len).to(device))
        for skew in opts.skews:
            spec = RouterSpec("skewed", skew, opts.hot_experts, opts.seed)
            for system in systems.values():
                if isinstance(system, TensorParallelSystem):
                    system.spec = spec
                    system.set_inputs(ids, mask)
            for mlp in mlps.values():
                mlp.spec = spec
            where = dict(experts=E, model=model_name, batch_size=batch, seq_len=opts.seq_len, skew=skew, workers=world)
            cells += _bench_cell(opts, family, model, mlps, systems, clock, ids, mask, where, rank, world, device, progress)
    del systems, model  # the views into shared memory go before it is unlinked
    mlps.clear()
    dist.barrier()
    if rank == 0:
        path.unlink(missing_ok=True)
        shutil.rmtree(tp_dir, ignore_errors=True)
    return cells


def shared_mlp(family, config, source, model, layer: int, act, backend: str) -> SharedMLP | None:
    """A layer's shared expert, whole, read from the source (small beside the routed experts), or None."""
    if not getattr(family, "shared", ""):
        return None
    entries = {e.name: e for e in source.tensors}
    load = lambda m: entries[family.expert_key(layer, SHARED_EXPERT, m)].load().to(next(model.parameters()).device)  # noqa: E731
    return SharedMLP([load(m) for m in family.expert_inputs], load(family.expert_output), family.shared_gate_fn(model, layer), act, backend)


def _tensor_parallel(source, directory, rank: int, world: int, device) -> TensorParallelSystem | Skip:
    """transformers' tensor-parallel plan, or why it cannot run here (the same answer on every worker)."""
    dims = source.dims
    if not source.family.decoder:
        return Skip("transformers has no tensor-parallel plan for Switch Transformers")
    plan = getattr(source.config, "base_model_tp_plan", None) or {}
    if not any("experts" in key for key in plan):
        return Skip(f"transformers' tensor-parallel plan for {source.family.name} does not cut the experts")
    if importlib.util.find_spec("accelerate") is None:
        return Skip("transformers' tensor-parallel loading needs accelerate (pip install accelerate)")
    if dims.d_ff % world or (dims.d_ff // world * 4) % 16:
        return Skip(f"transformers' plan cuts F={dims.d_ff} into {world} equal slices whose rows must be multiples of 16 bytes "
                    "(its grouped_mm: 'strides should be multiple of 16 bytes')")
    return TensorParallelSystem(source, checkpoint_for(source, directory, rank), rank, world, device)


def _forward(family, model, ids, mask, device):
    out = family.hidden_states(model, ids, mask)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _use(mlps, system):
    if isinstance(system, TensorParallelSystem):
        return
    for i, mlp in mlps.items():
        mlp.dispatch = system[i]
        mlp.load.reset()


def _run(family, model, system, ids, mask, device) -> torch.Tensor:
    """One forward of `system` (after `_use`): the hidden states of this worker's sequences."""
    if isinstance(system, TensorParallelSystem):
        out = system.forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return _forward(family, model, ids, mask, device)


def _counters(system) -> list:
    """The objects that count a system's routed and dropped tokens (its dispatches)."""
    return [system] if isinstance(system, TensorParallelSystem) else list(system.values())


@torch.inference_mode()
def _bench_cell(opts, family, model, mlps, systems, clock, ids, mask, config: dict, rank: int, world: int, device, progress) -> list[dict]:
    runnable = [n for n, s in systems.items() if not isinstance(s, Skip)]
    rows = {n: dict(config, system=n, samples_ms=[], per_layer_ms={}, skipped=s.reason) for n, s in systems.items() if isinstance(s, Skip)}
    outputs, iters, forwards = {}, {}, {}
    key = {n: (config["model"], config["batch_size"], config["skew"], n) for n in systems}
    for name, row in rows.items() if progress else ():
        progress.done(key[name], row)
    for name in runnable:
        if progress:
            progress.show(f"E={config['experts']} B={config['batch_size']} skew {config['skew']:g}: {name}")
        _use(mlps, systems[name])
        for d in _counters(systems[name]):
            d.reset()  # a cell's dropped tokens are its own, whatever ran before it
        t0 = time.perf_counter()
        outputs[name] = _run(family, model, systems[name], ids, mask, device).float().cpu()
        first = _max_all([time.perf_counter() - t0])[0]
        # A forward that takes a good part of the cell's budget is warm after one run.
        warm = opts.warmup if first < opts.max_cell_seconds / 10 else 1
        for _ in range(warm - 1):
            _run(family, model, systems[name], ids, mask, device)
        # Slow systems get fewer repeats (never fewer than 3) so a sweep stays within budget.
        iters[name] = max(min(opts.iters, 3), min(opts.iters, int(opts.max_cell_seconds / max(first, 1e-9))))
        forwards[name] = warm + iters[name]
        if progress:
            progress.part(key[name], warm / forwards[name])
        rows[name] = dict(config, system=name, samples_ms=[], per_layer_ms={str(i): [] for i in mlps}, skipped=None,
                          imbalance=_imbalance(name, mlps, world))
    for it in range(max(iters.values(), default=0)):
        order = runnable[it % len(runnable):] + runnable[: it % len(runnable)] if runnable else []
        for name in order:
            if it >= iters[name]:
                continue
            _use(mlps, systems[name])
            dist.barrier()
            t0 = time.perf_counter()
            _run(family, model, systems[name], ids, mask, device)
            rows[name]["samples_ms"].append(round(1e3 * _max_all([time.perf_counter() - t0])[0], 3))
            if clock and not isinstance(systems[name], TensorParallelSystem):
                per = _max_all([clock.times[i] for i in mlps])
                for i, t in zip(mlps, per):
                    rows[name]["per_layer_ms"][str(i)].append(round(1e3 * t, 3))
            if progress:
                progress.part(key[name], 1 / forwards[name])
                if len(rows[name]["samples_ms"]) == iters[name]:
                    progress.done(key[name], rows[name])
    ref = outputs.get("moeshard")
    for name in runnable:
        row = rows[name]
        row["max_abs_diff_vs_moeshard"] = _max_all([(outputs[name] - ref).abs().max().item()])[0] if ref is not None else None
        dropped, routed = _sum_all([sum(d.dropped for d in _counters(systems[name])), sum(d.tokens for d in _counters(systems[name]))])
        row["dropped_pct"] = 100.0 * dropped / routed if routed else 0.0
    return [rows[n] for n in systems] if rank == 0 else []


def _imbalance(name: str, mlps, world: int) -> float:
    """Busiest worker's share of expert tokens over the ideal 1/world, worst layer (after one forward)."""
    if name in ("moeshard", "hf", "tp") or world == 1:
        return 1.0  # moeshard, tp: every worker computes 1/world of every token; hf: its own equal batch
    worst = 0.0
    for m in mlps.values():
        tokens_E = m.load.tokens_E
        owned = tokens_E.view(world, -1).sum(1)
        worst = max(worst, float(owned.max()) / max(1, int(tokens_E.sum())))
    return worst * world
