"""How a worker's tokens reach the experts and come back: the dispatch contract and its two dropless forms.

A dispatch is called as `dispatch(x_TD, expert_T) -> (y_TD, counts_GE)`: the unscaled expert
output for this worker's own tokens in their original order, and the host int64 [G, E] table
of tokens per (worker, expert). It counts the tokens it routed and dropped since its last
`reset()`. `ShardedSparseMLP` runs the router and scales by its probability around any
dispatch, so the bench can swap systems under one model (bench/systems.py, bench/deepspeed_moe.py).

`ShardedDispatch` is MoEShard: every worker holds a slice of every expert, so tokens are
gathered from all workers, every worker computes its slice for all of them, and the partial
sums go back to their owners. The work per worker is the same whatever the routing.
`ExpertParallelDispatch` is classic expert parallelism: whole experts live on one worker each
and tokens travel to their owner and back with all-to-all; the busiest worker sets the pace.
Both are split as torchtitan's token dispatcher is: dispatch -> grouped compute -> combine,
with the routing metadata of one call in a small dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeshard_cli.moe.exchange import Collectives, exclusive_cumsum, expert_major_index


class Dispatch(Protocol):
    tokens: int  # tokens this worker routed since reset()
    dropped: int  # of which the dispatch dropped (zero output); 0 for dropless ones

    def __call__(self, x_TD: torch.Tensor, expert_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

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


@dataclass
class Route:
    """One call's routing: own tokens sorted by expert, the [G, E] counts, and the rows moved."""

    order_T: torch.Tensor
    counts_GE: torch.Tensor
    send_G: list[int]  # rows this worker sends to each worker
    recv_G: list[int]  # rows it receives from each
    idx_N: torch.Tensor  # received rows in expert-major order
    rows_E: torch.Tensor  # rows per expert of this worker's experts in that order (host)


def _sort_by_expert(expert_T: torch.Tensor, num_experts: int):
    order_T = torch.argsort(expert_T, stable=True)
    counts_E = torch.bincount(expert_T, minlength=num_experts)
    return order_T, counts_E


def _unsort(sorted_TD: torch.Tensor, order_T: torch.Tensor) -> torch.Tensor:
    out_TD = torch.empty_like(sorted_TD)
    out_TD[order_T] = sorted_TD
    return out_TD


def _expert_major(rows_RD: torch.Tensor, route: Route, experts) -> torch.Tensor:
    """Run the experts on received rows regrouped expert-major, and put the results back in place."""
    out_ND = experts(rows_RD[route.idx_N], route.rows_E)
    out_RD = torch.empty_like(rows_RD)
    out_RD[route.idx_N] = out_ND
    return out_RD


class Exchanged(Counted):
    """dispatch -> the experts on the received rows, expert-major -> combine; subclasses say how rows
    move and set `experts` and `timer`."""

    def __call__(self, x_TD: torch.Tensor, expert_T: torch.Tensor):
        received_RD, route = self.dispatch(x_TD, expert_T)
        with self.timer.section("compute"):
            out_RD = _expert_major(received_RD, route, self.experts)
        self.count(x_TD.shape[0])
        return self.combine(out_RD, route), route.counts_GE

    def dispatch(self, x_TD: torch.Tensor, expert_T: torch.Tensor) -> tuple[torch.Tensor, Route]:
        raise NotImplementedError

    def combine(self, out_RD: torch.Tensor, route: Route) -> torch.Tensor:
        raise NotImplementedError


class ShardedDispatch(Exchanged):
    def __init__(self, experts, comm: Collectives, timer):
        self.experts, self.comm, self.timer = experts, comm, timer
        self.num_experts = experts.num_experts

    def dispatch(self, x_TD: torch.Tensor, expert_T: torch.Tensor) -> tuple[torch.Tensor, Route]:
        """Every worker's tokens, rank-major, each worker's sorted by expert."""
        order_T, counts_E = _sort_by_expert(expert_T, self.num_experts)
        counts_GE = self.comm.all_gather_counts(counts_E)
        rows_G = counts_GE.sum(1).tolist()
        gathered_RD = self.comm.all_gather_rows(x_TD[order_T], rows_G)
        idx_N = expert_major_index(counts_GE, self.comm.block_starts(rows_G)).to(x_TD.device)
        return gathered_RD, Route(order_T, counts_GE, [x_TD.shape[0]] * self.comm.world, rows_G, idx_N, counts_GE.sum(0))

    def combine(self, partial_RD: torch.Tensor, route: Route) -> torch.Tensor:
        """Sum the workers' partial outputs of this worker's tokens, back in their original order."""
        return _unsort(self.comm.reduce_scatter_rows(partial_RD, route.recv_G), route.order_T)


class ExpertParallelDispatch(Exchanged):
    """Whole experts [rank * E/G, (rank + 1) * E/G) on each worker; `experts` holds only those."""

    def __init__(self, experts, num_experts: int, comm: Collectives, timer):
        if num_experts % comm.world:
            raise ValueError(f"expert parallelism needs E={num_experts} divisible by the {comm.world} workers")
        self.experts, self.comm, self.timer = experts, comm, timer
        self.num_experts, self.local = num_experts, num_experts // comm.world

    def dispatch(self, x_TD: torch.Tensor, expert_T: torch.Tensor) -> tuple[torch.Tensor, Route]:
        """This worker's experts' tokens from every worker, rank-major."""
        G, L, r = self.comm.world, self.local, self.comm.rank
        order_T, counts_E = _sort_by_expert(expert_T, self.num_experts)
        counts_GE = self.comm.all_gather_counts(counts_E)
        counts_GGL = counts_GE.view(G, G, L)  # [source worker, owner, local expert]
        send_G = counts_GGL[r].sum(1).tolist()
        recv_G = counts_GGL[:, r].sum(1).tolist()
        received_RD = self.comm.all_to_all_rows(x_TD[order_T], send_G, recv_G)
        idx_N = expert_major_index(counts_GGL[:, r], exclusive_cumsum(torch.tensor(recv_G))).to(x_TD.device)
        return received_RD, Route(order_T, counts_GE, send_G, recv_G, idx_N, counts_GGL[:, r].sum(0))

    def combine(self, out_RD: torch.Tensor, route: Route) -> torch.Tensor:
        return _unsort(self.comm.all_to_all_rows(out_RD, route.recv_G, route.send_G), route.order_T)
