"""Grouped expert compute: every expert's (slice of) FFN on its tokens, in one matmul per weight.

Weights are stacked once at load time as `w_in_EDF` [E, d_model, F] and `w_out_EFD`
[E, F, d_model] (contiguous; a transposed view of the nn.Linear layout ran ~1.5x slower),
with F padded to a 16-byte multiple as `grouped_mm` requires. Padded columns of w_in and
rows of w_out are zero, so they add nothing to the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeshard_cli.errors import UserError

BACKENDS = ("auto", "grouped_mm", "loop", "megablocks")


def padded_width(width: int, dtype: torch.dtype) -> int:
    step = max(1, 16 // dtype.itemsize)
    return -(-width // step) * step


def stack_experts(wi_list: list[torch.Tensor], wo_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert nn.Linear weights (wi [F, D], wo [D, F]) -> padded w_in_EDF, w_out_EFD."""
    E, (F_, D) = len(wi_list), wi_list[0].shape
    Fp = padded_width(F_, wi_list[0].dtype)
    w_in_EDF = wi_list[0].new_zeros(E, D, Fp)
    w_out_EFD = wi_list[0].new_zeros(E, Fp, D)
    for e, (wi, wo) in enumerate(zip(wi_list, wo_list)):
        w_in_EDF[e, :, :F_] = wi.T
        w_out_EFD[e, :F_, :] = wo.T
    return w_in_EDF, w_out_EFD


def megablocks_available() -> bool:
    try:
        from megablocks import grouped_gemm_util as gg
    except Exception:  # not installed, or installed without its compiled kernels
        return False
    return gg.grouped_gemm_is_available() and torch.cuda.is_available()


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{name} is unknown")


def resolve_backend(name: str, device: torch.device, d_model: int, dtype: torch.dtype) -> str:
    """The backend `name` stands for on this device and model; UserError where it cannot run here."""
    check_backend(name)
    if name == "megablocks" and not (device.type == "cuda" and megablocks_available()):
        raise UserError("--expert-backend megablocks needs CUDA and an importable megablocks", "install moeshard[megablocks] on a CUDA machine, or use --expert-backend grouped_mm")
    aligned = (d_model * dtype.itemsize) % 16 == 0
    if name == "grouped_mm" and not aligned:
        raise UserError(f"grouped_mm needs d_model*itemsize to be a multiple of 16 bytes (d_model={d_model})", "use --expert-backend loop")
    if name == "auto":
        return "grouped_mm" if aligned else "loop"
    return name


class GroupedExperts(nn.Module):
    """Applies expert e's weights to the rows [offs[e-1], offs[e]) of an expert-major input.

    Weights are `w_in_EDF` [E, d_model, F] and `w_out_EFD` [E, F, d_model]: a MoEShard rank's
    slice of every expert, or whole experts.
    """

    def __init__(self, w_in_EDF: torch.Tensor, w_out_EFD: torch.Tensor, act: nn.Module, backend: str):
        super().__init__()
        self.register_buffer("w_in_EDF", w_in_EDF, persistent=False)
        self.register_buffer("w_out_EFD", w_out_EFD, persistent=False)
        self.act = act
        self.backend = backend

    @property
    def num_experts(self) -> int:
        return self.w_in_EDF.shape[0]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND grouped by expert, counts_E a host int64 tensor of rows per expert."""
        compute = {"loop": self._loop, "megablocks": self._megablocks, "grouped_mm": self._grouped_mm}[self.backend]
        if counts_E.device.type != "cpu":
            counts_E = counts_E.cpu()
        return compute(x_ND, counts_E, self.w_in_EDF, self.w_out_EFD)

    def _grouped_mm(self, x_ND, counts_E, w_in_EDF, w_out_EFD):
        offs_E = torch.cumsum(counts_E, 0).to(device=x_ND.device, dtype=torch.int32, non_blocking=True)
        h_NF = self.act(F.grouped_mm(x_ND, w_in_EDF, offs=offs_E))
        return F.grouped_mm(h_NF, w_out_EFD, offs=offs_E)

    def _loop(self, x_ND, counts_E, w_in_EDF, w_out_EFD):
        out_ND = torch.zeros_like(x_ND)
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                rows = slice(start, start + n)
                out_ND[rows] = self.act(x_ND[rows] @ w_in_EDF[e]) @ w_out_EFD[e]
                start += n
        return out_ND

    def _megablocks(self, x_ND, counts_E, w_in_EDF, w_out_EFD):
        # megablocks' grouped GEMM (the CUTLASS kernels of the grouped_gemm package) takes
        # per-expert row counts on the host and [E, K, N] weights when trans_b is False.
        from megablocks import grouped_gemm_util as gg

        batch_sizes = counts_E.to(torch.int64)
        h_NF = self.act(gg.ops.gmm(x_ND.contiguous(), w_in_EDF, batch_sizes, trans_b=False))
        return gg.ops.gmm(h_NF.contiguous(), w_out_EFD, batch_sizes, trans_b=False)
