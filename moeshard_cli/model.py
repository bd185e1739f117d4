"""Build the encoder a worker runs: transformers' model, its sparse MLPs swapped afterwards.

The model code stays transformers' own (attention, position bias, norms, residuals); the
distributed part is applied by `install_moe`, a small plain function in the spirit of
gpt-fast's tp.py. Everything is built on the meta device and then assigned the tensors of
one rank file, so full expert weights are never allocated.
"""

from __future__ import annotations


from typing import Callable

import torch
from safetensors import safe_open
from torch import nn
from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

from moeshard_cli.manifest import ShardSet
from moeshard_cli.moe.experts import stack_experts
from moeshard_cli.plan import EXPERT_KEY

def switch_config(config: dict | SwitchTransformersConfig) -> SwitchTransformersConfig:
    return config if isinstance(config, SwitchTransformersConfig) else SwitchTransformersConfig.from_dict(dict(config))


def meta_encoder(config: SwitchTransformersConfig) -> SwitchTransformersEncoderModel:
    with torch.device("meta"):
        model = SwitchTransformersEncoderModel(config)
    return model.eval()


def sparse_layers(model: SwitchTransformersEncoderModel) -> list[int]:
    return [i for i, block in enumerate(model.encoder.block) if isinstance(block.layer[-1].mlp, SwitchTransformersSparseMLP)]


def install_moe(model: SwitchTransformersEncoderModel, make_mlp: Callable[[int], nn.Module]) -> list[int]:
    """Replace every sparse MLP of the encoder by `make_mlp(block_index)`; returns the indices."""
    layers = sparse_layers(model)
    for i in layers:
        model.encoder.block[i].layer[-1].mlp = make_mlp(i)
    return layers


def split_expert_weights(state: dict[str, torch.Tensor]) -> dict[int, tuple[list, list]]:
    """Pop the per-expert wi/wo slices out of a state dict: {layer: ([wi_e...], [wo_e...])}."""
    found: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for key in [k for k in state if EXPERT_KEY.match(k)]:
        layer, expert, matrix = EXPERT_KEY.match(key).groups()
        found.setdefault(int(layer), {"wi": {}, "wo": {}})[matrix][int(expert)] = state.pop(key)
    return {layer: ([m["wi"][e] for e in sorted(m["wi"])], [m["wo"][e] for e in sorted(m["wo"])]) for layer, m in found.items()}


def assign_weights(model: SwitchTransformersEncoderModel, state: dict[str, torch.Tensor]) -> None:
    """Assign replicated weights onto the meta model, re-tie the embedding, and check nothing is left on meta."""
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k != "encoder.embed_tokens.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"rank file does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.encoder.embed_tokens.weight = model.shared.weight
    for router in (m for n, m in model.named_modules() if n.endswith("router.classifier")):
        router.float()  # transformers computes router logits in float32
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"tensors left unallocated: {on_meta[:3]}")


def read_rank_file(shards: ShardSet, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Only this rank's file, loaded straight to the target device."""
    with safe_open(str(shards.rank_file(rank)), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def build_sharded_encoder(shards: ShardSet, rank: int, device: torch.device, make_mlp) -> tuple[SwitchTransformersEncoderModel, list[int]]:
    """`make_mlp(layer, config, w_in_EDF, w_out_EFD)` builds each layer's sharded MLP."""
    config = switch_config(shards.config)
    model = meta_encoder(config)
    state = read_rank_file(shards, rank, device)
    experts = split_expert_weights(state)
    layers = install_moe(model, lambda i: make_mlp(i, config, *stack_experts(*experts[i])))
    assign_weights(model, state)
    return model, layers


def reassemble_state(shards: ShardSet) -> dict[str, torch.Tensor]:
    """The full encoder state dict from all rank files (rank 0's replicated weights)."""
    full = read_rank_file(shards, 0, torch.device("cpu"))
    for rank in range(1, shards.world_size):
        part = read_rank_file(shards, rank, torch.device("cpu"))
        for key in [k for k in part if EXPERT_KEY.match(k)]:
            dim = 0 if key.endswith("wi.weight") else 1
            full[key] = torch.cat([full[key], part[key]], dim=dim)
    return full


def reference_encoder(config: SwitchTransformersConfig, state: dict[str, torch.Tensor]) -> SwitchTransformersEncoderModel:
    """transformers' own encoder in one process, made dropless (capacity >= any sequence)."""
    model = meta_encoder(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight
    for i in sparse_layers(model):
        model.encoder.block[i].layer[-1].mlp.router.expert_capacity = 10**9
    return model.eval()
