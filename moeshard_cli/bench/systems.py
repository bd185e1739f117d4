"""The systems under test, each a dispatch (moe/dispatch.py) for the same `ShardedSparseMLP` shell.

Router, attention, data and threads are shared; only the way tokens reach the experts
and come back differs. A system that cannot run a configuration is a `Skip` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeshard_cli.bench.weights import SharedExperts
from moeshard_cli.moe.dispatch import Counted, ExpertParallelDispatch, ShardedDispatch
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.experts import GroupedExperts, SharedExpert, stack_experts
from moeshard_cli.shard.plan import slice_along, tensor_bounds

@dataclass
class Skip:
    reason: str


def paper_capacity_factor(num_experts: int) -> float:
    """The paper's DeepSpeed setting: min(E, 50)."""
    return float(min(num_experts, 50))


class SlicedExperts(nn.Module):
    """Whole experts held as the G rank slices of the bench's shared [G, E, D, F] layout: the
    slices' outputs add up to the experts' (the sharding rule, switch.py), so expert-parallel
    systems read the same bytes as MoEShard without a second copy of the weights."""

    def __init__(self, w_in_GEDH: torch.Tensor, w_out_GEFD: torch.Tensor, act: nn.Module, backend: str, biases=None):
        """`biases(g)`: slice g's (bias_in_EH, bias_out_ED) or (None, None); the output bias comes with slice 0 alone."""
        super().__init__()
        self.slices = nn.ModuleList(GroupedExperts(w_in, w_out, act, backend, *(biases(g) if biases else (None, None)))
                                    for g, (w_in, w_out) in enumerate(zip(w_in_GEDH, w_out_GEFD)))

    @property
    def num_experts(self) -> int:
        return self.slices[0].num_experts

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        out_ND = self.slices[0](x_ND, counts_E)
        for part in self.slices[1:]:
            out_ND += part(x_ND, counts_E)
        return out_ND


@dataclass
class SharedMLP:
    """One layer's shared expert (Qwen2-MoE, DeepSeek), whole, with the block's gate: MoEShard takes
    a rank's slice of it inside its exchange; the other systems run it whole on their own tokens."""

    inputs: list[torch.Tensor]
    output: torch.Tensor
    gate: object  # x_TD -> [T, 1], or None
    act: nn.Module
    backend: str

    def whole(self) -> SharedExpert:
        return SharedExpert(GroupedExperts(*stack_experts([self.inputs], [self.output]), self.act, self.backend), self.gate)

    def rank_slice(self, family, rank: int, world: int) -> SharedExpert:
        def cut(m, t):
            dim = family.sliced_dim(m)
            return slice_along(t, dim, *tensor_bounds(t.shape, dim, world)[rank])

        inputs = [cut(m, t) for m, t in zip(family.expert_inputs, self.inputs)]
        output = cut(family.expert_output, self.output)
        return SharedExpert(GroupedExperts(*stack_experts([inputs], [output]), self.act, self.backend), self.gate)


class TransformersExpertsDispatch(Counted):
    """transformers' own experts module of the family on this worker's tokens, with a full copy
    of every expert and no communication: plain data parallelism, dropless."""

    def __init__(self, family, config, shared: SharedExperts, layer: int, shared_mlp: SharedExpert | None = None):
        self.num_experts = family.dims(config).num_experts
        self.experts = family.transformers_experts(config, [shared.full_expert(layer, e) for e in range(self.num_experts)])
        self.shared_mlp = shared_mlp

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor):
        y_TD = self.experts(x_TD, ids_TK, weights_TK)
        if self.shared_mlp is not None:
            y_TD = y_TD + self.shared_mlp(x_TD).to(y_TD.dtype)
        self.count(x_TD.shape[0])
        return y_TD, torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)[None].cpu()


def build_dispatch(name: str, layer: int, family, config, shared: SharedExperts, comm: Collectives, timer, act, backend: str,
                   capacity_factor: float | None, free_bytes: int, shared_mlp: SharedMLP | None = None):
    dims = family.dims(config)
    E, G, r = dims.num_experts, comm.world, comm.rank
    if name == "moeshard":
        return ShardedDispatch(GroupedExperts(shared.w_in_GEDH[layer][r], shared.w_out_GEFD[layer][r], act, backend, *shared.biases(layer, r)),
                               comm, timer, shared_mlp.rank_slice(family, r, G) if shared_mlp else None)
    whole = shared_mlp.whole() if shared_mlp else None
    if name == "hf":
        need = shared.nbytes * G  # every worker holds a full copy of the experts
        if need > 0.8 * free_bytes:
            return Skip(f"needs a full copy of the experts per worker ({need / 2**30:.1f} GiB), {free_bytes / 2**30:.1f} GiB free")
        return TransformersExpertsDispatch(family, config, shared, layer, whole)
    if name.startswith("deepspeed") and shared_mlp is not None:
        return Skip(f"the bench's DeepSpeed-MoE layer has no shared-expert path ({family.name} adds one to every token)")
    if E % G:
        return Skip(f"E={E} is not divisible by {G} workers (whole experts per worker)")
    local = slice(r * E // G, (r + 1) * E // G)
    w_in_GLDH, w_out_GLFD = shared.w_in_GEDH[layer][:, local], shared.w_out_GEFD[layer][:, local]
    if name == "ep":
        return ExpertParallelDispatch(SlicedExperts(w_in_GLDH, w_out_GLFD, act, backend, lambda g: shared.biases(layer, g, local)), E, comm, timer,
                                      whole)
    if getattr(family, "expert_biases", ()):
        return Skip(f"DeepSpeed-MoE's experts have no biases and a plain or gate|up activation; {family.name}'s are biased, "
                    "with a clamped SwiGLU of interleaved columns")
    if dims.top_k > 2:
        return Skip(f"DeepSpeed-MoE's gates are top-1 and top-2; {family.name} routes top-{dims.top_k}")
    from moeshard_cli.bench.deepspeed_moe import DeepSpeedDispatch

    dropless = name == "deepspeed-dropless"
    cf = capacity_factor if capacity_factor is not None else paper_capacity_factor(E)
    return DeepSpeedDispatch(w_in_GLDH, w_out_GLFD, E, act, drop_tokens=not dropless, capacity_factor=cf, comm=comm, top_k=dims.top_k)
