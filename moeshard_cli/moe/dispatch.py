"""How a worker's tokens reach the experts and come back: the dispatch contract and its two dropless forms.

A dispatch is called as `dispatch(x_TD, ids_TK, weights_TK) -> (y_TD, counts_GE)`: for each of
this worker's own tokens, in their original order, the sum over its K routed experts of the
expert's output times its routing weight; and the host int64 [G, E] table of (token, expert)
pairs per (worker, expert). It counts the tokens it routed and dropped since its last `reset()`.
The router stays outside (transformers' own module, or Switch's `route`), so the bench can swap
systems under one model (bench/systems.py, bench/deepspeed_moe.py).

`ShardedDispatch` is MoEShard: every worker holds a slice of every expert, so each token is
gathered once from its worker with its K expert ids and weights, every worker computes its
slice of all K experts for all tokens and sums them per token, and the partial sums go back to
their owners (a reduce-scatter). The rows moved per layer are the tokens, not the K times more
(token, expert) pairs, and the work per worker is the same whatever the routing.
`ExpertParallelDispatch` is classic expert parallelism: whole experts live on one worker each;
every (token, expert) pair travels to the expert's owner and back with all-to-all, and the
busiest worker sets the pace. Both are split as torchtitan's token dispatcher is: dispatch ->
grouped compute -> combine.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moeshard_cli.moe.exchange import Collectives, exclusive_cumsum, expert_major_index


class Dispatch(Protocol):
    tokens: int  # tokens this worker routed since reset()
    dropped: int  # of which the dispatch dropped (zero output); 0 for dropless ones

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def reset(self) -> None: ...


class Counted:
    """The counters of the Dispatch contract."""

    tokens: int = 0
    dropped: int = 0

    def reset(self) -> None:
        self.tokens = self.dropped = 0

    def count(self, tokens: int, dropped: int = 0) -> None:
        self.tokens += tokens
        self.dropped += dropped


def sort_pairs(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_P, counts_E): the (token, expert) pairs, flattened token-major, in expert-major order."""
    ids_P = ids_TK.reshape(-1)
    return torch.argsort(ids_P, stable=True), torch.bincount(ids_P, minlength=num_experts)


def weighted_sum(out_PD: torch.Tensor, order_P: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Expert outputs of expert-major pairs -> per token, the sum over its K experts of weight x output.

    The K terms are added in the router's order, as transformers adds them (a reshape and a sum)."""
    T, K = weights_TK.shape
    by_pair_PD = torch.empty_like(out_PD)
    by_pair_PD[order_P] = out_PD
    return (by_pair_PD.view(T, K, -1) * weights_TK[:, :, None]).sum(1)


class ShardedDispatch(Counted):
    """`shared`: this worker's slice of the family's shared expert (moe/experts.SharedExpert), run on
    every gathered token and added to the partial sums before they are reduced: no extra exchange."""

    def __init__(self, experts, comm: Collectives, timer, shared=None):
        self.experts, self.comm, self.timer, self.shared = experts, comm, timer, shared
        self.num_experts = experts.num_experts

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor):
        received, counts_GE = self.dispatch(x_TD, ids_TK, weights_TK)
        with self.timer.section("compute"):
            partial_RD = self.compute(*received)
        self.count(x_TD.shape[0])
        return self.combine(partial_RD, counts_GE[:, -1].tolist()), counts_GE[:, :-1]

    def dispatch(self, x_TD, ids_TK, weights_TK):
        """Every worker's tokens with their routing, rank-major; and the [G, E + 1] table of
        pairs per expert, the last column each worker's token count."""
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=self.num_experts)
        counts_GE = self.comm.all_gather_counts(torch.cat([counts_E, counts_E.new_tensor([x_TD.shape[0]])]))
        rows_G = counts_GE[:, -1].tolist()
        x_RD, ids_RK, weights_RK = self.comm.all_gather_routed(x_TD, ids_TK, weights_TK, rows_G)
        real_R = self.comm.real_rows(rows_G).to(x_TD.device)
        return (x_RD, ids_RK, weights_RK, real_R, counts_GE[:, :-1].sum(0)), counts_GE

    def compute(self, x_RD, ids_RK, weights_RK, real_R, counts_E) -> torch.Tensor:
        """This worker's slice of every token's K experts, weighted and summed per token."""
        padded = real_R.numel() != x_RD.shape[0]  # the padded exchange: only the real rows are computed
        x_TD, ids_TK, weights_TK = (x_RD[real_R], ids_RK[real_R], weights_RK[real_R]) if padded else (x_RD, ids_RK, weights_RK)
        K = ids_TK.shape[1]
        order_P, _ = sort_pairs(ids_TK, self.num_experts)
        out_PD = self.experts(x_TD[order_P // K], counts_E)
        y_TD = weighted_sum(out_PD, order_P, weights_TK).to(x_RD.dtype)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD).to(y_TD.dtype)
        if not padded:
            return y_TD
        y_RD = x_RD.new_zeros(x_RD.shape)
        y_RD[real_R] = y_TD
        return y_RD

    def combine(self, partial_RD: torch.Tensor, rows_G: list[int]) -> torch.Tensor:
        """Sum the workers' partial outputs of this worker's tokens (their original order is kept)."""
        return self.comm.reduce_scatter_rows(partial_RD, rows_G)


class ExpertParallelDispatch(Counted):
    """Whole experts [rank * E/G, (rank + 1) * E/G) on each worker; `experts` holds only those.
    A shared expert (`shared`, whole) is replicated and runs on the worker's own tokens, as
    expert-parallel deployments of DeepSeek and Qwen2-MoE run it."""

    def __init__(self, experts, num_experts: int, comm: Collectives, timer, shared=None):
        if num_experts % comm.world:
            raise ValueError(f"expert parallelism needs E={num_experts} divisible by the {comm.world} workers")
        self.experts, self.comm, self.timer, self.shared = experts, comm, timer, shared
        self.num_experts, self.local = num_experts, num_experts // comm.world

    def __call__(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor):
        G, L, r, K = self.comm.world, self.local, self.comm.rank, ids_TK.shape[1]
        order_P, counts_E = sort_pairs(ids_TK, self.num_experts)
        counts_GE = self.comm.all_gather_counts(counts_E)
        counts_GGL = counts_GE.view(G, G, L)  # [source worker, owner, local expert]
        send_G = counts_GGL[r].sum(1).tolist()
        recv_G = counts_GGL[:, r].sum(1).tolist()
        received_RD = self.comm.all_to_all_rows(x_TD[order_P // K], send_G, recv_G)
        idx_N = expert_major_index(counts_GGL[:, r], exclusive_cumsum(torch.tensor(recv_G))).to(x_TD.device)
        with self.timer.section("compute"):
            out_ND = self.experts(received_RD[idx_N], counts_GGL[:, r].sum(0))
            out_RD = torch.empty_like(received_RD)
            out_RD[idx_N] = out_ND
        self.count(x_TD.shape[0])
        back_PD = self.comm.all_to_all_rows(out_RD, recv_G, send_G)
        y_TD = weighted_sum(back_PD, order_P, weights_TK).to(x_TD.dtype)
        if self.shared is not None:
            with self.timer.section("compute"):
                y_TD = y_TD + self.shared(x_TD).to(y_TD.dtype)
        return y_TD, counts_GE
