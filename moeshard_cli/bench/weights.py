"""One copy of every expert for all benchmarked systems, in a shared-memory file.

The systems under test partition the same experts differently: MoEShard by d_ff slices,
expert parallelism (and DeepSpeed) by whole experts. Holding both layouts would need twice
the expert bytes (29 GB at E=128 in fp32, more than this machine has), so every worker maps
one file in /dev/shm laid out as `w_in_GEDH` [G, E, d_model, H] and `w_out_GEFD`
[G, E, F, d_model], G = number of workers, F = the (padded) slice width, H = F, or 2F for a
gated family's gate and up blocks (moe/experts.stack_experts' layout). MoEShard rank g
uses `[g]`, contiguous; an expert-parallel rank uses `[:, its experts]`, G contiguous
slices whose outputs add up (measured as fast as one full-width matmul). Workers fill
disjoint experts in parallel.
"""

from __future__ import annotations


import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from moeshard_cli.shard.sources import Source
from moeshard_cli.errors import UserError
from moeshard_cli.launch import process_alive
from moeshard_cli.moe.experts import padded_width
from moeshard_cli.shard.plan import join_slices, slice_along

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


class SharedExperts:
    def __init__(self, path: Path, family, layers: list[int], num_experts: int, d_model: int, bounds: list[tuple[int, int]],
                 dtype: torch.dtype):
        self.path, self.family, self.layers, self.bounds = path, family, layers, bounds
        G, E, D, n = len(bounds), num_experts, d_model, len(family.expert_inputs)
        self.width = padded_width(max(hi - lo for lo, hi in bounds), dtype)
        per_out = G * E * D * self.width
        per_layer = (n + 1) * per_out
        self.nbytes = len(layers) * per_layer * dtype.itemsize
        if not path.exists():
            raise FileNotFoundError(path)
        flat = torch.from_file(str(path), shared=True, size=len(layers) * per_layer, dtype=dtype)
        self.w_in_GEDH, self.w_out_GEFD = {}, {}
        for i, layer in enumerate(layers):
            base = i * per_layer
            self.w_in_GEDH[layer] = flat[base : base + n * per_out].view(G, E, D, n * self.width)
            self.w_out_GEFD[layer] = flat[base + n * per_out : base + per_layer].view(G, E, self.width, D)

    @staticmethod
    def create(path: Path, nbytes: int) -> None:
        """A zero-filled file: padded columns stay zero and add nothing."""
        with open(path, "wb") as f:
            f.truncate(nbytes)

    @staticmethod
    def size_for(family, layers: int, num_experts: int, d_model: int, bounds, dtype: torch.dtype) -> int:
        matrices = len(family.expert_inputs) + 1
        return matrices * layers * len(bounds) * num_experts * d_model * padded_width(max(hi - lo for lo, hi in bounds), dtype) * dtype.itemsize

    def fill(self, source: Source, rank: int, world: int) -> None:
        """Worker `rank` loads experts e with e % world == rank and writes all their slices."""
        entries, family, W = {e.name: e for e in source.tensors}, self.family, self.width
        for layer in self.layers:
            for e in range(rank, self.w_in_GEDH[layer].shape[1], world):
                inputs = [entries[family.expert_key(layer, e, m)].load() for m in family.expert_inputs]
                out = entries[family.expert_key(layer, e, family.expert_output)].load()
                for g, (lo, hi) in enumerate(self.bounds):
                    for j, (m, full) in enumerate(zip(family.expert_inputs, inputs)):
                        self.w_in_GEDH[layer][g, e, :, j * W : j * W + hi - lo] = slice_along(full, family.sliced_dim(m), lo, hi).T
                    self.w_out_GEFD[layer][g, e, : hi - lo, :] = slice_along(out, family.sliced_dim(family.expert_output), lo, hi).T

    def full_expert(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """{matrix: full weight} in transformers' per-expert layout, concatenated from the slices (copies)."""
        family, W = self.family, self.width
        full = {m: join_slices([self.w_in_GEDH[layer][g, e, :, j * W : j * W + hi - lo].T for g, (lo, hi) in enumerate(self.bounds)],
                               family.sliced_dim(m)) for j, m in enumerate(family.expert_inputs)}
        full[family.expert_output] = join_slices([self.w_out_GEFD[layer][g, e, : hi - lo, :].T for g, (lo, hi) in enumerate(self.bounds)],
                                                 family.sliced_dim(family.expert_output))
        return full


def new_run_id() -> str:
    """Names this bench's shared files; the launcher's pid in it tells a later bench whether they are orphans."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:6]}"


def shm_path(run_id: str, num_experts: int) -> Path:
    return SHM_DIR / f"moeshard-bench-{run_id}-E{num_experts}.bin"


def remove_run_files(run_id: str) -> None:
    for p in SHM_DIR.glob(f"moeshard-bench-{run_id}-*.bin"):
        p.unlink(missing_ok=True)


def reclaim_orphans() -> list[Path]:
    """Remove the shared experts of benches whose launcher is gone (a SIGKILLed bench leaves ~1 GB behind)."""
    removed = []
    for p in SHM_DIR.glob("moeshard-bench-*-*.bin"):
        m = re.match(r"moeshard-bench-(\d+)-", p.name)
        if m and not process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_room(needs: dict[str, int]) -> None:
    """Every model whose experts fit in memory must also fit in SHM_DIR (Docker gives /dev/shm 64 MiB by
    default); past that a worker dies of SIGBUS mid-sweep. Models too large for memory are skipped later."""
    free = shutil.disk_usage(SHM_DIR).free
    ram = available_memory()
    for name, need in needs.items():
        if need <= 0.85 * ram and need > free:
            raise UserError(f"bench needs {need / 2**30:.1f} GiB in {SHM_DIR} for the experts of {name}, it has {free / 2**30:.1f} GiB free",
                            f"give it more room (e.g. docker run --shm-size={-(-need // 2**30) + 1}g, or mount -o remount,size=... {SHM_DIR}) or bench fewer experts")


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


