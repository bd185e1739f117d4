"""The --output formats of `moeshard run`, one table: the help, the checks and the writers read it.

numpy-free, so the command line's help and value checks stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputFormat:
    """One kind of --output file: what it holds (`modes`: the poolings, and "score") and where its metadata goes."""

    name: str
    suffix: str
    modes: tuple[str, ...]
    holds: str  # for the help and the docs
    sidecar: bool = False  # no room for metadata inside: it goes to OUTPUT.json
    staged: bool = False  # rows are written in place to a raw partial file, converted to this format at the end


FORMATS = {f.suffix: f for f in (
    OutputFormat("safetensors", ".safetensors", ("mean", "last", "none"), "float32 rows and metadata (the default)"),
    OutputFormat("npy", ".npy", ("mean", "last"), "[lines, d_model] float32", sidecar=True),
    OutputFormat("parquet", ".parquet", ("mean", "last", "score"), "id and embedding columns (needs pyarrow)", staged=True),
    OutputFormat("jsonl", ".jsonl", ("mean", "last", "score"), 'one {"id", "embedding"} object per line', sidecar=True, staged=True),
    OutputFormat("csv", ".csv", ("score",), "--score's default: line,tokens,logprob,mean_nll", sidecar=True),
)}


def suffixes_for(mode: str) -> list[str]:
    return [f.suffix for f in FORMATS.values() if mode in f.modes]


def output_format(path: Path, mode: str) -> OutputFormat:
    """The format the file name asks for; ValueError if there is none or it cannot hold `mode`
    (a pooling, or "score"). `suffix_fix(mode)` says what to do instead."""
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise ValueError(f"{path} has no known suffix")
    if mode not in fmt.modes:
        raise ValueError(f"{path} is a {fmt.suffix} file, which cannot hold {'scores' if mode == 'score' else f'--pooling {mode}'}")
    return fmt


def suffix_fix(mode: str) -> str:
    what = "scores" if mode == "score" else f"--pooling {mode}"
    *others, last = suffixes_for(mode)
    return f"end it in {', '.join(others) + ' or ' if others else ''}{last} for {what}"


def output_help() -> str:
    """--output's help, from the table above."""
    return ("Output file, by suffix: " + "; ".join(f"{f.suffix}: {f.holds}" for f in FORMATS.values()) +
            ". Default: INPUT.moeshard.safetensors (INPUT.moeshard-scores.csv with --score).")
