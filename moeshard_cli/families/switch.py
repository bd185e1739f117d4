"""Switch Transformers: the only owner of its layout in transformers and of its sharding rule.

Keys are transformers' own (`encoder.block.{i}.layer.1.mlp.experts.expert_{e}.wi.weight`), on
disk and in rank files. Rank r holds rows [lo, hi) of `wi.weight` ([d_ff, d_model]) and the same
columns of `wo.weight` ([d_model, d_ff]); because the activation is elementwise along d_ff, the
slices' outputs add up to the expert's. moeshard's `ShardedSparseMLP` replaces the whole sparse
MLP (router included): transformers' router drops tokens per sequence, which a dropless run must
not. The model `run` executes is the encoder; the decoder and the LM head are not kept.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from moeshard_cli.families import Dims

EXPERT_KEY = re.compile(r"^encoder\.block\.(\d+)\.layer\.1\.mlp\.experts\.expert_(\d+)\.(wi|wo)\.weight$")
EMBED_KEY = "shared.weight"
ENCODER_EMBED_KEY = "encoder.embed_tokens.weight"  # tied to EMBED_KEY in the model
BUILTINS = ("tiny-switch", "switch-base-8", "switch-base-16", "switch-base-32", "switch-base-64", "switch-base-128", "switch-base-256")
_SLICED_DIM = {"wi": 0, "wo": 1}  # rows of wi, columns of wo


def expert_key(layer: int, expert: int, matrix: str) -> str:
    return f"encoder.block.{layer}.layer.1.mlp.experts.expert_{expert}.{matrix}.weight"


def parse_expert_key(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, "wi" | "wo") of an encoder expert weight, or None for any other key."""
    m = EXPERT_KEY.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def switch_config(config):
    from transformers import SwitchTransformersConfig

    return config if isinstance(config, SwitchTransformersConfig) else SwitchTransformersConfig.from_dict(dict(config))


def meta_encoder(config):
    """transformers' SwitchTransformersEncoderModel on the meta device: shapes only, no memory."""
    from transformers import SwitchTransformersEncoderModel

    with torch.device("meta"):
        model = SwitchTransformersEncoderModel(switch_config(config))
    return model.eval()


def sparse_ff(model, block: int) -> nn.Module:
    """The feed-forward layer (norm + MLP + residual) of an encoder block."""
    return model.encoder.block[block].layer[-1]


def sparse_mlp(model, block: int) -> nn.Module:
    return sparse_ff(model, block).mlp


class SwitchFamily:
    name = model_type = "switch_transformers"
    decoder = False
    expert_inputs = ("wi",)
    expert_output = "wo"
    architecture = "SwitchTransformersEncoderModel"

    # ---------------------------------------------------------------- config

    def config(self, raw):
        return switch_config(raw)

    def check_config(self, raw: dict, where: str) -> str | None:
        """Why a config of this model_type cannot be sharded, or None."""
        return None if raw.get("num_experts") else f"{where} is a dense switch_transformers checkpoint with no experts"

    def dims(self, config) -> Dims:
        c = switch_config(config)
        return Dims(d_model=c.d_model, d_ff=c.d_ff, num_experts=c.num_experts, top_k=1, num_layers=c.num_layers,
                    moe_layers=c.num_sparse_encoder_layers, attention_width=c.num_heads * c.d_kv, dense_ff=c.d_ff,
                    vocab_size=c.vocab_size, decoder=False)

    def act(self, config) -> nn.Module:
        from transformers.activations import ACT2FN

        return ACT2FN[switch_config(config).dense_act_fn]

    def pad_id(self, config) -> int:
        return switch_config(config).pad_token_id or 0

    # ---------------------------------------------------------------- checkpoint keys

    expert_key = staticmethod(expert_key)
    parse_expert_key = staticmethod(parse_expert_key)

    def sliced_dim(self, matrix: str) -> int:
        return _SLICED_DIM[matrix]

    def rank_key(self, disk_key: str, disk_keys: set[str]) -> str | None:
        """The rank-file key a checkpoint tensor becomes, or None if it is not kept (decoder, LM head)."""
        if disk_key == ENCODER_EMBED_KEY:  # tied to `shared`: one copy, under the shared name
            return None if EMBED_KEY in disk_keys else EMBED_KEY
        return disk_key if disk_key.startswith("encoder.") or disk_key == EMBED_KEY else None

    def expected_tensors(self, config) -> dict[str, tuple[int, ...]]:
        """Rank-file keys of the whole (unsliced) encoder and their shapes, from a meta-device build."""
        return {k: tuple(v.shape) for k, v in meta_encoder(config).state_dict().items() if k != ENCODER_EMBED_KEY}

    # ---------------------------------------------------------------- the module tree

    def meta_model(self, config):
        return meta_encoder(config)

    def moe_layers(self, model) -> list[int]:
        """Blocks whose MLP is transformers' SwitchTransformersSparseMLP (before any is replaced)."""
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

        return [i for i in range(len(model.encoder.block)) if isinstance(sparse_mlp(model, i), SwitchTransformersSparseMLP)]

    def moe_block(self, model, layer: int) -> nn.Module:
        """The module whose time is one MoE layer's (norm + MLP + residual)."""
        return sparse_ff(model, layer)

    def install(self, model, layer: int, module: nn.Module) -> None:
        sparse_ff(model, layer).mlp = module

    def tie(self, model) -> None:
        model.encoder.embed_tokens.weight = model.shared.weight

    def untied_missing(self) -> set[str]:
        return {ENCODER_EMBED_KEY}

    def rebuild_buffers(self, model, device: torch.device) -> None:
        """Switch has no computed buffers."""

    def hidden_states(self, model, ids, mask) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    def transformers_experts(self, config, experts: list[dict[str, torch.Tensor]]):
        """transformers' own SwitchTransformersExperts holding the given weights (no copy), as
        `(x_TD, ids_TK, weights_TK) -> y_TD` for a top-1 assignment."""
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts

        with torch.device("meta"):
            module = SwitchTransformersExperts(switch_config(config)).eval()
        for e, weights in enumerate(experts):
            expert = module[f"expert_{e}"]
            expert.wi.weight = nn.Parameter(weights["wi"], requires_grad=False)
            expert.wo.weight = nn.Parameter(weights["wo"], requires_grad=False)
        E = len(experts)
        return lambda x_TD, ids_TK, weights_TK: module(x_TD, torch.nn.functional.one_hot(ids_TK[:, 0], E)[:, None, :], weights_TK)

    # ---------------------------------------------------------------- the oracle

    def oracle(self, config, state: dict[str, torch.Tensor]):
        """transformers' own encoder in one process, made dropless (capacity >= any sequence)."""
        model = meta_encoder(config)
        model.load_state_dict(state, strict=False, assign=True)
        self.tie(model)
        for i in self.moe_layers(model):
            sparse_mlp(model, i).router.expert_capacity = 10**9
        return model.eval()

    def force_router(self, model, draw) -> None:
        """Make every transformers router of `model` take its experts from `draw(layer, logits_TE, dtype)`."""
        from types import MethodType

        import torch.nn.functional as F

        for layer in self.moe_layers(model):
            router = sparse_mlp(model, layer).router

            def forward(self, hidden_BSD, layer=layer):
                B, S, _ = hidden_BSD.shape
                logits = self.classifier.float()(hidden_BSD.to(torch.float32)).view(B * S, -1)
                expert_T, prob_T = draw(layer, logits, hidden_BSD.dtype)
                return F.one_hot(expert_T, self.num_experts).view(B, S, -1), prob_T.view(B, S, 1), logits.view(B, S, -1)

            router.forward = MethodType(forward, router)

    # ---------------------------------------------------------------- built-ins

    def builtin_config(self, name: str):
        from transformers import SwitchTransformersConfig

        if name == "tiny-switch":
            # d_ff=130 divides by neither 3 nor 4, so uneven slices are the normal case.
            return SwitchTransformersConfig(
                vocab_size=384, d_model=64, d_kv=16, d_ff=130, num_heads=4, num_layers=4,
                num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                num_experts=8, expert_capacity=64, relative_attention_num_buckets=32,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )
        # The architecture of google/switch-base-E (transformers' defaults are switch-base-8).
        return SwitchTransformersConfig(
            vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12,
            num_decoder_layers=12, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6,
            num_experts=int(name.rsplit("-", 1)[1]), expert_capacity=64,
        )

    def init_std(self, name: str, config) -> float | None:
        """Standard deviation of a built-in tensor (transformers' `_init_weights`), None for norms (ones)."""
        c = switch_config(config)
        d, kv, h = c.d_model, c.d_kv, c.num_heads
        if name.endswith("layer_norm.weight"):
            return None
        if name.endswith("router.classifier.weight") or name == EMBED_KEY:
            return 1.0
        if parse_expert_key(name):
            return d**-0.5
        if name.endswith("mlp.wo.weight"):
            return c.d_ff**-0.5
        if name.endswith(".q.weight"):
            return (d * kv) ** -0.5
        if name.endswith(".o.weight"):
            return (h * kv) ** -0.5
        return d**-0.5


FAMILY = SwitchFamily()
