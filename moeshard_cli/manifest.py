"""`moeshard.json`: what a shard set holds, and the checks `run` makes before starting workers."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from moeshard_cli.errors import UserError

MANIFEST = "moeshard.json"
FORMAT_VERSION = 1
DEFAULT_ROOT = Path("moeshard-shards")


@dataclass
class ShardSet:
    root: Path
    data: dict

    @property
    def world_size(self) -> int:
        return int(self.data["world_size"])

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def slices(self) -> list[tuple[int, int]]:
        return [tuple(s) for s in self.data["slices"]]

    def rank_file(self, rank: int) -> Path:
        return self.root / self.data["files"][rank]["name"]

    @property
    def source_label(self) -> str:
        return self.data["source"]["id"]


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_shard_set(root: Path) -> ShardSet:
    manifest = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"shard set {root} does not exist", "run `moeshard shard SOURCE --gpus N` first, or pass --shards DIR")
    if not manifest.is_file():
        raise UserError(f"{root} is not a complete shard set (no {MANIFEST})", "re-run `moeshard shard ... --force` into it")
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{manifest} is corrupt ({exc})", "re-run `moeshard shard ... --force` to rewrite the shard set") from exc
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{manifest} has format version {data.get('format_version')}, this moeshard reads {FORMAT_VERSION}", "re-shard with this version of moeshard")
    return ShardSet(root, data)


def check_files(shards: ShardSet, verify: bool = False) -> None:
    """Sizes and safetensors headers always; full sha256 checksums with verify."""
    world, files = shards.world_size, shards.data["files"]
    if [f["rank"] for f in files] != list(range(world)) or len(shards.slices) != world:
        raise UserError(f"{shards.root}/{MANIFEST} says world size {world} but lists {len(files)} rank files and {len(shards.slices)} slices",
                        "the manifest was edited or the shard set is incomplete: re-shard with --force")
    for entry in shards.data["files"]:
        path = shards.root / entry["name"]
        if not path.is_file():
            raise UserError(f"rank file {path} is missing", "re-run `moeshard shard ... --force` to rewrite the shard set")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"rank file {path.name} has {size} bytes, the manifest says {entry['bytes']}", "the file is truncated or replaced: re-shard with --force")
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            meta = header.get("__metadata__", {})
        except Exception as exc:
            raise UserError(f"rank file {path.name} has a corrupt header", "re-shard with --force") from exc
        if 8 + header_len + end != size or meta.get("moeshard_rank") != str(entry["rank"]):
            raise UserError(f"rank file {path.name} does not match the manifest", "re-shard with --force")
        if verify and sha256_file(path) != entry["sha256"]:
            raise UserError(f"rank file {path.name} fails its sha256 checksum", "the file is corrupt: re-shard with --force")


def find_shard_sets(root: Path = DEFAULT_ROOT) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))


def default_shard_set() -> Path:
    """The one shard set under ./moeshard-shards, as `moeshard shard` writes it by default."""
    found = find_shard_sets()
    if not found:
        raise UserError(f"no shard set found under ./{DEFAULT_ROOT}", "run `moeshard shard` first, or pass --shards DIR")
    if len(found) > 1:
        raise UserError(f"several shard sets found: {', '.join(str(p) for p in found)}", "choose one with --shards DIR")
    return found[0]
