"""The `tp` system of the bench: transformers' own tensor-parallel plan (`tp_plan="auto"`).

transformers slices every expert as MoEShard does (`packed_colwise` gate_up, `rowwise` down) and
shards attention heads too, but every rank processes every token of the step, with all-reduces
after the attention and the MoE block. So one forward here takes the whole step: all workers'
sequences, gathered, and each worker reports the rows of its own share, which must equal
MoEShard's. The skewed router is forced onto transformers' routers as in the oracle.

It loads a `save_pretrained` checkpoint: the source's own directory, or for built-ins and shard
sets one written once to shared memory by worker 0 (removed with the bench's other files).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moeshard_cli.moe.layer import skewed_routing, token_ids_for
from moeshard_cli.moe.routing import RouterSpec


class TensorParallelSystem:
    dropped = 0

    def __init__(self, source, checkpoint: Path, rank: int, world: int, device: torch.device):
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        self.family, self.rank, self.world, self.device = source.family, rank, world, device
        self.dims = source.dims
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint), distributed_config=DistributedConfig(tp_plan="auto"),
                                                          dtype=torch.float32).eval()
        self.spec, self.tokens, self._holder = RouterSpec(), 0, {}
        dims = self.dims
        self.family.force_router(self.model, lambda layer, x_TD: self._route(layer, x_TD, dims))

    def _route(self, layer: int, x_TD: torch.Tensor, dims):
        if self.spec.kind == "model":  # not used by the bench, whose router is always the skewed one
            raise RuntimeError("the bench forces the skewed router")
        return skewed_routing(dims.top_k, dims.num_experts, self.spec, self._holder["ids"].reshape(-1).to(x_TD.device), layer, x_TD.dtype)

    def set_inputs(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor) -> None:
        """Every worker's sequences, in rank order: the step transformers' plan runs on each worker."""
        B, S = ids_BS.shape
        self.batch = B
        gathered = [torch.empty_like(ids_BS) for _ in range(self.world)]
        dist.all_gather(gathered, ids_BS)
        self.ids = torch.cat(gathered)
        self.mask = torch.ones_like(self.ids) if bool(mask_BS.all()) else torch.cat(_all_gather(mask_BS, self.world))
        self._holder["ids"] = token_ids_for(list(range(self.world * B)), S).to(self.device)

    def forward(self) -> torch.Tensor:
        out = self.family.hidden_states(self.model, self.ids, self.mask)
        self.tokens += int(self.mask[self.rank * self.batch:(self.rank + 1) * self.batch].sum())
        return out[self.rank * self.batch:(self.rank + 1) * self.batch]

    def reset(self) -> None:
        self.tokens = 0


def _all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return out


def checkpoint_for(source, directory: Path, rank: int) -> Path:
    """The source's save_pretrained directory, or (built-ins, shard sets) one that worker 0 writes to `directory`."""
    if source.kind in ("local", "hub"):
        return Path(source.path)
    if rank == 0:
        state = {e.name: e.load() for e in source.tensors}
        model = source.family.oracle(source.config, state)
        model.save_pretrained(str(directory))
    dist.barrier()
    return directory
