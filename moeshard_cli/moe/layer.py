"""The drop-in replacement for transformers' `SwitchTransformersSparseMLP`.

Same input and output as the module it replaces ([B, S, d_model] in and out, expert output
scaled by the top-1 router probability; the residual is added by transformers' own
`SwitchTransformersLayerFF` around it). Only real tokens are routed: padding positions are
never sent or computed and get a zero MLP output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeshard_cli.moe.routing import RouterSpec, route


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
        y_TD, counts_GE = self.dispatch(x_TD, expert_T)
        self.load.add(counts_GE)
        out_ND = torch.zeros_like(flat_ND)
        out_ND.index_copy_(0, self.ctx.real_index, (y_TD * prob_T[:, None]).to(flat_ND.dtype))
        return out_ND.view_as(hidden_BSD)
