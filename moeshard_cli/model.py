"""Build the encoders the workers run: transformers' model, its sparse MLPs swapped afterwards.

The model code stays transformers' own (attention, position bias, norms, residuals); the
distributed part is applied by `install_moe`, a small plain function in the spirit of
gpt-fast's tp.py. Everything is built on the meta device and then assigned real tensors, so
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
from moeshard_cli.moe.dispatch import ShardedDispatch
from moeshard_cli.moe.exchange import Collectives
from moeshard_cli.moe.experts import GroupedExperts, resolve_backend, stack_experts
from moeshard_cli.moe.layer import ShardedSparseMLP, TokenContext
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.moe.timing import SectionTimer
from moeshard_cli.shard.manifest import ShardSet
from moeshard_cli.switch import ENCODER_EMBED_KEY, meta_encoder, parse_expert_key, set_sparse_mlp, sparse_layers, switch_config, tie_embeddings


def install_moe(model, make_mlp: Callable[[int], nn.Module]) -> list[int]:
    """Replace every sparse MLP of the encoder by `make_mlp(block_index)`; returns the indices."""
    layers = sparse_layers(model)
    for i in layers:
        set_sparse_mlp(model, i, make_mlp(i))
    return layers


def split_expert_weights(state: dict[str, torch.Tensor]) -> dict[int, tuple[list, list]]:
    """Pop the per-expert wi/wo slices out of a state dict: {layer: ([wi_e...], [wo_e...])}."""
    found: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for key in list(state):
        if parsed := parse_expert_key(key):
            layer, expert, matrix = parsed
            found.setdefault(layer, {"wi": {}, "wo": {}})[matrix][expert] = state.pop(key)
    return {layer: ([m["wi"][e] for e in sorted(m["wi"])], [m["wo"][e] for e in sorted(m["wo"])]) for layer, m in found.items()}


def assign_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Assign replicated weights onto the meta model, re-tie the embedding, and check nothing is left on meta."""
    result = model.load_state_dict(state, strict=False, assign=True)
    tie_embeddings(model)
    missing = [k for k in result.missing_keys if k != ENCODER_EMBED_KEY]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights do not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    for router in (m for n, m in model.named_modules() if n.endswith("router.classifier")):
        router.float()  # transformers computes router logits in float32
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"tensors left unallocated: {on_meta[:3]}")


def read_rank_file(shards: ShardSet, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Only this rank's file, a tensor at a time into memory this process owns, then to the device."""
    from moeshard_cli.shard.sources import safetensors_entries  # imports transformers: not in the launcher

    return {k: entry.load().to(device) for k, entry in safetensors_entries(shards.rank_file(rank)).items()}


def build_sharded_encoder(shards: ShardSet, rank: int, device: torch.device, make_mlp):
    """`make_mlp(layer, config, w_in_EDF, w_out_EFD)` builds each layer's sharded MLP from this rank's slices."""
    config = switch_config(shards.config)
    model = meta_encoder(config)
    state = read_rank_file(shards, rank, device)
    experts = split_expert_weights(state)
    layers = install_moe(model, lambda i: make_mlp(i, config, *stack_experts(*experts.pop(i))))  # per-expert copies go as each layer is stacked
    assign_weights(model, state)
    return model, layers


@dataclass
class ShardedEncoder:
    """What a run worker drives: the model, the per-batch token context its MoE layers share, and them."""

    model: nn.Module
    ctx: TokenContext
    mlps: dict[int, ShardedSparseMLP] = field(default_factory=dict)
    backend: str = "grouped_mm"
    pad_id: int = 0


def sharded_encoder(shards: ShardSet, rank: int, device: torch.device, backend: str, router: RouterSpec,
                    comm: Collectives, timer: SectionTimer, attention: str = "eager") -> ShardedEncoder:
    """transformers' encoder with a MoEShard `ShardedSparseMLP` in every sparse block, from rank `rank`'s file."""
    from transformers.activations import ACT2FN

    config = switch_config(shards.config)
    backend = resolve_backend(backend, device, config.d_model, DTYPES[shards.dtype])
    ctx, mlps = TokenContext(), {}

    def make(layer, _config, w_in_EDF, w_out_EFD):
        dispatch = ShardedDispatch(GroupedExperts(w_in_EDF, w_out_EFD, ACT2FN[config.dense_act_fn], backend), comm, timer)
        mlps[layer] = ShardedSparseMLP(config.d_model, config.num_experts, config.router_bias, dispatch, router, ctx, layer)
        return mlps[layer]

    model, _ = build_sharded_encoder(shards, rank, device, make)
    use_attention(model, attention)
    return ShardedEncoder(model, ctx, mlps, backend, config.pad_token_id or 0)


# ---------------------------------------------------------------- attention

ATTENTIONS = ("eager", "fused")
_FUSED = "moeshard_fused"  # a name without "sdpa": transformers refuses sdpa for Switch, which has no support flag


def check_attention(name: str) -> None:
    if name not in ATTENTIONS:
        raise ValueError(f"{name} is unknown")


def use_attention(model, name: str) -> None:
    """eager: transformers' own attention. fused: the same through torch's scaled_dot_product_attention,
    T5's position bias and the padding mask passed as one additive mask (fused kernels on GPUs)."""
    if name == "fused":
        from transformers import AttentionInterface

        AttentionInterface.register(_FUSED, fused_attention)
        model.set_attn_implementation(_FUSED)


def fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """transformers' eager_attention_forward for T5 (scores + position bias + mask, softmax, values) in one call."""
    bias = position_bias if attention_mask is None else attention_mask if position_bias is None else position_bias + attention_mask
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=None if bias is None else bias.to(query.dtype),
                                         dropout_p=dropout, scale=scaling if scaling is not None else query.size(-1) ** -0.5)
    return out.transpose(1, 2).contiguous(), None


def build_shell(config, replicated: dict[str, torch.Tensor], make_mlp: Callable[[int], nn.Module], device: torch.device):
    """The encoder around the experts (attention, norms, embeddings, routers) with `make_mlp(layer)`
    in every sparse block; the bench swaps each MLP's dispatch per system."""
    model = meta_encoder(config)
    layers = install_moe(model, make_mlp)
    assign_weights(model, replicated)
    return model.to(device), layers
