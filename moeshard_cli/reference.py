"""The oracle: transformers' own SwitchTransformersEncoderModel in one process, dropless.

Used by the tests, by `moeshard demo` and by the bench's `hf` system. With the skewed
router, transformers' router is given the same token-to-expert assignment as the sharded
run (same hash of seed, layer and token id), so the two can be compared token for token.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F

from moeshard_cli.model import read_rank_file
from moeshard_cli.moe.layer import token_ids_for
from moeshard_cli.moe.routing import RouterSpec, route
from moeshard_cli.shard.manifest import ShardSet
from moeshard_cli.switch import join_expert, meta_encoder, parse_expert_key, sparse_layers, sparse_mlp, tie_embeddings

def reassemble_state(shards: ShardSet) -> dict[str, torch.Tensor]:
    """The full encoder state dict from all rank files (rank 0's replicated weights, every expert joined)."""
    parts = [read_rank_file(shards, rank, torch.device("cpu")) for rank in range(shards.world_size)]
    full = parts[0]
    for key in full:
        if parsed := parse_expert_key(key):
            full[key] = join_expert(parsed[2], [part[key] for part in parts])
    return full


def reference_encoder(config, state: dict[str, torch.Tensor]):
    """transformers' own encoder in one process, made dropless (capacity >= any sequence)."""
    model = meta_encoder(config)
    model.load_state_dict(state, strict=False, assign=True)
    tie_embeddings(model)
    for i in sparse_layers(model):
        sparse_mlp(model, i).router.expert_capacity = 10**9
    return model.eval()


def force_router(model, spec: RouterSpec, holder: dict) -> None:
    """Make every transformers router of `model` follow `spec`; `holder["ids"]` holds the batch's [B, S] token ids."""
    if spec.kind == "model":
        return
    for layer in sparse_layers(model):
        router = sparse_mlp(model, layer).router

        def forward(self, hidden_BSD, layer=layer):
            B, S, _ = hidden_BSD.shape
            logits = self.classifier.float()(hidden_BSD.to(torch.float32)).view(B * S, -1)
            expert_T, prob_T = route(logits, hidden_BSD.dtype, spec, holder["ids"].reshape(-1), layer)
            one_hot = F.one_hot(expert_T, self.num_experts).view(B, S, -1)
            return one_hot, prob_T.view(B, S, 1), logits.view(B, S, -1)

        router.forward = MethodType(forward, router)


@torch.inference_mode()
def reference_embeddings(model, token_ids: list[list[int]], spec: RouterSpec = RouterSpec(), pooling: str = "mean") -> list[torch.Tensor]:
    """Per line, its mean embedding [d_model] (or its hidden states [n, d_model]), one line at a time."""
    holder: dict = {}
    force_router(model, spec, holder)
    out = []
    for i, row in enumerate(token_ids):
        holder["ids"] = token_ids_for([i], len(row))
        hidden_SD = model(input_ids=torch.tensor([row])).last_hidden_state[0].float()
        out.append(hidden_SD.mean(0) if pooling == "mean" else hidden_SD)
    return out
