"""`moeshard shard`: stream a source checkpoint into one self-contained safetensors file per rank.

source checkpoint -> slicing plan (plan.py) -> rank files (writer.py) -> moeshard.json last.
Tensors are read, cast and written one at a time; nothing is accepted by `run` until the
manifest, written last and atomically, names the finished files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moeshard_cli import __version__
from moeshard_cli.shard.sources import TOKENIZER_FILES, Source, resolve
from moeshard_cli.errors import Interrupted, UserError
from moeshard_cli.dtypes import DTYPES
from moeshard_cli.files import is_temporary, write_json_atomic
from moeshard_cli.shard.manifest import DEFAULT_ROOT, FORMAT_VERSION, MANIFEST
from moeshard_cli.options import flag
from moeshard_cli.shard.plan import check_world, expert_layers, held_by, rank_bounds, rank_cut, rank_file_name, slice_along, slice_bounds, sliced_shape
from moeshard_cli.shard.writer import StreamingSafetensorsWriter

OWN_FILES = {MANIFEST, "config.json", *TOKENIZER_FILES}


@dataclass
class ShardResult:
    out: Path
    source: Source
    world: int
    dtype: str
    bounds: list[tuple[int, int]]
    files: list[dict]
    seconds: float
    bytes_written: int
    sparse_layers: list[int]


def default_out(source: str, world: int) -> Path:
    name = Path(source.rstrip("/")).name or "model"
    return DEFAULT_ROOT / f"{name}-w{world}"


def _is_own_artifact(name: str) -> bool:
    return name in OWN_FILES or (name.startswith("rank-") and name.endswith(".safetensors")) or is_temporary(name)


def prepare_out(out: Path, force: bool) -> None:
    """Refuse to clobber: a complete set needs --force, a foreign non-empty directory is never touched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file", "pass a directory path for --out")
    if out.is_dir() and any(out.iterdir()):
        names = [p.name for p in out.iterdir()]
        foreign = [n for n in names if not _is_own_artifact(n)]
        if foreign:
            raise UserError(f"--out {out} is a non-empty directory that is not a shard set (it holds {foreign[0]})", "choose an empty or new directory for --out")
        if not force:
            what = "a complete shard set" if MANIFEST in names else "an unfinished shard set"
            raise UserError(f"--out {out} already holds {what}", "pass --force to overwrite it, or choose another --out")
        (out / MANIFEST).unlink(missing_ok=True)  # first: a half-rewritten set must never look complete
        for name in names:
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe.tmp-{id(out)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out} ({exc.strerror})", "choose a directory you can write to") from exc


def rank_layouts(source: Source, bounds, dtype: torch.dtype):
    """Per rank, the ordered (name, shape, dtype) list its file will hold."""
    layouts = [[] for _ in bounds]
    for entry in source.tensors:
        for rank in range(len(bounds)):
            if held_by(source.family, entry.name, rank):
                cut = rank_cut(source.family, entry.name, *rank_bounds(source.family, entry.name, entry.shape, bounds, rank))
                layouts[rank].append((entry.name, entry.shape if cut is None else sliced_shape(entry.shape, *cut), dtype))
    return layouts


def _allow_open_files(world: int) -> None:
    """Every rank file stays open while the source streams through: raise the soft open-file limit
    (often 1024) towards the hard one when N needs it. --gpus 3072 on switch-base is valid."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = world + 256  # headroom for the source files, the interpreter and its libraries
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def stream(source: Source, writers: list[StreamingSafetensorsWriter], bounds, dtype: torch.dtype, advance) -> None:
    """Read every kept tensor once and append its per-rank parts to the rank files.

    Pipelined: while a few threads hash and write tensor k into every rank file (hashlib and file
    writes release the GIL), this thread reads, casts and slices tensor k+1. Waiting for tensor k
    before handing out k+1 keeps each file's bytes in order and memory at about three tensors.
    Torch's own intra-op threads are turned off meanwhile: slicing copies are memory-bound, and
    on top of the pool they oversubscribe the cores (a strided copy ran 17x slower on 2 busy cores).
    """
    family = source.family
    pool = ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 1, 2 * len(writers))), thread_name_prefix="moeshard-write")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kept = source.tensors
        tensor = kept[0].load().to(dtype) if kept else None
        for i, entry in enumerate(kept):
            jobs, nbytes, data = [], 0, None
            for rank, writer in enumerate(writers):
                if not held_by(family, entry.name, rank):
                    continue
                cut = rank_cut(family, entry.name, *rank_bounds(family, entry.name, entry.shape, bounds, rank))
                data = writer.prepare(entry.name, tensor if cut is None else slice_along(tensor, *cut))
                jobs += [pool.submit(writer.hash, data), pool.submit(writer.append, data)]
                nbytes += data.nbytes
            del data
            tensor = kept[i + 1].load().to(dtype) if i + 1 < len(kept) else None
            for job in wait(jobs).done:
                job.result()  # re-raises a failed write (a full disk) here
            advance(nbytes)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)


@dataclass
class ShardOptions:
    source: str
    gpus: int
    out: Path | None = None
    dtype: str = "float32"
    revision: str | None = None
    force: bool = False

    def validate(self) -> None:
        """The options that need no source; --gpus against d_ff is checked by `bounds`."""
        with flag("--gpus", "pass the number of ranks to shard for, e.g. --gpus 2"):
            check_world(self.gpus)
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype} is not supported", f"use one of {', '.join(DTYPES)}")

    def bounds(self, d_ff: int) -> list[tuple[int, int]]:
        with flag("--gpus", f"use at most {d_ff} ranks so every rank gets a slice"):
            return slice_bounds(d_ff, self.gpus)


def shard(opts: ShardOptions, progress=None) -> ShardResult:
    """Run the whole command. `progress(total_bytes)` returns a callable advanced by bytes written."""
    opts.validate()
    source_arg, world, dtype_name, force = opts.source, opts.gpus, opts.dtype, opts.force
    dtype = DTYPES[dtype_name]
    source = resolve(source_arg, opts.revision)
    dims = source.dims
    d_ff = dims.d_ff
    bounds = opts.bounds(d_ff)
    out = opts.out or default_out(source_arg, world)
    if source.path and out.exists() and out.resolve() == Path(source.path).resolve():
        raise UserError(f"--out {out} is the source itself", "write the new shard set to another directory")
    source.prepare_tokenizer()  # may convert spiece.model: fails before --out is touched
    created = not out.exists()
    prepare_out(out, force)

    start = time.perf_counter()
    layouts = rank_layouts(source, bounds, dtype)
    written: list[Path] = []
    writers = []
    try:
        _allow_open_files(world)
        for rank, layout in enumerate(layouts):
            meta = {"format": "pt", "moeshard_rank": str(rank), "moeshard_world": str(world),
                    "slice": f"{bounds[rank][0]},{bounds[rank][1]}", "source": source.label}
            writers.append(StreamingSafetensorsWriter(out / rank_file_name(rank, world), layout, meta))
        advance = progress(sum(w.size for w in writers)) if progress else (lambda n: None)
        advance(sum(w.header_bytes for w in writers))
        stream(source, writers, bounds, dtype, advance)
        files = []
        for rank, writer in enumerate(writers):
            sha = writer.commit()
            written.append(writer.path)
            files.append({"rank": rank, "name": writer.path.name, "bytes": writer.size, "sha256": sha})
        # Listed before writing: a write that fails halfway must not leave its file. prepare_out left
        # `out` empty, so every one of these names is ours to remove.
        written += [out / "config.json", *(out / n for n in TOKENIZER_FILES)]
        source.config.to_json_file(str(out / "config.json"))
        tokenizer_files = source.save_tokenizer(out)
        sparse = expert_layers(source.family, (n for n, *_ in layouts[0]))
        manifest = {
            "format_version": FORMAT_VERSION, "tool": "moeshard", "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": source.describe(), "family": source.family.name, "encoder_only": not dims.decoder,
            "architecture": source.family.architecture, "config": source.config.to_dict(), "world_size": world, "dtype": dtype_name,
            "dims": asdict(dims), "d_ff": d_ff, "num_experts": dims.num_experts, "top_k": dims.top_k, "sparse_layers": sparse,
            "slices": [list(b) for b in bounds], "files": files, "tokenizer_files": tokenizer_files,
        }
        if "dequantized_from" in source.extra:  # the rank files hold dequantized values of an mxfp4 / fp8 checkpoint
            manifest["dequantized_from"] = source.extra["dequantized_from"]
        write_json_atomic(out / MANIFEST, manifest)
    except BaseException as exc:
        for writer in writers:
            writer.abort()
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        if isinstance(exc, OSError) and exc.errno == errno.EMFILE:
            raise UserError(f"--gpus {world} needs {world} rank files open at once, more than this process may open", "raise the limit (ulimit -n) or use fewer ranks") from exc
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {out}", "free space (the shard set needs about the checkpoint's encoder size) or choose another --out") from exc
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise UserError(f"cannot write the shard set to {out} ({exc.strerror})", "check the directory's permissions and free space") from exc
        if isinstance(exc, Interrupted):
            raise Interrupted(exc.signum, f"nothing of the shard set in {out} was kept") from None
        raise
    seconds = time.perf_counter() - start
    return ShardResult(out, source, world, dtype_name, bounds, files, seconds, sum(f["bytes"] for f in files), sparse)
