"""Quantized checkpoints: `shard` dequantizes them, one tensor (or one expert) at a time, to exactly
what transformers' own dequantized load holds, and refuses the methods it cannot read.

- MXFP4 (GPT-OSS on the hub): a tiny GPT-OSS whose expert matrices are stored as random
  `*_blocks` / `*_scales` (FP4 codes, power-of-two scales), experts 64 wide (MXFP4 packs the
  contracted axis in blocks of 32), 3 workers (22/21/21).
- FP8 with block scales (Qwen3-*-FP8, DeepSeek-V3/R1): a tiny Qwen3-MoE whose linear weights are
  quantized by transformers' own `Fp8Quantize` in 16 x 16 blocks, experts 48 wide, 5 workers
  (10/10/10/9/9).

The oracle is `from_pretrained(..., quantization_config=Mxfp4Config / FineGrainedFP8Config(dequantize=True))`
on the CPU, in float32 and in bfloat16; the rank files must reassemble to its parameters bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import invoke
from moeshard_cli.families import builtin_family
from moeshard_cli.reference import reassemble_state
from moeshard_cli.shard.manifest import read_shard_set
from test_run import error_line

MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [16, 16]}


def save_quantized(model, path: Path, quantize, quantization_config: dict) -> Path:
    """`model.save_pretrained` with its tensors passed through `quantize(name, tensor) -> {name: tensor}`."""
    from moeshard_cli.shard.sources import byte_tokenizer

    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    state = {}
    for name, tensor in load_file(str(path / "model.safetensors")).items():
        state.update(quantize(name, tensor))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return path


def random_model(name: str, **changes):
    from transformers import AutoModelForCausalLM

    config = builtin_family(name).builtin_config(name)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(1)

    def quantize(name, tensor):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: tensor}
        E, rows, cols = tensor.shape  # [E, D, 2F] / [E, F, D] in memory: blocks are [E, cols, rows / 32, 16]
        return {f"{name}_blocks": torch.randint(0, 256, (E, cols, rows // 32, 16), generator=gen, dtype=torch.uint8),
                f"{name}_scales": torch.randint(118, 130, (E, cols, rows // 32), generator=gen, dtype=torch.uint8)}

    return save_quantized(random_model("tiny-gpt-oss", intermediate_size=64), tmp_path_factory.mktemp("mxfp4") / "ckpt", quantize, MXFP4)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> Path:
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=FP8["weight_block_size"])))

    def quantize(name, tensor):  # every linear weight but the router (mlp.gate) and the LM head, as Qwen3-*-FP8
        return op._quantize_one(name, tensor) if name.endswith("proj.weight") else {name: tensor}

    return save_quantized(random_model("tiny-qwen3-moe", moe_intermediate_size=48), tmp_path_factory.mktemp("fp8") / "ckpt", quantize, FP8)


def transformers_dequantized(source: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    method = json.loads((source / "config.json").read_text())["quantization_config"]["quant_method"]
    config = Mxfp4Config(dequantize=True) if method == "mxfp4" else FineGrainedFP8Config(dequantize=True, weight_block_size=FP8["weight_block_size"])
    return AutoModelForCausalLM.from_pretrained(str(source), quantization_config=config, dtype=dtype).state_dict()


@pytest.mark.parametrize("kind, world, slices", [("mxfp4", 3, [(0, 22), (22, 43), (43, 64)]),
                                                 ("fp8", 5, [(0, 10), (10, 20), (20, 30), (30, 39), (39, 48)])])
def test_rank_files_reassemble_to_transformers_dequantized_load(request, tmp_path, kind, world, slices):
    source = request.getfixturevalue(f"{kind}_checkpoint")
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert {"mxfp4": "U8", "fp8": "F8_E4M3"}[kind] in dtypes  # the checkpoint really is quantized
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / dtype
        code, stdout, err = invoke(["shard", source, "--gpus", world, "--out", out, "--dtype", dtype])
        assert code == 0, err
        assert f"dtype {dtype}, dequantized from {kind}" in " ".join(stdout.split())
        shards = read_shard_set(out)
        assert shards.data["dequantized_from"] == kind and shards.slices == slices
        assert "quantization_config" not in json.loads((out / "config.json").read_text())  # the rank files are not quantized
        with safe_open(str(shards.rank_file(1)), "pt") as f:  # rank 1 holds slices only
            if kind == "mxfp4":
                assert f.get_slice("model.layers.0.mlp.experts.2.gate_up_proj").get_shape() == [64, 2 * 21]
            else:
                assert f.get_slice("model.layers.0.mlp.experts.2.down_proj.weight").get_shape() == [64, 10]
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16" if dtype == "bfloat16" else "F32"}
        got = shards.family.fuse(reassemble_state(shards))
        want = transformers_dequantized(source, getattr(torch, dtype))
        assert set(got) == set(want)
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{dtype}: {key} differs from transformers' dequantized load"


def test_mxfp4_experts_are_dequantized_one_at_a_time(mxfp4_checkpoint, monkeypatch):
    """Streaming: every call of transformers' MXFP4 decoder gets one expert, never a layer's fused tensor."""
    import transformers.integrations.mxfp4 as mxfp4

    from moeshard_cli.shard.sources import resolve

    calls, real = [], mxfp4.convert_moe_packed_tensors
    monkeypatch.setattr(mxfp4, "convert_moe_packed_tensors", lambda blocks, scales, **kw: calls.append(blocks.shape[0]) or real(blocks, scales, **kw))
    source = resolve(str(mxfp4_checkpoint))
    experts = [t for t in source.tensors if source.family.parse_expert_key(t.name) and t.name.endswith(("gate_up_proj", ".down_proj"))]
    assert len(experts) == 2 * 2 * 8
    for entry in experts[:5]:
        assert entry.load().shape == entry.shape
    assert calls == [1] * 5


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes"])
def test_other_quantizations_are_refused_before_reading_weights(tmp_path, method):
    source = tmp_path / "ckpt"
    random_model("tiny-qwen3-moe").config.save_pretrained(str(source))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method, "bits": 4}}))
    (source / "model.safetensors").write_bytes(b"not read")  # corrupt: reading it would fail with another message
    code, _, err = invoke(["shard", source, "--gpus", 2, "--out", tmp_path / "out"])
    line = error_line(err)
    assert code == 2 and f"is quantized with {method}, which moeshard cannot dequantize" in line and "unquantized" in line, line
    assert not (tmp_path / "out").exists()
