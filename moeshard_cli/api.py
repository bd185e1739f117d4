"""moeshard from Python (`import moeshard`): encode, score, shard, and a Pool that keeps its workers.

Every call is a `moeshard run` over the same code (run/command.py's `run` with RunOptions): the
texts are streamed to a temporary file, one per line (bounded memory for an iterable of any
length), the workers write their rows to a temporary output as the CLI does, and the rows come
back as numpy arrays in input order. `model` is what `run --model` takes (a built-in name, a
checkpoint folder or a hub id, cut for `gpus` workers on first use into the shard cache,
shard/cache.py) or a shard set folder. Without a Pool each call launches its workers (seconds of
start-up); a Pool launches them once (run/pool.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from moeshard_cli.errors import UserError
from moeshard_cli.run.command import run
from moeshard_cli.run.options import RunOptions
from moeshard_cli.shard.cache import model_shard_set, settle_shards
from moeshard_cli.shard.manifest import read_shard_set
from moeshard_cli.ui import Display

API_ARGV = ["(moeshard Python API)"]  # what a journal names as the command; the API's outputs are temporary


def encode(texts: Iterable[str], model: str | Path, *, gpus: int | None = None, batch_size: int = 32, max_length: int = 512,
           pooling: str | None = None, normalize: bool = False, device: str = "auto", dtype: str | None = None,
           revision: str | None = None, progress: bool = False, **options) -> np.ndarray | list[np.ndarray]:
    """Embeddings of `texts` (a list, or any iterable of strings), one float32 row per text in input
    order: `[len(texts), d_model]`. pooling: "mean" (encoders' default), "last" (decoders'), or
    "none": a list of `[tokens, d_model]` arrays, one per text. `options`: any other `moeshard run`
    option by its RunOptions name (window, attention, expert_backend, router, skew, hot_experts, seed, timeout)."""
    opts = _options(model=str(model), gpus=gpus, dtype=dtype, revision=revision, batch_size=batch_size, max_length=max_length,
                    pooling=pooling, normalize=normalize, device=device, progress=_display(progress), **options)
    return _rows(texts, opts, lambda: settle_shards(opts))


def score(texts: Iterable[str], model: str | Path, *, gpus: int | None = None, batch_size: int = 32, max_length: int = 512,
          device: str = "auto", dtype: str | None = None, revision: str | None = None, progress: bool = False, **options) -> np.ndarray:
    """Log-likelihoods of `texts` under a decoder family, in input order: a numpy record array with
    the fields of `run --score`'s CSV: line, tokens, logprob (sum of log p over every token after
    the first) and mean_nll (NaN for a text of fewer than 2 tokens)."""
    opts = _options(model=str(model), gpus=gpus, dtype=dtype, revision=revision, batch_size=batch_size, max_length=max_length,
                    score=True, device=device, progress=_display(progress), **options)
    return _rows(texts, opts, lambda: settle_shards(opts))


def shard(source: str | Path, gpus: int, out: str | Path | None = None, dtype: str = "float32", revision: str | None = None,
          force: bool = False) -> Path:
    """`moeshard shard`: cut `source` into a shard set for `gpus` workers; returns its folder."""
    from moeshard_cli.shard.command import ShardOptions, shard as cut

    return cut(ShardOptions(str(source), gpus, Path(out) if out is not None else None, dtype, revision, force)).out


class Pool:
    """Workers started once and kept across calls: `with moeshard.Pool("tiny-switch", gpus=2) as pool:`
    then `pool.encode(texts)` and `pool.score(texts)` as often as needed, without start-up. A call may
    name another `model` of the same number of workers: the workers load it instead."""

    def __init__(self, model: str | Path, *, gpus: int | None = None, device: str = "auto", dtype: str | None = None,
                 revision: str | None = None, expert_backend: str = "auto", attention: str = "eager", timeout: float = 300.0,
                 debug: bool = False):
        from moeshard_cli.run.pool import WorkerPool

        self.shards = model_shard_set(str(model), gpus, dtype, revision)
        self._dtype, self._revision = dtype, revision
        self._defaults = {"expert_backend": expert_backend, "attention": attention, "timeout": timeout, "debug": debug}
        self._workers = WorkerPool(self.shards, device, expert_backend, attention, timeout, debug=debug)

    @property
    def world(self) -> int:
        return self._workers.world

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, rank by rank (the same for every call)."""
        return list(self._workers.pids)

    def encode(self, texts: Iterable[str], *, model: str | Path | None = None, batch_size: int = 32, max_length: int = 512,
               pooling: str | None = None, normalize: bool = False, progress: bool = False, **options) -> np.ndarray | list[np.ndarray]:
        """As `moeshard.encode`, on this pool's workers."""
        opts = _options(batch_size=batch_size, max_length=max_length, pooling=pooling, normalize=normalize,
                        progress=_display(progress), **{**self._defaults, **options})
        return _rows(texts, opts, lambda: self._settle(opts, model), self._workers)

    def score(self, texts: Iterable[str], *, model: str | Path | None = None, batch_size: int = 32, max_length: int = 512,
              progress: bool = False, **options) -> np.ndarray:
        """As `moeshard.score`, on this pool's workers."""
        opts = _options(batch_size=batch_size, max_length=max_length, score=True, progress=_display(progress), **{**self._defaults, **options})
        return _rows(texts, opts, lambda: self._settle(opts, model), self._workers)

    def _settle(self, opts: RunOptions, model) -> None:
        if model is None:
            opts.shards = self.shards
        else:
            opts.model, opts.gpus, opts.dtype, opts.revision = str(model), self.world, self._dtype, self._revision
            settle_shards(opts)

    def close(self) -> None:
        self._workers.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _options(**fields) -> RunOptions:
    # the input and output are set per call, in a temporary folder; the device is the pool's in a pool
    return RunOptions(input=Path(), argv=list(API_ARGV), **fields)


def _rows(texts: Iterable[str], opts: RunOptions, settle, pool=None):
    """Write `texts` to a temporary input, point `opts` at it and at a temporary output, run, read back."""
    with tempfile.TemporaryDirectory(prefix="moeshard-api-") as tmp:
        opts.input = Path(tmp) / "input.txt"
        count = write_texts(texts, opts.input)
        suffix = ".csv" if opts.score else ".safetensors" if opts.pooling == "none" else ".npy"
        opts.output = Path(tmp) / f"output{suffix}"
        settle()
        if count == 0:  # `run` refuses an empty input; an empty list has an empty answer
            return _empty(opts)
        run(opts, pool=pool)
        return read_rows(opts.output)


def write_texts(texts: Iterable[str], path: Path) -> int:
    """One text per line, streamed (bounded memory). A line ending at the end of a text is dropped, so
    the lines of an open file can be passed as they are; any other line break would make two texts."""
    if isinstance(texts, (str, bytes)):
        raise UserError("texts is a single string", "pass a list (or any iterable) of strings, e.g. [text]")
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"texts[{i}] is a {type(text).__name__}, not a str", "pass strings only")
            text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
            if "\n" in text or "\r" in text:
                raise UserError(f"texts[{i}] holds a line break; moeshard reads one text per line",
                                "replace line breaks, e.g. text.replace('\\n', ' ')")
            try:
                f.write(text + "\n")
            except UnicodeEncodeError as exc:
                raise UserError(f"texts[{i}] is not valid Unicode ({exc.reason})", "drop or replace its lone surrogates") from None
            count += 1
    return count


def read_rows(output: Path):
    """The output of a run as numpy: [lines, d_model] rows, a score record array, or per-line token rows."""
    if output.suffix == ".csv":
        return np.atleast_1d(np.genfromtxt(output, delimiter=",", names=True))
    if output.suffix == ".npy":
        return np.load(output)
    from safetensors.numpy import load_file

    tensors = load_file(str(output))
    return np.split(tensors["hidden_states"], tensors["offsets"][1:-1])


def _empty(opts: RunOptions):
    if opts.score:
        return np.zeros(0, dtype=[(name, "f8") for name in ("line", "tokens", "logprob", "mean_nll")])
    if opts.pooling == "none":
        return []
    return np.zeros((0, read_shard_set(opts.shards).dims.d_model), dtype=np.float32)


def _display(progress: bool) -> Display:
    """progress=True: a bar on a terminal, plain lines elsewhere (a notebook's log, a job's)."""
    from rich.console import Console

    return Display.choose(Console(), 0) if progress else Display("off")
