"""Token exchange between workers, and the index arithmetic it needs.

Every worker sorts its own tokens by expert. The per-expert counts of all workers form
a `[G, E]` table, the only data that crosses to the host. From it, pure functions derive
where each gathered token sits, so the grouped matmul sees all tokens of expert 0 (from
every worker), then expert 1, and so on.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

# torch 2.13 renamed these (the old names warn); older releases only have the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def expert_major_index(counts_GE: torch.Tensor, row_start_G: torch.Tensor) -> torch.Tensor:
    """Rows of a rank-major buffer, reordered expert-major.

    The buffer holds rank g's tokens from `row_start_G[g]`, sorted by expert, `counts_GE[g, e]`
    of them for expert e. The result lists, for expert 0, rank 0's rows then rank 1's, ...,
    then expert 1, ...: `buffer[index]` is grouped by expert across all ranks.
    """
    G, E = counts_GE.shape
    within_GE = torch.cumsum(counts_GE, 1) - counts_GE
    start_EG = (row_start_G[:, None] + within_GE).T.reshape(-1)
    size_EG = counts_GE.T.reshape(-1)
    total = int(size_EG.sum())
    block_N = torch.repeat_interleave(torch.arange(G * E, device=counts_GE.device), size_EG, output_size=total)
    dst_start_EG = torch.cumsum(size_EG, 0) - size_EG
    return start_EG[block_N] + torch.arange(total, device=counts_GE.device) - dst_start_EG[block_N]


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


class Collectives:
    """The collectives one MoE layer needs, over one process group, timed as communication.

    Two ways to move MoEShard's rows, chosen by `strategy` (see docs/benchmarks.md):
    - "alltoall": the all-gather and the reduce-scatter are both `all_to_all_single` with
      exact split sizes (the reduce then sums the world's partials locally). Nothing is padded.
    - "padded": `all_gather_single` / `reduce_scatter_single` on blocks padded to the
      busiest worker's row count (these need equal sizes).
    """

    STRATEGIES = ("alltoall", "padded")

    def __init__(self, group=None, timer=None, strategy: str = "alltoall"):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"unknown exchange strategy {strategy}")
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.timer = timer
        self.strategy = strategy

    def _timed(self):
        return self.timer.section("comm") if self.timer else nullcontext()

    def all_gather_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """[E] per worker -> [G, E] on the host (the one host sync of the layer)."""
        with self._timed():
            if self.world == 1:
                return counts_E[None].cpu()
            out = counts_E.new_empty(self.world * counts_E.numel())
            all_gather_single(out, counts_E.contiguous(), group=self.group)
            return out.view(self.world, -1).cpu()

    def block_starts(self, rows_G: list[int]) -> torch.Tensor:
        """Where each worker's rows start in the buffer `all_gather_rows` returns."""
        if self.strategy == "padded" and self.world > 1:
            return torch.arange(self.world) * max(rows_G)
        return exclusive_cumsum(torch.tensor(rows_G))

    def all_gather_rows(self, x_TD: torch.Tensor, rows_G: list[int]) -> torch.Tensor:
        """Every worker's rows, rank-major, from `block_starts(rows_G)`."""
        with self._timed():
            if self.world == 1:
                return x_TD
            if self.strategy == "alltoall":
                out = x_TD.new_empty(sum(rows_G), x_TD.shape[1])
                send = x_TD.repeat(self.world, 1)
                dist.all_to_all_single(out, send, rows_G, [x_TD.shape[0]] * self.world, group=self.group)
                return out
            pad = max(rows_G)
            send = x_TD if x_TD.shape[0] == pad else torch.cat([x_TD, x_TD.new_zeros(pad - x_TD.shape[0], x_TD.shape[1])])
            out = x_TD.new_empty(self.world * pad, x_TD.shape[1])
            all_gather_single(out, send.contiguous(), group=self.group)
            return out

    def real_rows(self, rows_G: list[int]) -> torch.Tensor:
        """Rows of an `all_gather_rows` buffer that hold tokens (the padded strategy pads each block)."""
        starts_G = self.block_starts(rows_G)
        if self.strategy != "padded" or self.world == 1:
            return torch.arange(sum(rows_G))
        return torch.cat([torch.arange(s, s + n) for s, n in zip(starts_G.tolist(), rows_G)])

    def all_gather_routed(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, rows_G: list[int]):
        """Every worker's tokens with their K expert ids and weights, laid out as `all_gather_rows`.

        The routing travels as float32 columns (expert ids are exact below 2**24); beside float32
        tokens it rides in the same collective, so a layer pays one gather, not two."""
        K = ids_TK.shape[1]
        routing_TC = torch.cat([ids_TK.to(torch.float32), weights_TK.to(torch.float32)], 1)
        if x_TD.dtype == torch.float32:
            both_RC = self.all_gather_rows(torch.cat([x_TD, routing_TC], 1), rows_G)
            x_RD, routing_RC = both_RC[:, : x_TD.shape[1]], both_RC[:, x_TD.shape[1]:]
        else:
            x_RD, routing_RC = self.all_gather_rows(x_TD, rows_G), self.all_gather_rows(routing_TC, rows_G)
        return x_RD, routing_RC[:, :K].long(), routing_RC[:, K:].to(weights_TK.dtype)

    def reduce_scatter_rows(self, partial_RD: torch.Tensor, rows_G: list[int]) -> torch.Tensor:
        """Sum the partial outputs (laid out as `all_gather_rows` returned them) over workers;
        keep this worker's rows."""
        with self._timed():
            if self.world == 1:
                return partial_RD
            mine = rows_G[self.rank]
            if self.strategy == "alltoall":
                out = partial_RD.new_empty(self.world * mine, partial_RD.shape[1])
                dist.all_to_all_single(out, partial_RD, [mine] * self.world, rows_G, group=self.group)
                return out.view(self.world, mine, partial_RD.shape[1]).sum(0)  # mine may be 0: no -1
            out = partial_RD.new_empty(max(rows_G), partial_RD.shape[1])
            reduce_scatter_single(out, partial_RD, group=self.group)
            return out[:mine]

    def all_to_all_rows(self, x_TD: torch.Tensor, send_G: list[int], recv_G: list[int]) -> torch.Tensor:
        with self._timed():
            if self.world == 1:
                return x_TD
            out = x_TD.new_empty(sum(recv_G), x_TD.shape[1])
            dist.all_to_all_single(out, x_TD.contiguous(), recv_G, send_G, group=self.group)
            return out
