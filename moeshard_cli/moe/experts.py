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

from moeshard_cli.choices import BACKENDS
from moeshard_cli.errors import UserError



def padded_width(width: int, dtype: torch.dtype) -> int:
    step = max(1, 16 // dtype.itemsize)
    return -(-width // step) * step


def stack_experts(inputs_E: list[list[torch.Tensor]], outputs_E: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert nn.Linear weights -> padded `w_in_EDH`, `w_out_EFD`.

    Each expert brings one input matrix [F, D] (Switch's wi) or two (gate and up), and one output
    matrix [D, F]. The input matrices stand side by side in w_in, each in its own padded block of
    columns (H = F or 2F), so one grouped matmul computes both halves of a gated expert."""
    E, n, (F_, D) = len(inputs_E), len(inputs_E[0]), inputs_E[0][0].shape
    Fp = padded_width(F_, inputs_E[0][0].dtype)
    w_in_EDH = inputs_E[0][0].new_zeros(E, D, n * Fp)
    w_out_EFD = inputs_E[0][0].new_zeros(E, Fp, D)
    for e, (mats, out) in enumerate(zip(inputs_E, outputs_E)):
        for j, m in enumerate(mats):
            w_in_EDH[e, :, j * Fp : j * Fp + F_] = m.T
        w_out_EFD[e, :F_, :] = out.T
    return w_in_EDH, w_out_EFD


def stack_bias(biases_E: list[list[torch.Tensor]], width: int) -> torch.Tensor:
    """Per-expert input biases ([F] each, one or two per expert) laid out as stack_experts lays out w_in."""
    E, n, F_ = len(biases_E), len(biases_E[0]), biases_E[0][0].shape[0]
    out_EH = biases_E[0][0].new_zeros(E, n * width)
    for e, parts in enumerate(biases_E):
        for j, b in enumerate(parts):
            out_EH[e, j * width : j * width + F_] = b
    return out_EH


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

    `w_in_EDH` [E, d_model, H] and `w_out_EFD` [E, F, d_model]: a MoEShard rank's slice of every
    expert, or whole experts. H = F for a plain expert, `act(x W_in) W_out` (Switch); H = 2F for a
    gated one, `(act(x W_gate) * (x W_up)) W_out` (SwiGLU: Qwen-MoE, Mixtral, OLMoE). Optional
    biases: `bias_in_EH` (sliced like w_in) and `bias_out_ED`, which a sharded layer gives to one
    rank only, since the ranks' partial outputs are summed. An `act` marked `gate_and_up` (GPT-OSS's,
    whose gate and up columns interleave) maps the whole [N, 2F] row to [N, F] in place of
    `act(gate) * up`.
    """

    def __init__(self, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor, act: nn.Module, backend: str,
                 bias_in_EH: torch.Tensor | None = None, bias_out_ED: torch.Tensor | None = None):
        super().__init__()
        if w_in_EDH.shape[2] not in (w_out_EFD.shape[1], 2 * w_out_EFD.shape[1]):
            raise ValueError(f"w_in {list(w_in_EDH.shape)} does not fit w_out {list(w_out_EFD.shape)}")
        self.register_buffer("w_in_EDH", w_in_EDH, persistent=False)
        self.register_buffer("w_out_EFD", w_out_EFD, persistent=False)
        self.bias_in_EH, self.bias_out_ED = bias_in_EH, bias_out_ED
        self.gated = w_in_EDH.shape[2] == 2 * w_out_EFD.shape[1]
        self.act = act
        self.backend = backend
        self._mm = {"loop": _loop_mm, "megablocks": _megablocks_mm, "grouped_mm": _grouped_mm}[backend]

    @property
    def num_experts(self) -> int:
        return self.w_in_EDH.shape[0]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND grouped by expert, counts_E a host int64 tensor of rows per expert."""
        if counts_E.device.type != "cpu":
            counts_E = counts_E.cpu()
        h_NH = _with_bias(self._mm(x_ND, self.w_in_EDH, counts_E), self.bias_in_EH, counts_E)
        if getattr(self.act, "gate_and_up", False):
            h_NF = self.act(h_NH)
        elif self.gated:
            gate_NF, up_NF = h_NH.chunk(2, dim=1)
            h_NF = self.act(gate_NF) * up_NF
        else:
            h_NF = self.act(h_NH)
        return _with_bias(self._mm(h_NF, self.w_out_EFD, counts_E), self.bias_out_ED, counts_E)


class SharedExpert(nn.Module):
    """A family's shared expert (one gated MLP every token goes through: Qwen2-MoE's `shared_expert`,
    DeepSeek's `shared_experts`), or a rank's slice of it, as one GroupedExperts of a single expert.

    `gate(x_TD) -> [T, 1]` is its per-token weight (Qwen2-MoE: sigmoid(shared_expert_gate(x))), or None
    for weight 1. The gate is a function of the whole token, so every rank computes it for every token
    it holds; it scales the slice's output, and the scaled slices still add up."""

    def __init__(self, experts: GroupedExperts, gate=None):
        super().__init__()
        if experts.num_experts != 1:
            raise ValueError(f"a shared expert is one MLP, not {experts.num_experts}")
        self.experts, self.gate = experts, gate

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.experts(x_TD, torch.tensor([x_TD.shape[0]]))
        return y_TD if self.gate is None else y_TD * self.gate(x_TD).to(y_TD.dtype)


def _with_bias(y_NH: torch.Tensor, bias_EH: torch.Tensor | None, counts_E: torch.Tensor) -> torch.Tensor:
    if bias_EH is None:
        return y_NH
    return y_NH + bias_EH.repeat_interleave(counts_E.to(bias_EH.device), dim=0, output_size=y_NH.shape[0])


def _grouped_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    offs_E = torch.cumsum(counts_E, 0).to(device=x_NK.device, dtype=torch.int32, non_blocking=True)
    return F.grouped_mm(x_NK.contiguous(), w_EKM, offs=offs_E)


def _loop_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    out_NM = x_NK.new_zeros(x_NK.shape[0], w_EKM.shape[2])
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            out_NM[start:start + n] = x_NK[start:start + n] @ w_EKM[e]
            start += n
    return out_NM


def _megablocks_mm(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    # megablocks' grouped GEMM takes bfloat16, per-expert row counts as a host int64 tensor,
    # and [E, K, N] weights when trans_b is False.
    from grouped_gemm import ops

    return ops.gmm(x_NK.contiguous(), w_EKM, counts_E.to(torch.int64), trans_b=False)
