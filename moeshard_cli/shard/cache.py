"""Shard sets cut on first use (`moeshard run --model X --gpus N`, the Python API) and kept for reuse.

Each set lives in `$MOESHARD_CACHE` (default `~/.cache/moeshard/shards`, under `$XDG_CACHE_HOME`
when set) in a folder named after a key of everything that decides its bytes:
- the source's identity: a built-in's name and the moeshard version (its config and weights come
  from this code), a hub id and the commit its revision resolves to, or a local checkpoint's
  absolute path with the name, size and modification time of every file in it (a stat
  fingerprint, as make uses: hashing a 100 GB checkpoint on every run would cost minutes);
- the number of workers and the dtype.
A new set is cut into a temporary folder beside its final one and renamed into place: two first
uses at once each cut their own, one rename wins and the other's folder is removed, and a
folder under a final name is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from moeshard_cli import __version__
from moeshard_cli.errors import UserError
from moeshard_cli.shard.manifest import FORMAT_VERSION, MANIFEST

CACHE_ENV = "MOESHARD_CACHE"
TEMP_PREFIX = ".cutting-"  # + pid + "-": a killed cut's folder is reclaimed by the next one


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moeshard" / "shards"


def source_identity(source: str, revision: str | None = None) -> dict:
    """What the source's bytes depend on, without reading its weights (see the module's docstring)."""
    from moeshard_cli.shard import builtin
    from moeshard_cli.shard.sources import HUB_ID, resolve

    if builtin.is_builtin(source):
        return {"kind": "builtin", "id": source, "moeshard": __version__}
    path = Path(source).expanduser()
    if path.is_dir():
        root = path.resolve()
        files = sorted((str(p.relative_to(root)), st.st_size, st.st_mtime_ns)
                       for p in root.rglob("*") if p.is_file() and (st := p.stat()))
        return {"kind": "local", "path": str(root), "files": files}
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        # the snapshot folder is named after the commit the revision resolves to (offline: the cached one)
        return {"kind": "hub", "id": source, "commit": Path(resolve(source, revision).path).name}
    resolve(source, revision)  # raises the one-line error that says what the source is not
    raise AssertionError(source)


def cache_key(source: str, gpus: int, dtype: str, revision: str | None = None) -> str:
    identity = {"source": source_identity(source, revision), "world_size": gpus, "dtype": dtype, "format_version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_set_dir(source: str, gpus: int, dtype: str = "float32", revision: str | None = None) -> Path:
    """Where the set for these arguments lives (or will): `<name>-w<gpus>-<dtype>-<key>`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).name or "model")
    return cache_root() / f"{name}-w{gpus}-{dtype}-{cache_key(source, gpus, dtype, revision)}"


def ensure_shard_set(source: str, gpus: int, dtype: str = "float32", revision: str | None = None,
                     progress=None, on_cut=None) -> Path:
    """The cached shard set of `source` for `gpus` workers, cut now if it is not there yet.
    `on_cut(ShardResult)` is called when this call cut it; `progress` as `shard` takes it."""
    from moeshard_cli.shard.command import ShardOptions, shard

    ShardOptions(source, gpus, None, dtype, revision).validate()  # --gpus and --dtype before any work
    final = cached_set_dir(source, gpus, dtype, revision)
    if (final / MANIFEST).is_file():
        return final
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the shard cache {root} ({exc.strerror})", f"set {CACHE_ENV} to a folder you can write to") from exc
    _reclaim(root)
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=root))  # one per cut, threads included
    try:
        result = shard(ShardOptions(source, gpus, temp, dtype, revision), progress)
        try:
            os.rename(temp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a lost race: a real failure
                raise
            return final  # another process cut the same set first: theirs is as good
        result.out = final
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    if on_cut:
        on_cut(result)
    return final


def _reclaim(root: Path) -> None:
    """Remove the temporary folders of cuts whose process is gone (killed mid-way)."""
    from moeshard_cli.launch import process_alive

    for path in root.glob(f"{TEMP_PREFIX}*"):
        match = re.match(rf"{re.escape(TEMP_PREFIX)}(\d+)-", path.name)
        if match and not process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _workers(gpus: int | None) -> int:
    return default_workers() if gpus is None else gpus


def default_workers() -> int:
    """Workers when --gpus is not given with --model: one per GPU, else 2 CPU workers (as `bench`)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() and torch.cuda.device_count() else 2


def shard_set_for(model: str | None, shards: Path | None, gpus: int | None, dtype: str | None = None,
                  revision: str | None = None, note=None) -> Path:
    """Where the shard set of a run is, or will be once `ensure_shard_set` cut it: --shards as given;
    --model's set (itself, if it is a set for --gpus workers; else its cached cut); else the one found
    in the working folder (manifest.default_shard_set). --gpus must agree with a given set."""
    from moeshard_cli.shard.manifest import default_shard_set, read_shard_set

    if model is not None and shards is not None:
        raise UserError("--model and --shards exclude each other", "pass --shards DIR for a shard set, or --model SOURCE to cut one on first use")
    if model is not None:
        given = Path(model).expanduser()
        if (given / MANIFEST).is_file():
            found = read_shard_set(given)
            if gpus in (None, found.world_size) and dtype in (None, found.dtype):
                return given  # a shard set for these workers and dtype already
        from moeshard_cli.shard.command import ShardOptions

        ShardOptions(model, _workers(gpus), None, dtype or "float32", revision).validate()  # --gpus, --dtype
        return cached_set_dir(model, _workers(gpus), dtype or "float32", revision)
    if shards is None:
        return default_shard_set(gpus, note)
    if gpus is not None and (shards / MANIFEST).is_file() and read_shard_set(shards).world_size != gpus:
        world = read_shard_set(shards).world_size
        raise UserError(f"--shards {shards} is cut for {world} workers, not --gpus {gpus}",
                        f"drop --gpus, or pass --model {shards} --gpus {gpus} to re-cut it for {gpus} (cached)")
    return shards


def model_shard_set(model: str, gpus: int | None, dtype: str | None = None, revision: str | None = None,
                    progress=None, on_cut=None) -> Path:
    """--model's shard set: itself if it is one for `gpus` workers, else its cut in the cache, made now if needed."""
    shards = shard_set_for(model, None, gpus, dtype, revision)
    if not (shards / MANIFEST).is_file():
        ensure_shard_set(model, _workers(gpus), dtype or "float32", revision, progress, on_cut)
    return shards


def settle_shards(opts, progress=None, on_cut=None, note=None) -> None:
    """Point `opts` (RunOptions) at its shard set (--shards, --model, or the one found), checking every
    run option before a first use cuts one."""
    opts.shards = shard_set_for(opts.model, opts.shards, opts.gpus, opts.dtype, opts.revision, note)
    opts.validate()
    if opts.model is not None:
        model_shard_set(opts.model, opts.gpus, opts.dtype, opts.revision, progress, on_cut)
