"""Routers: which expert each token goes to, and the weight its output is scaled by.

Both are dropless. `model` is the checkpoint's own router: for Switch (top-1) `route` computes
it bit for bit as transformers does; the top-k families keep transformers' router module. `skewed` is the paper's benchmark router: expert i is drawn
with probability proportional to 1/E + skew for the first K experts and 1/E otherwise.
Its draws come from a counter-based hash of (seed, layer, token id), so the assignment of
a token does not depend on batching, padding or the number of workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from moeshard_cli.choices import ROUTERS

_M32 = 0xFFFFFFFF


def check_router(kind: str) -> None:
    if kind not in ROUTERS:
        raise ValueError(f"{kind} is unknown")


def check_skew(skew: float) -> None:
    if not math.isfinite(skew):
        raise ValueError(f"{skew} is not a finite number")
    if skew < 0:
        raise ValueError(f"{skew} is negative")


def check_hot_experts(hot: float) -> None:
    if not 0 < hot <= 1:  # nan fails too
        raise ValueError(f"{hot} is outside (0, 1]")


@dataclass(frozen=True)
class RouterSpec:
    kind: str = "model"  # "model" | "skewed"
    skew: float = 0.0
    hot_experts: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check_router(self.kind)
        check_skew(self.skew)
        check_hot_experts(self.hot_experts)


def skewed_probabilities(num_experts: int, skew: float, hot_fraction: float) -> torch.Tensor:
    """p_i proportional to 1/E + skew for i < K = max(1, round(hot_fraction * E)), else 1/E."""
    hot = max(1, round(hot_fraction * num_experts))
    weights = torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)
    weights[:hot] += skew
    return weights / weights.sum()


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser; multipliers stay below 2**31 so int64 never overflows.
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def token_uniforms(token_ids: torch.Tensor, seed: int, layer: int, draw: int = 0) -> torch.Tensor:
    """A uniform in [0, 1) per token id, a pure function of (seed, layer, draw, id)."""
    key = (seed * 0x9E3779B1 + layer * 0x85EBCA77 + draw * 0xC2B2AE3D + 0x165667B1) & _M32
    h = _mix32(token_ids.new_full(token_ids.shape, key) ^ (token_ids & _M32))
    h = _mix32(h ^ ((token_ids >> 32) & _M32))
    return h.to(torch.float64) / 2.0**32


def skewed_experts(num_experts: int, top_k: int, spec: RouterSpec, token_ids_T: torch.Tensor, layer: int) -> torch.Tensor:
    """ids_TK: `top_k` distinct experts per token, drawn one after the other from the skewed
    distribution without replacement (the k-th draw renormalised over the experts not yet taken).
    The first draw is the top-1 router's draw, so top-1 families see the same assignment."""
    p_E = skewed_probabilities(num_experts, spec.skew, spec.hot_experts).to(token_ids_T.device)
    left_TE = p_E.expand(token_ids_T.shape[0], num_experts).clone()
    ids = []
    for k in range(top_k):
        cdf_TE = torch.cumsum(left_TE, 1)
        u_T = token_uniforms(token_ids_T, spec.seed, layer, k) * cdf_TE[:, -1]
        e_T = torch.searchsorted(cdf_TE, u_T[:, None], right=True).squeeze(1).clamp_(max=num_experts - 1)
        left_TE.scatter_(1, e_T[:, None], 0.0)
        ids.append(e_T)
    return torch.stack(ids, 1)


def route(logits_TE: torch.Tensor, input_dtype: torch.dtype, spec: RouterSpec, token_ids_T: torch.Tensor, layer: int):
    """(expert_T, prob_T) for float32 router logits, matching transformers' top-1 router.

    transformers casts the softmax back to the activations' dtype before its argmax, so
    the same is done here: ties under bf16 resolve exactly as in the reference.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32).to(input_dtype)
    if spec.kind == "model":
        prob_T, expert_T = probs_TE.max(dim=-1)
        return expert_T, prob_T
    expert_T = skewed_experts(logits_TE.shape[-1], 1, spec, token_ids_T, layer).squeeze(1)
    return expert_T, probs_TE.gather(1, expert_T[:, None]).squeeze(1)
