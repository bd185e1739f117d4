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

from moeshard_cli.dtypes import SAFETENSORS_CODES
from moeshard_cli.files import publish, temporary_sibling

WRITE_CHUNK = 1 << 17


class StreamingSafetensorsWriter:
    """Writes `layout` (name -> (shape, dtype)) in order to `tmp_path`; `commit()` renames it to `path`."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]):
        self.path, self.tmp_path = path, temporary_sibling(path)
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._expected = []
        for name, shape, dtype in layout:
            nbytes = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, tuple(shape), dtype))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        self.header_bytes = 8 + len(blob)  # written here, before any tensor
        self.size = self.header_bytes + offset
        self._hash = hashlib.sha256()
        self._next = 0
        self._file = open(self.tmp_path, "wb")
        try:
            self._emit(len(blob).to_bytes(8, "little") + blob)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor of the layout; returns its size in bytes."""
        data = self.prepare(name, tensor)
        self._emit(data)
        return data.nbytes

    def prepare(self, name: str, tensor: torch.Tensor):
        """Check `tensor` is the next one in the layout and return its raw bytes, to pass to `hash` and `append`.

        Split from `write` so a caller can hash and write on two threads at once (both release the
        GIL); it must finish both for one tensor before it prepares the next.
        """
        exp_name, exp_shape, exp_dtype = self._expected[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (exp_name, exp_shape, exp_dtype):
            raise RuntimeError(f"writer expected {exp_name} {exp_shape} {exp_dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._next += 1
        return tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()

    def hash(self, data) -> None:
        self._hash.update(data)

    def append(self, data) -> None:
        # In 128 KiB pieces: on the machine measured in docs/shard.md one multi-megabyte write()
        # cost 2-4x the kernel time of the same bytes written in 128 KiB pieces.
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):
            self._file.write(view[start:start + WRITE_CHUNK])

    def _emit(self, data) -> None:
        self.hash(data)
        self.append(data)

    def commit(self) -> str:
        """Flush, fsync and rename into place; returns the sha256 of the file."""
        if self._next != len(self._expected):
            raise RuntimeError(f"{self.path.name}: {len(self._expected) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        publish(self.tmp_path, self.path)
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
