"""Input text -> token ids -> length-bucketed batches, each owned by one worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeshard_cli.errors import UserError


def read_lines(path: Path) -> list[str]:
    """UTF-8, one document per line; the newline is stripped, empty lines are kept."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist", "pass an existing UTF-8 text file with --input")
    data = path.read_bytes()
    if not data:
        raise UserError(f"input file {path} is empty", "give it at least one line of text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"input file {path} is not UTF-8 (line {line}, byte {exc.start})", "convert it, e.g. `iconv -t utf-8`") from exc
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@dataclass
class Tokenized:
    ids: list[list[int]]
    truncated: int


def tokenize(lines: list[str], tokenizer, max_length: int) -> Tokenized:
    """Default special tokens; lines longer than max_length are truncated as transformers does."""
    if max_length < 2:
        raise UserError(f"--max-length {max_length} is too small", "pass at least 2 (room for one token and the end-of-sequence token)")
    ids = tokenizer(lines, add_special_tokens=True)["input_ids"]
    long_rows = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long_rows:
        cut = tokenizer([lines[i] for i in long_rows], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for i, row in zip(long_rows, cut):
            ids[i] = row
    return Tokenized(ids, len(long_rows))


def plan_batches(lengths: list[int], batch_size: int, world: int) -> list[list[list[int]]]:
    """Per worker, its batches of line indices. Lines are bucketed by length (longest first)
    so padding stays small, and batch k goes to worker k % world."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1", "pass a positive batch size")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[r::world] for r in range(world)]
