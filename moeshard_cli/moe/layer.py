"""moeshard's modules in transformers' models: they route only real tokens and call a dispatch.

- `ShardedSparseMLP` replaces transformers' `SwitchTransformersSparseMLP` (router included):
  [B, S, d_model] in and out, expert output scaled by the top-1 router probability; the
  residual is added by transformers' own `SwitchTransformersLayerFF` around it.
- `ShardedExperts` replaces the `experts` module of a top-k family (families/gated.py): the
  same call as transformers' experts, `(hidden_states [N, D], top_k_index [N, K],
  top_k_weights [N, K]) -> [N, D]`, behind transformers' own router.

Padding positions are never sent or computed and get a zero output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeshard_cli.moe.routing import RouterSpec, route, skewed_experts


POSITION_BITS = 20  # token id = line index << POSITION_BITS | position: the skewed router's key


def token_ids_for(lines: list[int], width: int) -> torch.Tensor:
    """Global token ids [B, S] of a batch of line indices padded to `width`."""
    return (torch.tensor(lines, dtype=torch.long)[:, None] << POSITION_BITS) + torch.arange(width)[None, :]


@dataclass
class TokenContext:
    """Which positions of the current batch are real tokens, and their global ids.

    Set once per batch by whoever runs the encoder; shared by all MoE layers, so the
    boolean mask is turned into indices (a device sync) once per batch, not once per layer.
    """

    real_index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    token_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def set_batch(self, attention_mask_BS: torch.Tensor, token_ids_BS: torch.Tensor) -> None:
        self.real_index = attention_mask_BS.reshape(-1).nonzero().squeeze(1)
        self.token_ids = token_ids_BS.reshape(-1)[self.real_index]

    def scatter(self, y_TD: torch.Tensor, like_ND: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows back in place among all positions; zeros at padding."""
        out_ND = torch.zeros_like(like_ND)
        out_ND.index_copy_(0, self.real_index, y_TD.to(like_ND.dtype))
        return out_ND


@dataclass
class LayerLoad:
    """Tokens per expert and per worker seen by one MoE layer, summed over batches."""

    tokens_E: torch.Tensor | None = None
    tokens_G: torch.Tensor | None = None

    def reset(self) -> None:
        self.tokens_E = self.tokens_G = None

    def add(self, counts_GE: torch.Tensor) -> None:
        counts_GE = counts_GE.to(torch.long)
        if self.tokens_E is None:
            self.tokens_E, self.tokens_G = counts_GE.sum(0), counts_GE.sum(1)
        else:
            self.tokens_E += counts_GE.sum(0)
            self.tokens_G += counts_GE.sum(1)


class ShardedSparseMLP(nn.Module):
    def __init__(self, d_model: int, num_experts: int, router_bias: bool, dispatch, spec: RouterSpec,
                 ctx: TokenContext, layer_idx: int):
        super().__init__()
        self.router = nn.Module()  # keeps transformers' key name: ...mlp.router.classifier.weight
        self.router.classifier = nn.Linear(d_model, num_experts, bias=router_bias)
        self.dispatch, self.spec, self.ctx, self.layer_idx = dispatch, spec, ctx, layer_idx
        self.load = LayerLoad()

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        flat_ND = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        x_TD = flat_ND.index_select(0, self.ctx.real_index)
        # transformers runs the router in float32 whatever the model's dtype
        logits_TE = self.router.classifier(x_TD.to(torch.float32))
        expert_T, prob_T = route(logits_TE, x_TD.dtype, self.spec, self.ctx.token_ids, self.layer_idx)
        y_TD, counts_GE = self.dispatch(x_TD, expert_T[:, None], prob_T[:, None])
        self.load.add(counts_GE)
        return self.ctx.scatter(y_TD, flat_ND).view_as(hidden_BSD)


class ShardedExperts(nn.Module):
    """In place of a top-k family's experts. With the skewed router the experts come from the
    paper's skewed draw instead of transformers' router, each weighted 1/K (see moe/routing.py)."""

    def __init__(self, dispatch, spec: RouterSpec, ctx: TokenContext, layer_idx: int):
        super().__init__()
        self.dispatch, self.spec, self.ctx, self.layer_idx = dispatch, spec, ctx, layer_idx
        self.load = LayerLoad()

    def forward(self, hidden_ND: torch.Tensor, top_k_index_NK: torch.Tensor, top_k_weights_NK: torch.Tensor) -> torch.Tensor:
        real = self.ctx.real_index
        x_TD = hidden_ND.index_select(0, real)
        if self.spec.kind == "skewed":
            ids_TK, weights_TK = skewed_routing(top_k_index_NK.shape[1], self.num_experts, self.spec, self.ctx.token_ids, self.layer_idx, x_TD.dtype)
        else:
            ids_TK, weights_TK = top_k_index_NK.index_select(0, real), top_k_weights_NK.index_select(0, real)
        y_TD, counts_GE = self.dispatch(x_TD, ids_TK, weights_TK)
        self.load.add(counts_GE)
        return self.ctx.scatter(y_TD, hidden_ND)

    @property
    def num_experts(self) -> int:
        return self.dispatch.num_experts


def skewed_routing(top_k: int, num_experts: int, spec: RouterSpec, token_ids_T: torch.Tensor, layer: int, dtype: torch.dtype):
    """(ids_TK, weights_TK) of the skewed router for a top-k family: K distinct drawn experts, 1/K each."""
    ids_TK = skewed_experts(num_experts, top_k, spec, token_ids_T, layer)
    return ids_TK, torch.full(ids_TK.shape, 1.0 / top_k, dtype=dtype, device=ids_TK.device)
