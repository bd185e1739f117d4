"""Streaming safetensors writer: the header first, then tensors one at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; sharding a 30 GB
checkpoint on a 24 GiB machine cannot afford that. The format is simple (8-byte header
length, JSON header, raw little-endian bytes), so the header is laid out from shapes
alone and the bytes are appended as they come, hashed on the way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class StreamingSafetensorsWriter:
    """Writes `layout` (name -> (shape, dtype)) in order to `tmp_path`; `commit()` renames it to `path`."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]):
        self.path, self.tmp_path = path, path.with_name(f".{path.name}.tmp-{os.getpid()}")
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._expected = []
        for name, shape, dtype in layout:
            nbytes = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, tuple(shape), dtype))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self.size = 8 + len(blob) + offset
        self._hash = hashlib.sha256()
        self._file = open(self.tmp_path, "wb")
        self._emit(len(blob).to_bytes(8, "little") + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> int:
        exp_name, exp_shape, exp_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (exp_name, exp_shape, exp_dtype):
            raise RuntimeError(f"writer expected {exp_name} {exp_shape} {exp_dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        self._emit(data)
        self._next += 1
        return data.nbytes

    def _emit(self, data) -> None:
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> str:
        """Flush, fsync and rename into place; returns the sha256 of the file."""
        if self._next != len(self._expected):
            raise RuntimeError(f"{self.path.name}: {len(self._expected) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
