"""Quantized checkpoints: their tensors listed dequantized, each read (one expert at a time where it
is fused) through transformers' own dequantization code.

- `mxfp4` (GPT-OSS on the hub): `X_blocks` [E, R, G, 16] uint8 (two FP4 values a byte) and
  `X_scales` [E, R, G] uint8 (a power-of-two exponent per 32 values) become `X` [E, G*32, R]:
  `transformers.integrations.mxfp4.convert_moe_packed_tensors`, which also transposes to the
  in-memory [E, D, 2F] / [E, F, D] layout.
- `fp8` (DeepSeek-V3/R1, Qwen3-*-FP8): `X.weight` float8_e4m3fn with `X.weight_scale_inv`
  float32 per block (`weight_block_size`, e.g. 128 x 128; the last block of a row or column may be
  partial, as DeepSeek-V3's kv_a_proj_with_mqa [576, 7168] is) become `X.weight`:
  `transformers.integrations.finegrained_fp8._dequantize_fp8_weight`.

Values come out in float32 (exact: an FP4 or FP8 value times its scale), and `shard --dtype`
casts them as it casts any tensor: the same rounding transformers' dequantized load does into
its model's dtype. Any other `quantization_config` (awq, gptq, bitsandbytes, compressed-tensors,
...) is refused from config.json alone, before a weight is read.
"""

from __future__ import annotations

import functools

import torch

from moeshard_cli.errors import UserError

METHODS = ("mxfp4", "fp8")
_FIX = "use the model's unquantized (bf16/fp32) checkpoint"


def quantization(raw_config: dict, where: str) -> dict | None:
    """config.json's `quantization_config`, None if the checkpoint is not quantized; UserError for a method moeshard cannot read."""
    quant = raw_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in METHODS:
        raise UserError(f"{where} is quantized with {method or 'an unnamed method'}, which moeshard cannot dequantize "
                        f"(it reads {' and '.join(METHODS)} block-scaled checkpoints)", _FIX)
    return quant


def dequantized(entries: dict, quant: dict, where: str) -> dict:
    """Checkpoint entries {name: TensorEntry} with every quantized tensor replaced by its float32 value."""
    if quant["quant_method"] == "mxfp4":
        return _mxfp4(entries, where)
    return _fp8(entries, quant.get("weight_block_size"), where)


def _mxfp4(entries: dict, where: str) -> dict:
    from moeshard_cli.shard.sources import TensorEntry

    out = {}
    for name, entry in entries.items():
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in entries:
            continue
        if not name.endswith("_blocks"):
            out[name] = entry
            continue
        base = name.removesuffix("_blocks")
        scales = entries.get(base + "_scales")
        if scales is None or len(entry.shape) != 4 or entry.shape[:-1] != scales.shape:
            raise UserError(f"{where}: {name} {list(entry.shape)} has no matching {base}_scales", "the mxfp4 checkpoint is incomplete or damaged")
        E, R, G, B = entry.shape
        out[base] = TensorEntry(base, (E, G * B * 2, R), torch.float32, functools.partial(_mxfp4_load, entry, scales),
                                functools.partial(_mxfp4_row, entry, scales))
    return out


def _mxfp4_load(blocks, scales) -> torch.Tensor:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks.load(), scales.load(), dtype=torch.float32)


def _mxfp4_row(blocks, scales, e: int) -> torch.Tensor:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks.row(e)[None], scales.row(e)[None], dtype=torch.float32)[0]


def _fp8(entries: dict, block: list[int] | None, where: str) -> dict:
    from moeshard_cli.shard.sources import TensorEntry

    out = {}
    for name, entry in entries.items():
        if name.endswith(("_scale_inv", ".input_scale", ".activation_scale")):
            continue  # consumed below, or an activation scale a dequantized model does not use
        scales = entries.get(name + "_scale_inv")
        if scales is None:
            out[name] = entry
            continue
        if block and tuple(scales.shape[-2:]) != tuple(-(-n // b) for n, b in zip(entry.shape[-2:], block)):
            raise UserError(f"{where}: {name}_scale_inv {list(scales.shape)} does not tile {name} {list(entry.shape)} "
                            f"in blocks of {block}", "the fp8 checkpoint is incomplete or does not match its config.json")
        out[name] = TensorEntry(name, entry.shape, torch.float32, functools.partial(_fp8_load, entry, scales, block),
                                functools.partial(_fp8_row, entry, scales, block) if len(entry.shape) > 2 else None)
    return out


def _fp8_value(weight: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(weight, scale_inv, block, torch.float32)


def _fp8_load(weight, scales, block) -> torch.Tensor:
    return _fp8_value(weight.load(), scales.load(), block)


def _fp8_row(weight, scales, block, e: int) -> torch.Tensor:
    return _fp8_value(weight.row(e), scales.row(e), block)
