"""The output file of `moeshard run`: safetensors, written under a temporary name and renamed."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeshard_cli.errors import UserError


def check_writable(path: Path, flag: str = "--output") -> None:
    """Fail before any work if the file `flag` names cannot be created."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory", "pass a file path")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"cannot write {flag} {path}: {parent} {what}", f"create the directory or choose another {flag}")
    probe = parent / f".{path.name}.probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {flag} {path} ({exc.strerror})", f"choose a writable location for {flag}") from exc


def write_embeddings(path: Path, results: dict[int, torch.Tensor], pooling: str, metadata: dict[str, str]) -> None:
    """results maps line index -> [d_model] (mean pooling) or [tokens, d_model] (no pooling)."""
    n = len(results)
    rows = [results[i] for i in range(n)]
    if pooling == "mean":
        tensors = {"embeddings": torch.stack(rows).float().contiguous()}
    else:
        lengths = torch.tensor([0] + [r.shape[0] for r in rows], dtype=torch.int64)
        tensors = {"hidden_states": torch.cat(rows).float().contiguous(), "offsets": torch.cumsum(lengths, 0)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
