"""`moeshard.json`: what a shard set holds, and the checks `run` makes before starting workers."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from moeshard_cli.dtypes import DTYPES
from moeshard_cli.errors import UserError
from moeshard_cli.files import write_json_atomic

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
    def family(self):
        """The model family the set was cut from (sets written before families were Switch)."""
        from moeshard_cli.families import family_of

        return family_of(self.data.get("family", "switch_transformers"))

    @property
    def dims(self):
        """The model's Dims as `shard` recorded them (no transformers import in the launcher); older sets: from the config."""
        from moeshard_cli.families import Dims

        if isinstance(self.data.get("dims"), dict):
            return Dims(**self.data["dims"])
        return self.family.dims(self.config)

    @property
    def source_label(self) -> str:
        return self.data["source"]["id"]


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
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise UserError(f"{manifest} has format version {version}, this moeshard reads {FORMAT_VERSION}", "re-shard with this version of moeshard")
    problem = _schema_problem(data) or _family_problem(data)
    if problem:
        raise UserError(f"{manifest} is corrupt ({problem})", "re-run `moeshard shard ... --force` to rewrite the shard set")
    return ShardSet(root, data)


# What `run` and `bench` read from a manifest, and the type each must have.
_FIELDS = {"world_size": int, "dtype": str, "config": dict, "slices": list, "files": list, "source": dict}
_FILE_FIELDS = {"rank": int, "name": str, "bytes": int, "sha256": str}


def _schema_problem(data: dict) -> str | None:
    for key, kind in _FIELDS.items():
        if key not in data:
            return f"no {key!r}"
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            return f"{key!r} is {data[key]!r}, not a {kind.__name__}"
    world, files, slices = data["world_size"], data["files"], data["slices"]
    if world < 1:
        return f"world size {world}"
    # every number is checked against the lists it counts before anything is sized from it
    # (a world size of 10^9 once filled the memory)
    if world != len(files) or world != len(slices):
        return f"it says world size {world} but lists {len(files)} rank files and {len(slices)} slices"
    if data["dtype"] not in DTYPES:
        return f"unknown dtype {data['dtype']!r}"
    if not isinstance(data["source"].get("id"), str):
        return "no source id"
    for rank, entry in enumerate(files):
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), kind) or isinstance(entry.get(k), bool)
                                              for k, kind in _FILE_FIELDS.items()):
            return f"a rank file entry lacks one of {', '.join(_FILE_FIELDS)}"
        if entry["rank"] != rank or entry["bytes"] < 0:
            return f"rank file entry {rank} says rank {entry['rank']}, {entry['bytes']} bytes"
        if not _plain_name(entry["name"]):
            return f"rank file name {entry['name']!r} is not a plain file name inside the shard set"
    if any(not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)) for s in slices):
        return "a slice is not [lo, hi]"
    ends = [0] + [hi for _, hi in slices]
    if any(lo != ends[r] or hi <= lo for r, (lo, hi) in enumerate(slices)):
        return f"the slices {slices} do not follow each other from 0"
    if isinstance(data.get("d_ff"), int) and ends[-1] != data["d_ff"]:
        return f"the slices end at {ends[-1]}, d_ff is {data['d_ff']}"
    return None


def _family_problem(data: dict) -> str | None:
    from dataclasses import fields

    from moeshard_cli.families import Dims, family_of

    try:
        family_of(data.get("family", "switch_transformers"))
    except ValueError as exc:
        return f"its model family: {exc}"
    dims = data.get("dims")
    if dims is not None:
        kinds = {f.name: bool if f.name == "decoder" else int for f in fields(Dims)}
        if not isinstance(dims, dict) or set(dims) != set(kinds) or any(type(dims[k]) is not kind for k, kind in kinds.items()):
            return f"'dims' is not the model's dimensions ({', '.join(kinds)})"
    return None


def _plain_name(name: str) -> bool:
    """A rank file lives in the shard set's own folder: no separators, no parent, nothing empty."""
    return name not in ("", ".", "..") and not any(c in name for c in ("/", "\\", "\0"))


def check_files(shards: ShardSet, verify: bool = False, ranks: list[int] | None = None) -> None:
    """Sizes and safetensors headers of the rank files `ranks` (default all); their sha256 with verify."""
    world, files = shards.world_size, shards.data["files"]  # read_shard_set checked they agree
    chosen = [files[r] for r in (range(world) if ranks is None else ranks)]
    root = shards.root.resolve()
    for entry in chosen:
        path = shards.root / entry["name"]
        if not path.is_file():
            raise UserError(f"rank file {path} is missing", "re-run `moeshard shard ... --force` to rewrite the shard set")
        if path.resolve().parent != root:
            raise UserError(f"rank file {path} links out of the shard set (to {path.resolve()})",
                            "copy the file into the shard set's folder, or re-shard with --force")
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
    if verify:
        verify_checksums(shards, chosen)


def verify_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moeshard" / "verified-rank-files.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()  # ctime changes with any write and cannot be set back by tools like touch or cp -p
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def verify_checksums(shards: ShardSet, entries: list[dict]) -> None:
    """sha256 of each rank file against the manifest, in parallel; a file whose size, times and inode
    are unchanged since it last passed is not read again (the cache lives in the user's cache dir)."""
    cache_file = verify_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    todo = []
    for entry in entries:
        path = shards.root / entry["name"]
        seen = cache.get(str(path.resolve()))
        if not (seen and seen["stamp"] == _stamp(path) and seen["sha256"] == entry["sha256"]):
            todo.append((path, entry))
    if not todo:
        return
    with ThreadPoolExecutor(min(4, len(todo))) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda item: sha256_file(item[0]), todo))
    for (path, entry), digest in zip(todo, digests):
        if digest != entry["sha256"]:
            raise UserError(f"rank file {path.name} fails its sha256 checksum", "the file is corrupt or from another shard set: re-shard with --force")
        cache[str(path.resolve())] = {"stamp": _stamp(path), "sha256": digest}
    cache = {k: v for k, v in cache.items() if Path(k).exists()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, cache)
    except OSError:
        pass  # a read-only home only costs the next run a re-read


DEMO_ROOT = Path("moeshard-demo")  # where `moeshard demo` leaves its set


def find_shard_sets(roots: tuple[Path, ...] = (DEFAULT_ROOT, DEMO_ROOT)) -> list[Path]:
    """The complete shard sets one level under `roots` (default: ./moeshard-shards, ./moeshard-demo)."""
    return sorted(p.parent for root in roots if root.is_dir() for p in root.glob(f"*/{MANIFEST}"))


def default_shard_set(world: int | None = None, note=None) -> Path:
    """The shard set `run` uses without --shards or --model: the one found in ./moeshard-shards or
    ./moeshard-demo (for `world` workers when given); of several, the newest, named through `note`."""
    found = find_shard_sets()
    fits = [p for p in found if world is None or _world_of(p) == world]
    if not fits:
        where = f"./{DEFAULT_ROOT} or ./{DEMO_ROOT}"
        if found:
            raise UserError(f"no shard set for {world} workers under {where} (found {', '.join(str(p) for p in found)})",
                            f"pass --model SOURCE --gpus {world} to cut one on first use, or --shards DIR")
        raise UserError(f"no shard set found under {where}",
                        "pass --model SOURCE --gpus N (e.g. --model tiny-switch --gpus 2) to cut one on first use, or --shards DIR")
    newest = max(fits, key=lambda p: (p / MANIFEST).stat().st_mtime_ns)
    if len(fits) > 1 and note:
        others = ", ".join(str(p) for p in fits if p != newest)
        note(f"using {newest}, the newest of {len(fits)} shard sets found (also: {others}); pass --shards DIR to choose")
    return newest


def _world_of(root: Path) -> int | None:
    try:
        return int(json.loads((root / MANIFEST).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
