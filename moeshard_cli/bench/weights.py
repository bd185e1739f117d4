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
from moeshard_cli.shard.plan import join_slices, rank_cut, slice_along

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def input_blocks(family) -> int:
    """How many W-wide blocks of columns an expert's input takes: 1 (Switch's wi), 2 (gate and up side
    by side, or GPT-OSS's gate_up, whose slice of width w is 2w interleaved columns)."""
    return sum(getattr(family, "slice_steps", {}).get(m, 1) for m in family.expert_inputs)


def _layer_elements(family, G: int, E: int, D: int, W: int) -> int:
    n = input_blocks(family)
    biases = G * E * n * W + E * D if getattr(family, "expert_biases", ()) else 0  # bias_in_GEH, bias_out_ED
    return (n + 1) * G * E * D * W + biases


class SharedExperts:
    """`w_in_GEDH`, `w_out_GEFD` per layer; for a family with expert biases (GPT-OSS) also `bias_in_GEH`
    (sliced as w_in's columns) and `bias_out_ED` (whole: the rank or slice 0 adds it, `biases`)."""

    def __init__(self, path: Path, family, layers: list[int], num_experts: int, d_model: int, bounds: list[tuple[int, int]],
                 dtype: torch.dtype):
        self.path, self.family, self.layers, self.bounds = path, family, layers, bounds
        G, E, D, n = len(bounds), num_experts, d_model, input_blocks(family)
        self.width = W = padded_width(max(hi - lo for lo, hi in bounds), dtype)
        per_layer = _layer_elements(family, G, E, D, W)
        self.nbytes = len(layers) * per_layer * dtype.itemsize
        if not path.exists():
            raise FileNotFoundError(path)
        flat = torch.from_file(str(path), shared=True, size=len(layers) * per_layer, dtype=dtype)
        self.w_in_GEDH, self.w_out_GEFD, self.bias_in_GEH, self.bias_out_ED = {}, {}, {}, {}
        for i, layer in enumerate(layers):
            parts = flat[i * per_layer:(i + 1) * per_layer].split([G * E * D * n * W, G * E * W * D, per_layer - (n + 1) * G * E * D * W])
            self.w_in_GEDH[layer] = parts[0].view(G, E, D, n * W)
            self.w_out_GEFD[layer] = parts[1].view(G, E, W, D)
            if getattr(family, "expert_biases", ()):
                self.bias_in_GEH[layer], self.bias_out_ED[layer] = parts[2].split([G * E * n * W, E * D])
                self.bias_in_GEH[layer], self.bias_out_ED[layer] = self.bias_in_GEH[layer].view(G, E, n * W), self.bias_out_ED[layer].view(E, D)

    def biases(self, layer: int, g: int, experts: slice = slice(None)) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bias_in_EH, bias_out_ED) of slice g of `experts`: the output bias on slice 0 only, as the slices' outputs are summed."""
        if layer not in self.bias_in_GEH:
            return None, None
        return self.bias_in_GEH[layer][g, experts], self.bias_out_ED[layer][experts] if g == 0 else None

    @staticmethod
    def create(path: Path, nbytes: int) -> None:
        """A zero-filled file: padded columns stay zero and add nothing."""
        with open(path, "wb") as f:
            f.truncate(nbytes)

    @staticmethod
    def size_for(family, layers: int, num_experts: int, d_model: int, bounds, dtype: torch.dtype) -> int:
        return layers * _layer_elements(family, len(bounds), num_experts, d_model, padded_width(max(hi - lo for lo, hi in bounds), dtype)) * dtype.itemsize

    def _columns(self):
        """Per input matrix: (name, first column, its step): where its slice of width w sits in w_in's H."""
        family, start, out = self.family, 0, []
        for m in family.expert_inputs:
            step = getattr(family, "slice_steps", {}).get(m, 1)
            out.append((m, start, step))
            start += step * self.width
        return out

    def fill(self, source: Source, rank: int, world: int) -> None:
        """Worker `rank` loads experts e with e % world == rank and writes all their slices.
        An input matrix sliced along its rows ([F, D], nn.Linear's) is stored transposed; GPT-OSS's [D, 2F] as it is."""
        entries, family = {e.name: e for e in source.tensors}, self.family
        bias_in, bias_out = getattr(family, "expert_biases", ()) or (None, None)
        for layer in self.layers:
            for e in range(rank, self.w_in_GEDH[layer].shape[1], world):
                full = {m: entries[family.expert_key(layer, e, m)].load() for m in (*family.expert_inputs, family.expert_output)}
                if bias_in:
                    full[bias_in] = entries[family.expert_key(layer, e, bias_in)].load()
                    self.bias_out_ED[layer][e] = entries[family.expert_key(layer, e, bias_out)].load()
                for g, (lo, hi) in enumerate(self.bounds):
                    for m, start, step in self._columns():
                        part = self._cut(layer, e, m, lo, hi, full[m])
                        self.w_in_GEDH[layer][g, e, :, start:start + step * (hi - lo)] = part.T if family.sliced_dim(m) == 0 else part
                        if bias_in:
                            self.bias_in_GEH[layer][g, e, start:start + step * (hi - lo)] = self._cut(layer, e, bias_in, lo, hi, full[bias_in])
                    out = self._cut(layer, e, family.expert_output, lo, hi, full[family.expert_output])
                    self.w_out_GEFD[layer][g, e, : hi - lo, :] = out.T if family.sliced_dim(family.expert_output) == 1 else out

    def _cut(self, layer, e, matrix, lo, hi, tensor):
        return slice_along(tensor, *rank_cut(self.family, self.family.expert_key(layer, e, matrix), lo, hi))

    def full_expert(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """{matrix: full weight} in transformers' per-expert layout, concatenated from the slices (copies)."""
        family, bounds = self.family, self.bounds
        full = {}
        for m, start, step in self._columns():
            parts = [self.w_in_GEDH[layer][g, e, :, start:start + step * (hi - lo)] for g, (lo, hi) in enumerate(bounds)]
            full[m] = join_slices([p.T for p in parts], 0) if family.sliced_dim(m) == 0 else join_slices(parts, 1)
            if layer in self.bias_in_GEH:
                full[family.expert_biases[0]] = join_slices([self.bias_in_GEH[layer][g, e, start:start + step * (hi - lo)] for g, (lo, hi) in enumerate(bounds)], 0)
        outs = [self.w_out_GEFD[layer][g, e, : hi - lo, :] for g, (lo, hi) in enumerate(bounds)]
        full[family.expert_output] = join_slices([p.T for p in outs], 1) if family.sliced_dim(family.expert_output) == 1 else join_slices(outs, 0)
        if layer in self.bias_out_ED:
            full[family.expert_biases[1]] = self.bias_out_ED[layer][e].clone()
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


