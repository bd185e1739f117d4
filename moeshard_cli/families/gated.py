"""The gated top-k decoder layout of transformers 5: Qwen3-MoE, OLMoE, Mixtral, Qwen2-MoE, DeepSeek-V3/V2, PhiMoE.

In memory each MoE block is `mlp.gate` (transformers' top-k router: softmax, top-k, renormalise
or not, as the family says) and `mlp.experts` with fused parameters `gate_up_proj` [E, 2F, D]
(the gate half first) and `down_proj` [E, D, F]. On disk (the hub, and `save_pretrained`) each
expert is stored apart: `mlp.experts.{e}.gate_proj.weight` [F, D], `up_proj` [F, D],
`down_proj` [D, F] (Mixtral: `block_sparse_moe.experts.{e}.w1` / `w3` / `w2`).

Rank files use the per-expert names under the in-memory module path
(`model.layers.{l}.mlp.experts.{e}.gate_proj.weight`), rows [lo, hi) of gate and up and the same
columns of down: `act(gate) * up` is elementwise along F, so the slices' outputs add up. Only
`mlp.experts` is replaced by moeshard's module (moe/layer.ShardedExperts), which has the
experts' call signature `(hidden_states, top_k_index, top_k_weights)`; the router stays
transformers' own, so each family's routing rules come for free.

A shared expert (Qwen2-MoE's `mlp.shared_expert`, DeepSeek's `mlp.shared_experts`) is stored as
a plain MLP, `{shared}.gate_proj/up_proj/down_proj.weight`, parsed as expert SHARED and sliced by
the same rule at its own width; its slot in transformers' block gets a `ZeroOutput` and the slice
runs inside moeshard's exchange with the block's gate (moe/experts.SharedExpert).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from moeshard_cli.families import SHARED_EXPERT as SHARED, Dims

MATRICES = ("gate_proj", "up_proj", "down_proj")
# What the built-ins of every gated family share: ByT5's byte ids (end of sequence 1, pad 0), untied head.
_IDS = dict(pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False)
TINY = dict(_IDS, vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
MID = dict(_IDS, vocab_size=32768, hidden_size=768, num_hidden_layers=6, num_attention_heads=12, max_position_embeddings=4096)
_SLICED_DIM = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}  # rows of gate and up, columns of down


class ZeroOutput(nn.Module):
    """In place of a shared expert that moeshard computes inside its own exchange (moe/experts.SharedExpert):
    transformers' block still adds its output, which is then exactly zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class GatedDecoderFamily:
    """Subclasses set the names below and `builtin_configs`; everything else is shared."""

    name = model_type = ""
    config_class_name = ""  # in transformers
    num_experts_attr = "num_experts"
    d_ff_attr = "intermediate_size"  # each expert's width
    disk_roles = {m: m for m in MATRICES}  # checkpoint matrix name -> gate_proj / up_proj / down_proj
    disk_block = "mlp"  # the checkpoint's name of the MoE block (Mixtral's hub files: block_sparse_moe)
    block = "mlp"  # the decoder layer's attribute holding the MoE block in memory
    router = "gate"  # the block's attribute holding transformers' router
    disk_router = ""  # the checkpoint's name of the router where it differs (PhiMoE's hub files: gate)
    # The shared expert: a dense gated MLP every token goes through, its output added to the routed
    # experts'. `shared` is its path under the decoder layer ("" for none); `shared_gate` the block's
    # per-token gate, applied as sigmoid(gate(x)) (Qwen2-MoE), "" for none.
    shared = ""
    shared_gate = ""
    # Where a checkpoint stores the experts fused, their (gate|up [E, 2F, D], down [E, D, F]) names under
    # the block, tried in order: transformers' in-memory names; Granite's `input_linear`/`output_linear`.
    # `disk_shared_fused`: the same for a shared expert stored fused ([2F, D], [D, F]) under `shared`.
    disk_fused = (("experts.gate_up_proj", "experts.down_proj"),)
    disk_shared_fused: tuple = ()
    builtin_configs: dict = {}

    decoder = True
    expert_inputs = ("gate_proj", "up_proj")
    expert_output = "down_proj"

    @property
    def architecture(self) -> str:
        return self.config_class_name.replace("Config", "ForCausalLM")

    # ---------------------------------------------------------------- config

    def config(self, raw):
        import transformers

        cls = getattr(transformers, self.config_class_name)
        return raw if isinstance(raw, cls) else cls.from_dict(dict(raw))

    def check_config(self, raw: dict, where: str) -> str | None:
        # read through the config class: its attribute_map renames keys (Qwen3-MoE saves num_local_experts)
        return None if getattr(self.config(raw), self.num_experts_attr, 0) else f"{where} is a {self.model_type} checkpoint with no experts"

    def dims(self, config) -> Dims:
        c = self.config(config)
        layers = c.num_hidden_layers
        moe = len(self.moe_layer_indices(c))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Dims(d_model=c.hidden_size, d_ff=getattr(c, self.d_ff_attr), num_experts=getattr(c, self.num_experts_attr),
                    top_k=c.num_experts_per_tok, num_layers=layers, moe_layers=moe, attention_width=c.num_attention_heads * head_dim,
                    dense_ff=c.intermediate_size if moe < layers else 0, vocab_size=c.vocab_size, decoder=True)

    def moe_layer_indices(self, config) -> list[int]:
        return list(range(config.num_hidden_layers))

    def act(self, config) -> nn.Module:
        from transformers.activations import ACT2FN

        return ACT2FN[self.config(config).hidden_act]

    def pad_id(self, config) -> int:
        c = self.config(config)
        return c.pad_token_id if c.pad_token_id is not None else 0

    # ---------------------------------------------------------------- checkpoint keys

    def expert_key(self, layer: int, expert: int, matrix: str) -> str:
        if expert == SHARED:
            return f"model.layers.{layer}.{self.shared}.{matrix}.weight"
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{matrix}.weight"

    def parse_expert_key(self, name: str) -> tuple[int, int, str] | None:
        """(layer, expert, matrix) of a rank-file expert key; expert SHARED for the shared expert."""
        m = self._keys()[0].match(name)
        if m:
            return int(m.group(1)), int(m.group(2)), m.group(3)
        m = self._keys()[1].match(name) if self.shared else None
        return (int(m.group(1)), SHARED, m.group(2)) if m else None

    def _keys(self) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
        """(routed expert key, shared expert key, fused in-memory key) patterns of this family."""
        if "_patterns" not in self.__dict__:
            block, shared, mats = re.escape(self.block), re.escape(self.shared), "(gate_proj|up_proj|down_proj)"
            self._patterns = (re.compile(rf"^model\.layers\.(\d+)\.{block}\.experts\.(\d+)\.{mats}\.weight$"),
                              re.compile(rf"^model\.layers\.(\d+)\.{shared}\.{mats}\.weight$"),
                              re.compile(rf"^model\.layers\.\d+\.{block}\.experts\.(gate_up_proj|down_proj)$"))
        return self._patterns

    def sliced_dim(self, matrix: str) -> int:
        return _SLICED_DIM[matrix]

    def fused_sources(self, key: str) -> list[tuple[str, int | None, int, int]]:
        """Where a rank-file expert key may sit inside a fused checkpoint tensor, in the order to try:
        (checkpoint key after `rank_key`, expert row or None, part, parts): the key's matrix is piece
        `part` of `parts` equal pieces of that row's first axis (gate and up: halves 0 and 1)."""
        parsed = self.parse_expert_key(key)
        if parsed is None:
            return []
        layer, e, matrix = parsed
        where, names, row = (self.shared, self.disk_shared_fused, None) if e == SHARED else (self.block, self.disk_fused, e)
        return [(f"model.layers.{layer}.{where}.{fused_out}", row, 0, 1) if matrix == "down_proj"
                 else (f"model.layers.{layer}.{where}.{fused_in}", row, MATRICES.index(matrix), 2) for fused_in, fused_out in names]

    def rank_key(self, disk_key: str, disk_keys: set[str]) -> str | None:
        """A checkpoint key under the in-memory module path, expert matrices under their neutral names."""
        key = disk_key.replace(f".{self.disk_block}.", f".{self.block}.") if self.disk_block != self.block else disk_key
        if self.disk_router and key.endswith(f".{self.block}.{self.disk_router}.weight"):
            key = key.removesuffix(f".{self.disk_router}.weight") + f".{self.router}.weight"
        parts = key.split(".")
        if len(parts) == 8 and parts[3:5] == [self.block, "experts"] and parts[7] == "weight" and parts[6] in self.disk_roles:
            parts[6] = self.disk_roles[parts[6]]
            return ".".join(parts)
        return key

    def expected_tensors(self, config) -> dict[str, tuple[int, ...]]:
        """Rank-file keys of the whole causal LM and their shapes: fused experts listed per expert."""
        c = self.config(config)
        shapes = {}
        for key, tensor in self.meta_model(c).state_dict().items():
            fused = self._keys()[2].match(key)
            if fused is None:
                if not (key == "lm_head.weight" and self.tied(c)):
                    shapes[key] = tuple(tensor.shape)
                continue
            prefix = key.rsplit(".", 1)[0]
            E = tensor.shape[0]
            for e in range(E):
                if fused.group(1) == "gate_up_proj":
                    F_, D = tensor.shape[1] // 2, tensor.shape[2]
                    shapes[f"{prefix}.{e}.gate_proj.weight"] = shapes[f"{prefix}.{e}.up_proj.weight"] = (F_, D)
                else:
                    shapes[f"{prefix}.{e}.down_proj.weight"] = tuple(tensor.shape[1:])
        return shapes

    def tied(self, config) -> bool:
        return bool(getattr(self.config(config), "tie_word_embeddings", False))

    # ---------------------------------------------------------------- the module tree

    def meta_model(self, config):
        """transformers' causal LM on the meta device (the LM head scores lines)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config(config))
        return model.eval()

    def moe_layers(self, model) -> list[int]:
        return [i for i, layer in enumerate(model.model.layers) if hasattr(getattr(layer, self.block), "experts")]

    def moe_block(self, model, layer: int) -> nn.Module:
        return getattr(model.model.layers[layer], self.block)

    def install(self, model, layer: int, module: nn.Module) -> None:
        """moeshard's module in place of the experts; the shared expert, if any, moves into it (its
        output is then added inside moeshard's exchange, before the partial sums are reduced)."""
        self.moe_block(model, layer).experts = module
        if self.shared:
            parent, name = self._shared_parent(model, layer)
            if getattr(parent, name) is not None:  # Granite-MoE-Shared with shared_intermediate_size 0 has none
                setattr(parent, name, ZeroOutput())

    def _shared_parent(self, model, layer: int) -> tuple[nn.Module, str]:
        path, _, name = self.shared.rpartition(".")
        return model.model.layers[layer].get_submodule(path), name

    def shared_gate_fn(self, model, layer: int):
        """The shared expert's per-token weight as a function of x_TD ([T, 1]), or None (weight 1).
        Reads the block's own gate module, so weights assigned to it later are the ones used."""
        if not self.shared_gate:
            return None
        gate = getattr(self.moe_block(model, layer), self.shared_gate)
        return lambda x_TD: torch.sigmoid(gate(x_TD))

    def tie(self, model) -> None:
        if self.tied(model.config):
            model.lm_head.weight = model.model.embed_tokens.weight

    def untied_missing(self) -> set[str]:
        return {"lm_head.weight"}

    def rebuild_buffers(self, model, device: torch.device) -> None:
        """Rotary embeddings' frequencies are computed buffers, never in a checkpoint: rebuild each off meta
        from its own config (Granite-MoE-SWA keeps one per rope theta, Mellum its buffers per layer type)."""
        for name, module in list(model.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers(recurse=False)):
                parent, _, attr = name.rpartition(".")
                with torch.device(device):
                    setattr(model.get_submodule(parent), attr, type(module)(module.config))

    def hidden_states(self, model, ids, mask) -> torch.Tensor:
        """The last hidden states (after the final norm), [B, S, D]."""
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def logits(self, model, hidden_ND: torch.Tensor) -> torch.Tensor:
        """The causal LM's next-token logits of final hidden states, as its own forward computes them."""
        return model.lm_head(hidden_ND)

    def transformers_experts(self, config, experts: list[dict[str, torch.Tensor]]):
        """transformers' own experts module of the family holding the given weights (fused once), as
        `(x_TD, ids_TK, weights_TK) -> y_TD`; its grouped_mm implementation where widths allow."""
        import importlib

        c = self.config(config)
        module = importlib.import_module(f"transformers.models.{self.model_type}.modeling_{self.model_type}")
        with torch.device("meta"):
            layer = getattr(module, self.config_class_name.replace("Config", "Experts"))(c).eval()
        layer.gate_up_proj = nn.Parameter(torch.stack([torch.cat([w["gate_proj"], w["up_proj"]]) for w in experts]), requires_grad=False)
        layer.down_proj = nn.Parameter(torch.stack([w["down_proj"] for w in experts]), requires_grad=False)
        aligned = getattr(c, self.d_ff_attr) * layer.down_proj.element_size() % 16 == 0
        c._experts_implementation = "grouped_mm" if aligned else "eager"  # CPU grouped_mm needs 16-byte rows
        return layer

    # ---------------------------------------------------------------- the oracle

    def fuse(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-expert keys -> transformers' fused `gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F]."""
        fused, experts = {}, {}
        for key, tensor in state.items():
            parsed = self.parse_expert_key(key)
            if parsed is None or parsed[1] == SHARED:  # the shared expert is an nn.Linear MLP in transformers too
                fused[key] = tensor
            else:
                layer, e, matrix = parsed
                experts.setdefault(layer, {}).setdefault(matrix, {})[e] = tensor
        for layer, mats in experts.items():
            prefix = f"model.layers.{layer}.{self.block}.experts"
            order = sorted(mats["gate_proj"])
            fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([mats["gate_proj"][e], mats["up_proj"][e]]) for e in order])
            fused[f"{prefix}.down_proj"] = torch.stack([mats["down_proj"][e] for e in order])
        return fused

    def oracle(self, config, state: dict[str, torch.Tensor]):
        """transformers' own causal LM in one process, every expert whole (it drops no token)."""
        model = self.meta_model(config)
        result = model.load_state_dict(self.fuse(state), strict=False, assign=True)
        self.tie(model)
        self.rebuild_buffers(model, torch.device("cpu"))
        missing = set(result.missing_keys) - (self.untied_missing() if self.tied(config) else set())
        if missing:
            raise RuntimeError(f"oracle weights missing: {sorted(missing)[:3]}")
        # transformers' plain per-expert loop: its grouped_mm default needs 16-byte aligned widths on CPU
        model.set_experts_implementation("eager")
        return model.eval()

    def force_router(self, model, draw) -> None:
        """Make every transformers router take its experts and weights from `draw(layer, x_TD)`; its logits
        stay its own (routers differ in their weights and bias: GPT-OSS's biased linear, HunYuan's `gate.wg`,
        Hunyuan-V3's correction bias passed in by the block)."""
        from types import MethodType

        for layer in self.moe_layers(model):
            gate = getattr(self.moe_block(model, layer), self.router)

            def forward(self, hidden_TD, *args, layer=layer, own=gate.forward, **kwargs):
                ids_TK, weights_TK = draw(layer, hidden_TD)
                return own(hidden_TD, *args, **kwargs)[0], weights_TK, ids_TK

            gate.forward = MethodType(forward, gate)

    # ---------------------------------------------------------------- built-ins

    def builtin_config(self, name: str):
        return self.config(self.builtin_configs[name])

    def init_std(self, name: str, config) -> float | None:
        """Norms are ones; everything else N(0, 1/fan_in), so tiny random models route and score with signal."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith("embed_tokens.weight") or name.endswith(f"{self.block}.{self.router}.weight"):
            return 1.0
        c = self.config(config)
        if name.endswith("down_proj.weight"):
            return getattr(c, self.d_ff_attr) ** -0.5
        if name.endswith("o_proj.weight"):
            return (c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)) ** -0.5
        return c.hidden_size**-0.5
