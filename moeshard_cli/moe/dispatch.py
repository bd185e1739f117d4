"""Two ways to get a worker's tokens through all experts and back, both dropless.

`ShardedDispatch` is MoEShard: every worker holds a slice of every expert, so tokens are
all-gathered, every worker computes its slice for all of them, and the partial sums are
reduce-scattered back. The work per worker is the same whatever the routing.
`ExpertParallelDispatch` is classic expert parallelism: whole experts live on one worker
each and tokens travel to their owner and back with all-to-all; the busiest worker sets
the pace. Both return the unscaled expert output for the worker's own tokens, in order.
"""

from __future__ import annotations

import torch

from moeshard_cli.moe.exchange import Collectives, exclusive_cumsum, expert_major_index
from moeshard_cli.moe.experts import GroupedExperts


def _sort_by_expert(expert_T: torch.Tensor, num_experts: int):
    order_T = torch.argsort(expert_T, stable=True)
    counts_E = torch.bincount(expert_T, minlength=num_experts)
    return order_T, counts_E


def _unsort(sorted_TD: torch.Tensor, order_T: torch.Tensor) -> torch.Tensor:
    out_TD = torch.empty_like(sorted_TD)
    out_TD[order_T] = sorted_TD
    return out_TD


class ShardedDispatch:
    def __init__(self, experts: GroupedExperts, comm: Collectives, timer):
        self.experts, self.comm, self.timer = experts, comm, timer
        self.num_experts = experts.num_experts

    def __call__(self, x_TD: torch.Tensor, expert_T: torch.Tensor):
        order_T, counts_E = _sort_by_expert(expert_T, self.num_experts)
        counts_GE = self.comm.all_gather_counts(counts_E)
        rows_G = counts_GE.sum(1).tolist()
        gathered_RD = self.comm.all_gather_rows(x_TD[order_T], rows_G)
        with self.timer.section("compute"):
            idx_N = expert_major_index(counts_GE, self.comm.block_starts(rows_G)).to(x_TD.device)
            partial_ND = self.experts(gathered_RD[idx_N], counts_GE.sum(0))
            partial_RD = torch.empty_like(gathered_RD)
            partial_RD[idx_N] = partial_ND
        mine_TD = self.comm.reduce_scatter_rows(partial_RD, rows_G)
        return _unsort(mine_TD, order_T), counts_GE


class ExpertParallelDispatch:
    """Whole experts [rank * E/G, (rank + 1) * E/G) on each worker; `experts` holds only those."""

    def __init__(self, experts: GroupedExperts, num_experts: int, comm: Collectives, timer):
        if num_experts % comm.world:
            raise ValueError(f"expert parallelism needs E={num_experts} divisible by the {comm.world} workers")
        self.experts, self.comm, self.timer = experts, comm, timer
        self.num_experts, self.local = num_experts, num_experts // comm.world

    def __call__(self, x_TD: torch.Tensor, expert_T: torch.Tensor):
        G, L, r = self.comm.world, self.local, self.comm.rank
        order_T, counts_E = _sort_by_expert(expert_T, self.num_experts)
        counts_GE = self.comm.all_gather_counts(counts_E)
        counts_GGL = counts_GE.view(G, G, L)  # [source worker, owner, local expert]
        send_G = counts_GGL[r].sum(1).tolist()
        recv_G = counts_GGL[:, r].sum(1).tolist()
        recv_RD = self.comm.all_to_all_rows(x_TD[order_T], send_G, recv_G)
        mine_GL = counts_GGL[:, r]
        with self.timer.section("compute"):
            idx_N = expert_major_index(mine_GL, exclusive_cumsum(torch.tensor(recv_G))).to(x_TD.device)
            out_ND = self.experts(recv_RD[idx_N], mine_GL.sum(0))
            back_RD = torch.empty_like(recv_RD)
            back_RD[idx_N] = out_ND
        mine_TD = self.comm.all_to_all_rows(back_RD, recv_G, send_G)
        return _unsort(mine_TD, order_T), counts_GE
