"""Granite-MoE-Shared (ibm-granite/granite-4.0-tiny-base-preview's MoE layout): Granite-MoE plus a shared MLP.

Each decoder layer adds `shared_mlp(x)` (weight 1) to the MoE block's output. The shared MLP is
fused in memory and on disk alike: `shared_mlp.input_linear.weight` [2F, D] (gate rows first) and
`output_linear.weight` [D, F]. Rank files hold it as gated.py's shared expert
(`shared_mlp.gate_proj/up_proj/down_proj.weight`, sliced at its own width); the oracle fuses it back.
With `shared_intermediate_size` 0 a layer has none, and the model is Granite-MoE's.
"""

from __future__ import annotations

import torch

from moeshard_cli.families import SHARED_EXPERT as SHARED
from moeshard_cli.families.gated import TINY
from moeshard_cli.families.granitemoe import MUP, GraniteMoeFamily

BUILTINS = {
    # routed experts 38 wide, the shared one 45: uneven at 2, 3 and 4 workers.
    "tiny-granite-moe-shared": dict(TINY, **MUP, model_type="granitemoeshared", intermediate_size=38, shared_intermediate_size=45,
                                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2),
}


class GraniteMoeSharedFamily(GraniteMoeFamily):
    name = model_type = "granitemoeshared"
    config_class_name = "GraniteMoeSharedConfig"
    shared = "shared_mlp"
    disk_shared_fused = (("input_linear.weight", "output_linear.weight"),)
    builtin_configs = BUILTINS

    def expected_tensors(self, config) -> dict[str, tuple[int, ...]]:
        """gated.py's, with each layer's fused shared MLP listed as its gate, up and down matrices."""
        (fused_in, fused_out), = self.disk_shared_fused
        shapes = {}
        for key, shape in super().expected_tensors(config).items():
            layer, _, name = key.removeprefix("model.layers.").partition(f".{self.shared}.")
            if name == fused_in:
                for matrix in ("gate_proj", "up_proj"):
                    shapes[self.expert_key(int(layer), SHARED, matrix)] = (shape[0] // 2, *shape[1:])
            elif name == fused_out:
                shapes[self.expert_key(int(layer), SHARED, "down_proj")] = shape
            else:
                shapes[key] = shape
        return shapes

    def fuse(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """gated.py's, with each shared MLP fused back into transformers' `input_linear` / `output_linear`."""
        (fused_in, fused_out), = self.disk_shared_fused
        fused, shared = {}, {}
        for key, tensor in super().fuse(state).items():
            parsed = self.parse_expert_key(key)
            if parsed and parsed[1] == SHARED:
                shared.setdefault(parsed[0], {})[parsed[2]] = tensor
            else:
                fused[key] = tensor
        for layer, mats in shared.items():
            prefix = f"model.layers.{layer}.{self.shared}"
            fused[f"{prefix}.{fused_in}"] = torch.cat([mats["gate_proj"], mats["up_proj"]])
            fused[f"{prefix}.{fused_out}"] = mats["down_proj"]
        return fused


FAMILY = GraniteMoeSharedFamily()
