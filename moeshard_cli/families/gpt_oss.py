"""GPT-OSS (openai/gpt-oss-20b, gpt-oss-120b): biased, interleaved, transposed experts.

transformers' `GptOssExperts` holds, per layer, `gate_up_proj` [E, D, 2F] whose columns interleave
gate and up (g0, u0, g1, u1, ...), `gate_up_proj_bias` [E, 2F], `down_proj` [E, F, D] and
`down_proj_bias` [E, D]; `save_pretrained` writes them fused like that (the hub's checkpoints
store the two matrices in MXFP4 as `*_blocks` / `*_scales`, dequantized by `shard`: shard/dequant.py).

Rank files hold one tensor per expert under the in-memory module path
(`model.layers.{l}.mlp.experts.{e}.gate_up_proj` [D, 2f], `...gate_up_proj_bias` [2f],
`...down_proj` [f, D], `...down_proj_bias` [D]): the rank with d_ff slice [a, b) holds columns
[2a, 2b) of gate_up and of its bias (its F-slice of both gate and up, still interleaved) and rows
[a, b) of down. The activation, `(up + 1) * gate * sigmoid(1.702 * gate)` with clamps, is
elementwise along F, so the slices' outputs add up. The down bias is added before the routing
weight multiplies the expert's output, so the ranks' partial sums would count it once per rank:
it is written into rank 0's file only, and a rank adds the down bias its file holds.

The router (`mlp.router`: a biased linear, top-k on the logits, softmax over the k) and the
attention (sinks, sliding-window layers) stay transformers' own.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from moeshard_cli.families.gated import MID, TINY, GatedDecoderFamily

_YARN = dict(rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096,
                                  rope_theta=150000.0, truncate=False), max_position_embeddings=131072)
BUILTINS = {
    # experts 38 wide (3 and 4 workers get uneven slices); layer 0 attends through a sliding window of 8 tokens.
    "tiny-gpt-oss": dict(TINY, **_YARN, model_type="gpt_oss", intermediate_size=38, num_key_value_heads=2, head_dim=16,
                         num_local_experts=8, num_experts_per_tok=2, sliding_window=8),
    # gpt-oss-20b's shape, scaled down: 32 experts as wide as the model, top-4, alternating sliding / full attention.
    "gpt-oss-mid": dict(MID, **_YARN, model_type="gpt_oss", intermediate_size=768, num_key_value_heads=4, head_dim=64,
                        num_local_experts=32, num_experts_per_tok=4, sliding_window=128),
}

MATRICES = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_RANK_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)$")
_FUSED_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias)$")


class GptOssFamily(GatedDecoderFamily):
    name = model_type = "gpt_oss"
    config_class_name = "GptOssConfig"
    num_experts_attr = "num_local_experts"
    router = "router"
    builtin_configs = BUILTINS

    expert_inputs = ("gate_up_proj",)  # gate and up, interleaved in one matrix
    expert_output = "down_proj"
    # the rank with d_ff slice [a, b) holds gate_up's columns [2a, 2b); the down bias lives on rank 0 only
    slice_steps = {"gate_up_proj": 2, "gate_up_proj_bias": 2}
    one_rank = frozenset({"down_proj_bias"})
    expert_biases = ("gate_up_proj_bias", "down_proj_bias")  # (input, output): the bench's shared experts hold them
    no_sdpa = "transformers has no sdpa attention for gpt_oss (its attention sinks): only its eager one"

    def act(self, config) -> nn.Module:
        c = self.config(config)
        return ClampedSwiGLU(c.swiglu_alpha, c.swiglu_limit)

    # ---------------------------------------------------------------- checkpoint keys

    def expert_key(self, layer: int, expert: int, matrix: str) -> str:
        return f"model.layers.{layer}.mlp.experts.{expert}.{matrix}"

    def parse_expert_key(self, name: str) -> tuple[int, int, str] | None:
        m = _RANK_EXPERT_KEY.match(name)
        return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None

    def sliced_dim(self, matrix: str) -> int | None:
        return {"gate_up_proj": 1, "gate_up_proj_bias": 0, "down_proj": 0, "down_proj_bias": None}[matrix]

    def rank_key(self, disk_key: str, disk_keys: set[str]) -> str | None:
        return disk_key  # the fused expert tensors are read one expert at a time (fused_sources)

    def fused_sources(self, key: str) -> list[tuple[str, int | None, int, int]]:
        """Expert e's matrix M is row e of the checkpoint's fused `...mlp.experts.M`."""
        parsed = self.parse_expert_key(key)
        return [(f"model.layers.{parsed[0]}.mlp.experts.{parsed[2]}", parsed[1], 0, 1)] if parsed else []

    def expected_tensors(self, config) -> dict[str, tuple[int, ...]]:
        c = self.config(config)
        shapes = {}
        for key, tensor in self.meta_model(c).state_dict().items():
            if _FUSED_KEY.match(key):
                prefix, matrix = key.rsplit(".", 1)
                for e in range(tensor.shape[0]):
                    shapes[f"{prefix}.{e}.{matrix}"] = tuple(tensor.shape[1:])
            elif not (key == "lm_head.weight" and self.tied(c)):
                shapes[key] = tuple(tensor.shape)
        return shapes

    # ---------------------------------------------------------------- moeshard's experts

    def grouped_experts(self, config, mats: dict[str, list[torch.Tensor]], backend: str):
        """A rank's slices of one layer's experts as moeshard's GroupedExperts: gate_up kept interleaved,
        padded to [E, D, 2Fp] so its halves line up with down's [E, Fp, D]; the down bias if this rank holds it."""
        from moeshard_cli.moe.experts import GroupedExperts

        w_in_EDH, bias_in_EH, w_out_EFD = stack_interleaved(mats["gate_up_proj"], mats["gate_up_proj_bias"], mats["down_proj"])
        bias_out_ED = torch.stack(mats["down_proj_bias"]) if "down_proj_bias" in mats else None
        return GroupedExperts(w_in_EDH, w_out_EFD, self.act(config), backend, bias_in_EH, bias_out_ED)

    def transformers_experts(self, config, experts: list[dict[str, torch.Tensor]]):
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        c = self.config(config)
        with torch.device("meta"):
            layer = GptOssExperts(c).eval()
        for matrix in MATRICES:
            setattr(layer, matrix, nn.Parameter(torch.stack([w[matrix] for w in experts]), requires_grad=False))
        c._experts_implementation = "eager"
        return layer

    # ---------------------------------------------------------------- the oracle

    def fuse(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-expert keys -> transformers' fused [E, ...] parameters."""
        fused, experts = {}, {}
        for key, tensor in state.items():
            parsed = self.parse_expert_key(key)
            if parsed is None:
                fused[key] = tensor
            else:
                layer, e, matrix = parsed
                experts.setdefault((layer, matrix), {})[e] = tensor
        for (layer, matrix), by_expert in experts.items():
            fused[f"model.layers.{layer}.mlp.experts.{matrix}"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
        return fused

    # ---------------------------------------------------------------- built-ins

    def init_std(self, name: str, config) -> float | None:
        """Biases and attention sinks N(0, 0.1) and N(0, 1) so they matter; weights N(0, 1/fan_in)."""
        c = self.config(config)
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("embed_tokens.weight", "mlp.router.weight", "sinks")):
            return 1.0
        if name.endswith(("bias", "_bias")):
            return 0.1
        if name.endswith("down_proj"):
            return c.intermediate_size**-0.5
        if name.endswith("o_proj.weight"):
            return (c.num_attention_heads * c.head_dim) ** -0.5
        return c.hidden_size**-0.5


class ClampedSwiGLU(nn.Module):
    """transformers' own GPT-OSS activation of an interleaved [N, 2F] row (`GptOssExperts._apply_gate`):
    `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`, g = clamp(gate, max=limit); elementwise along F."""

    gate_and_up = True  # moe/experts.GroupedExperts hands it the whole row

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate_up_NH: torch.Tensor) -> torch.Tensor:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        return GptOssExperts._apply_gate(self, gate_up_NH)


def stack_interleaved(gate_up_E: list[torch.Tensor], bias_E: list[torch.Tensor], down_E: list[torch.Tensor]):
    """Per-expert `gate_up` [D, 2f] (interleaved), its bias [2f] and `down` [f, D] -> zero-padded
    `w_in_EDH` [E, D, 2Fp], `bias_in_EH` [E, 2Fp], `w_out_EFD` [E, Fp, D] (Fp: f padded to 16 bytes).
    Padded columns give gate = up = 0, whose activation is 0, times down's zero rows."""
    from moeshard_cli.moe.experts import padded_width

    (D, H), f = gate_up_E[0].shape, down_E[0].shape[0]
    if H != 2 * f:
        raise ValueError(f"gate_up {[D, H]} does not fit down {list(down_E[0].shape)}")
    Fp = padded_width(f, gate_up_E[0].dtype)
    w_in_EDH = gate_up_E[0].new_zeros(len(gate_up_E), D, 2 * Fp)
    bias_in_EH = gate_up_E[0].new_zeros(len(gate_up_E), 2 * Fp)
    w_out_EFD = gate_up_E[0].new_zeros(len(gate_up_E), Fp, D)
    for e, (w, b, down) in enumerate(zip(gate_up_E, bias_E, down_E)):
        w_in_EDH[e, :, :H], bias_in_EH[e, :H], w_out_EFD[e, :f] = w, b, down
    return w_in_EDH, bias_in_EH, w_out_EFD


FAMILY = GptOssFamily()
