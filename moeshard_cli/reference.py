"""The oracle: transformers' own model of the family in one process, every expert whole, dropless.

Used by the tests and by `moeshard demo`. With the skewed router, transformers' router is given
the same token-to-expert assignment as the sharded run (same hash of seed, layer and token id),
so the two can be compared token for token. Lines are run one at a time: no padding at all.
"""

from __future__ import annotations

import torch

from moeshard_cli.model import read_rank_file
from moeshard_cli.moe.layer import skewed_routing, token_ids_for
from moeshard_cli.moe.routing import RouterSpec, route
from moeshard_cli.shard.manifest import ShardSet
from moeshard_cli.shard.plan import join_rank_parts


def reassemble_state(shards: ShardSet) -> dict[str, torch.Tensor]:
    """The full state dict from all rank files (rank 0's replicated weights, every expert joined), rank-file keys."""
    family = shards.family
    parts = [read_rank_file(shards, rank, torch.device("cpu")) for rank in range(shards.world_size)]
    full = parts[0]
    for key in full:
        if family.parse_expert_key(key):
            full[key] = join_rank_parts(family, key, [part[key] for part in parts if key in part])
    return full


def reference_model(shards: ShardSet):
    family = shards.family
    return family.oracle(family.config(shards.config), reassemble_state(shards))


def force_router(family, model, spec: RouterSpec, holder: dict) -> None:
    """Make every transformers router of `model` follow `spec`; `holder["ids"]` holds the batch's [B, S] token ids."""
    if spec.kind == "model":
        return
    if family.decoder:
        dims = family.dims(model.config)
        family.force_router(model, lambda layer, x_TD: skewed_routing(dims.top_k, dims.num_experts, spec, holder["ids"].reshape(-1), layer, x_TD.dtype))
    else:
        family.force_router(model, lambda layer, logits, dtype: route(logits, dtype, spec, holder["ids"].reshape(-1), layer))


@torch.inference_mode()
def reference_outputs(family, model, token_ids: list[list[int]], spec: RouterSpec = RouterSpec(), pooling: str = "mean") -> list[torch.Tensor]:
    """Per line, as `run` writes it: its pooled hidden state [d_model] (mean or last), every token's
    [n, d_model] (none), or its score [tokens, log-likelihood, mean negative log-likelihood] (score)."""
    holder: dict = {}
    force_router(family, model, spec, holder)
    out = []
    for i, row in enumerate(token_ids):
        holder["ids"] = token_ids_for([i], len(row))
        ids = torch.tensor([row])
        if pooling == "score":  # transformers' causal LM forward: its own logits (Granite's logits_scaling included)
            logits_SV = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
            logprob = torch.log_softmax(logits_SV[:-1], -1).gather(1, ids[0, 1:, None]).sum() if len(row) > 1 else torch.tensor(0.0)
            out.append(torch.tensor([len(row), logprob, -logprob / (len(row) - 1) if len(row) > 1 else float("nan")]))
        else:
            hidden_SD = family.hidden_states(model, ids, torch.ones_like(ids))[0].float()
            out.append({"mean": lambda h: h.mean(0), "last": lambda h: h[-1], "none": lambda h: h}[pooling](hidden_SD))
    return out
