"""Build the models the workers run: transformers' model of the family, its MoE modules swapped afterwards.

The model code stays transformers' own (attention, position embeddings, norms, residuals, and
for the top-k families the router); the distributed part is applied by `install_moe`, a small
plain function in the spirit of gpt-fast's tp.py. Everything is built on the meta device and then assigned real tensors, so
full expert weights are never allocated. `run` builds from one rank file; `bench` builds the
same shell from a checkpoint's replicated weights and gives each system its own MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeshard_cli.dtypes import DTYPES
from moeshard_cli.families import SHARED_EXPERT
from moeshard_cli.moe.dispatch import ShardedDispatch
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.experts import GroupedExperts, SharedExpert, resolve_backend, stack_experts
from moeshard_cli.moe.layer import ShardedExperts, ShardedSparseMLP, TokenContext
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.shard.manifest import ShardSet


def install_moe(family, model, make_moe: Callable[[int], nn.Module]) -> list[int]:
    """Put `make_moe(layer)` in place of transformers' MoE module of every MoE layer; returns the layers."""
    layers = family.moe_layers(model)
    for i in layers:
        family.install(model, i, make_moe(i))
    return layers


def split_shared_weights(family, state: dict[str, torch.Tensor]) -> dict[int, tuple[list, torch.Tensor]]:
    """Pop each layer's shared expert (Qwen2-MoE, DeepSeek) out of a state dict: {layer: ([input matrices], output)}."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key in list(state):
        if (parsed := family.parse_expert_key(key)) and parsed[1] == SHARED_EXPERT:
            found.setdefault(parsed[0], {})[parsed[2]] = state.pop(key)
    return {layer: ([mats[m] for m in family.expert_inputs], mats[family.expert_output]) for layer, mats in found.items()}


def split_expert_weights(family, state: dict[str, torch.Tensor]) -> dict[int, dict[str, list[torch.Tensor]]]:
    """Pop the per-expert slices out of a state dict: {layer: {matrix: [one tensor per expert]}}."""
    found: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for key in list(state):
        if parsed := family.parse_expert_key(key):
            layer, expert, matrix = parsed
            found.setdefault(layer, {}).setdefault(matrix, {})[expert] = state.pop(key)
    return {layer: {m: [by_expert[e] for e in sorted(by_expert)] for m, by_expert in mats.items()} for layer, mats in found.items()}


def assign_weights(family, model, state: dict[str, torch.Tensor]) -> None:
    """Assign replicated weights onto the meta model, re-tie embeddings, and check nothing is left on meta."""
    result = model.load_state_dict(state, strict=False, assign=True)
    family.tie(model)
    family.rebuild_buffers(model, next(iter(state.values())).device)
    missing = [k for k in result.missing_keys if k not in family.untied_missing()]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights do not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    for router in (m for n, m in model.named_modules() if n.endswith("router.classifier")):
        router.float()  # transformers computes Switch's router logits in float32
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"tensors left unallocated: {on_meta[:3]}")


def read_rank_file(shards: ShardSet, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Only this rank's file, a tensor at a time into memory this process owns, then to the device."""
    from moeshard_cli.shard.sources import safetensors_entries  # imports transformers: not in the launcher

    return {k: entry.load().to(device) for k, entry in safetensors_entries(shards.rank_file(rank)).items()}


def sharded_experts(family, config, mats: dict[str, list[torch.Tensor]], backend: str) -> GroupedExperts:
    """One layer's slices of every expert, stacked for grouped matmuls (the per-expert copies can go).
    A family with biases or another layout (GPT-OSS) stacks its own (`grouped_experts`)."""
    if hasattr(family, "grouped_experts"):
        return family.grouped_experts(config, mats, backend)
    inputs_E = [list(mats_e) for mats_e in zip(*(mats[m] for m in family.expert_inputs))]
    return GroupedExperts(*stack_experts(inputs_E, mats[family.expert_output]), family.act(config), backend)


def shared_expert(family, config, model, layer: int, weights: tuple | None, backend: str) -> SharedExpert | None:
    """One layer's (slice of the) shared expert with the block's gate, or None where the family has none."""
    if weights is None:
        return None
    inputs, output = weights
    return SharedExpert(GroupedExperts(*stack_experts([inputs], [output]), family.act(config), backend), family.shared_gate_fn(model, layer))


@dataclass
class ShardedModel:
    """What a run worker drives: the model, the per-batch token context its MoE layers share, and them."""

    family: object
    model: nn.Module
    ctx: TokenContext
    mlps: dict[int, nn.Module] = field(default_factory=dict)
    backend: str = "grouped_mm"
    pad_id: int = 0

    def hidden_states(self, ids, mask) -> torch.Tensor:
        return self.family.hidden_states(self.model, ids, mask)


def moe_module(family, config, dispatch, router: RouterSpec, ctx: TokenContext, layer: int) -> nn.Module:
    """moeshard's module for one MoE layer: Switch's whole sparse MLP, or a top-k family's experts."""
    if family.decoder:
        return ShardedExperts(dispatch, router, ctx, layer)
    dims = family.dims(config)
    return ShardedSparseMLP(dims.d_model, dims.num_experts, config.router_bias, dispatch, router, ctx, layer)


def sharded_model(shards: ShardSet, rank: int, device: torch.device, backend: str, router: RouterSpec,
                  comm: Collectives, timer: SectionTimer, attention: str = "eager") -> ShardedModel:
    """transformers' model of the shard set's family, a MoEShard module in every MoE layer, from rank `rank`'s file."""
    family = shards.family
    config = family.config(shards.config)
    backend = resolve_backend(backend, device, family.dims(config).d_model, DTYPES[shards.dtype])
    ctx, mlps = TokenContext(), {}
    model = family.meta_model(config)
    state = read_rank_file(shards, rank, device)
    shared = split_shared_weights(family, state)  # first: split_expert_weights takes every expert key left
    experts = split_expert_weights(family, state)

    def make(layer):  # each layer's per-expert copies go as it is stacked
        dispatch = ShardedDispatch(sharded_experts(family, config, experts.pop(layer), backend), comm, timer,
                                   shared_expert(family, config, model, layer, shared.pop(layer, None), backend))
        mlps[layer] = moe_module(family, config, dispatch, router, ctx, layer)
        return mlps[layer]

    install_moe(family, model, make)
    assign_weights(family, model, state)
    use_attention(family, model, attention)
    return ShardedModel(family, model, ctx, mlps, backend, family.pad_id(config))


# ---------------------------------------------------------------- attention

_FUSED = "moeshard_fused"  # a name without "sdpa": transformers refuses sdpa for Switch, which has no support flag


def use_attention(family, model, name: str) -> None:
    """eager: transformers' own attention. fused: for Switch, the same through torch's
    scaled_dot_product_attention, T5's position bias and the padding mask passed as one additive
    mask (fused kernels on GPUs); for the decoder families, transformers' own "sdpa"."""
    if name == "fused" and family.decoder:
        model.set_attn_implementation("sdpa")
    elif name == "fused":
        from transformers import AttentionInterface

        AttentionInterface.register(_FUSED, fused_attention)
        model.set_attn_implementation(_FUSED)


def fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """transformers' eager_attention_forward for T5 (scores + position bias + mask, softmax, values) in one call."""
    bias = position_bias if attention_mask is None else attention_mask if position_bias is None else position_bias + attention_mask
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None if bias is None else bias.to(query.dtype),
                                         dropout_p=dropout, scale=scaling if scaling is not None else query.size(-1) ** -0.5)
    return out.transpose(1, 2).contiguous(), None


def build_shell(family, config, replicated: dict[str, torch.Tensor], make_moe: Callable[[int], nn.Module], device: torch.device):
    """The model around the experts (attention, norms, embeddings, routers) with `make_moe(layer)`
    in every MoE layer; the bench swaps each module's dispatch per system."""
    model = family.meta_model(config)
    layers = install_moe(family, model, make_moe)
    assign_weights(family, model, replicated)
    return model.to(device), layers
