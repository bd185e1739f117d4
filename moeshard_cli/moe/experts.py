"""Grouped expert compute: every expert's (slice of) FFN on its tokens, in one matmul per weight.

Weights are stacked once at load time as `w_in_EDF` [E, d_model, F] and `w_out_EFD`
[E, F, d_model] (contiguous; a transposed view of the nn.Linear layout ran ~1.5x slower),
with F padded to a 16-byte multiple as `grouped_mm` requires. Padded columns of w_in and
rows of w_out are zero, so they add nothing to the output.
"""

from __future__ import annotations

import importlib.util

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
    """megablocks' grouped GEMM (the grouped_gemm package with its compiled CUDA extension) and a GPU.

    Imports it only when asked: the extension loads CUDA libraries."""
    if importlib.util.find_spec("grouped_gemm") is None or not torch.cuda.is_available():
        return False
    try:
        import grouped_gemm.ops  # noqa: F401
    except Exception:  # installed without its compiled kernels, or built against another torch
        return False
    return True


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{name} is unknown")


def resolve_backend(name: str, device: torch.device, d_model: int, dtype: torch.dtype) -> str:
    """The backend `name` stands for on this device and model; UserError where it cannot run here."""
    check_backend(name)
    if name == "megablocks":
        _check_megablocks(device, dtype)
    aligned = (d_model * dtype.itemsize) % 16 == 0
    if name == "grouped_mm" and not aligned:
        raise UserError(f"grouped_mm needs d_model*itemsize to be a multiple of 16 bytes (d_model={d_model})", "use --expert-backend loop")
    if name == "auto":
        return "grouped_mm" if aligned else "loop"
    return name


def _check_megablocks(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        raise UserError("--expert-backend megablocks runs on CUDA only", "use --device cuda on a GPU machine, or --expert-backend grouped_mm")
    if dtype != torch.bfloat16:  # grouped_gemm's kernels take bfloat16 only
        raise UserError(f"--expert-backend megablocks needs a bfloat16 shard set, not {str(dtype).removeprefix('torch.')}",
                        "re-shard with --dtype bfloat16, or use --expert-backend grouped_mm")
    if not megablocks_available():
        raise UserError("--expert-backend megablocks needs megablocks' grouped GEMM (package grouped_gemm), not importable here",
                        "TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation grouped_gemm (see docs/gpu.md), or use --expert-backend grouped_mm")


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
        # megablocks' grouped GEMM takes bfloat16, per-expert row counts as a host int64 tensor,
        # and [E, K, N] weights when trans_b is False.
        from grouped_gemm import ops

        batch_sizes_E = counts_E.to(torch.int64)
        h_NF = self.act(ops.gmm(x_ND.contiguous(), w_in_EDF, batch_sizes_E, trans_b=False))
        return ops.gmm(h_NF.contiguous(), w_out_EFD, batch_sizes_E, trans_b=False)
