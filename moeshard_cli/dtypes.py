"""The one table of data types: names on the command line and in manifests, torch dtypes, safetensors codes."""

from __future__ import annotations

import torch

from moeshard_cli.choices import DTYPE_NAMES

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))  # --dtype of a shard set
SAFETENSORS_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                     torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
                     # quantized checkpoints (read and dequantized by shard, never written)
                     torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0"}
FROM_SAFETENSORS = {code: dtype for dtype, code in SAFETENSORS_CODES.items()}
