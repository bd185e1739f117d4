"""The input file: one pass to check and fingerprint it, then windows of lines read on demand.

UTF-8, one document per line; the newline (and a `\\r` before it) is stripped, empty lines are
kept, a last line without newline counts. No process ever holds more than one window.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from moeshard_cli.errors import UserError
from moeshard_cli.files import special_kind

CHUNK = 1 << 22


@dataclass(frozen=True)
class InputInfo:
    path: Path
    lines: int
    bytes: int
    sha256: str


def scan_input(path: Path) -> InputInfo:
    """Count lines, check UTF-8 and hash the file in one streaming pass (bounded memory)."""
    kind = special_kind(path)
    if kind:  # a FIFO could be read once only, and run reads the input twice: to check it, then to encode it
        raise UserError(f"--input {path} is {kind}, not a regular file", "pass a UTF-8 text file, one document per line")
    if not path.is_file():
        raise UserError(f"input file {path} does not exist", "pass an existing UTF-8 text file with --input")
    digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")("strict")
    newlines = size = 0
    last = b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    at = max(0, exc.start - pending)
                    line = newlines + chunk[:at].count(b"\n") + 1
                    raise UserError(f"input file {path} is not UTF-8 (line {line}, byte {size + at})", "convert it, e.g. `iconv -t utf-8`") from exc
                digest.update(chunk)
                newlines += chunk.count(b"\n")
                size += len(chunk)
                last = chunk[-1:]
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:  # the file ends inside a multi-byte character
        raise UserError(f"input file {path} is not UTF-8 (line {newlines + 1}, byte {size - 1})", "convert it, e.g. `iconv -t utf-8`") from exc
    except OSError as exc:
        raise UserError(f"cannot read input file {path} ({exc.strerror})", "check the file's permissions") from exc
    if size == 0:
        raise UserError(f"input file {path} is empty", "give it at least one line of text")
    return InputInfo(path, newlines + (last != b"\n"), size, digest.hexdigest())


@dataclass
class Window:
    """Lines [first_line, first_line + len(texts)) of the input, bytes [byte_start, byte_end)."""

    index: int
    first_line: int
    byte_start: int
    byte_end: int
    texts: list[str]


def read_windows(path: Path, window_lines: int, first_line: int = 0, byte_start: int = 0) -> Iterator[Window]:
    """Consecutive windows of `window_lines` lines from a line that starts at `byte_start`."""
    with open(path, "rb") as f:
        f.seek(byte_start)
        index, position = first_line // window_lines, byte_start
        while raw := list(itertools.islice(f, window_lines)):
            end = position + sum(len(r) for r in raw)
            yield Window(index, first_line, position, end, [_decode(r, path) for r in raw])
            index, first_line, position = index + 1, first_line + len(raw), end


def _decode(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"input file {path} changed while it was being encoded", "leave the input alone during a run, then rerun") from exc
    text = text[:-1] if text.endswith("\n") else text
    return text[:-1] if text.endswith("\r") else text


def tokenize(texts: list[str], tokenizer, max_length: int) -> tuple[list[list[int]], int]:
    """Token ids with the tokenizer's special tokens, and how many lines were cut to max_length.
    Long lines are re-tokenized with transformers' own truncation, so they end as it ends them."""
    if not texts:
        return [], 0
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long_rows = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long_rows:
        cut = tokenizer([texts[i] for i in long_rows], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for i, row in zip(long_rows, cut):
            ids[i] = row
    return ids, len(long_rows)
