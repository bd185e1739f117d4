"""The input corpus: one pass to check and fingerprint it, then windows of records read on demand.

Formats, by suffix (or --input-format): `.txt`, one document per line (the newline and a `\\r`
before it are stripped, empty lines are kept, a last line without newline counts); `.jsonl`,
one JSON object per line, the text in --field; `.csv` and `.tsv` with a header row, the text
in --column; `.parquet`, the text in --column. Any of the text formats may be compressed
(`.gz`, `.zst`). A UTF-8 byte order mark at the start is dropped.

Every worker reads the input itself, window by window; no process ever holds more than one
window. Plain `.txt` and `.jsonl` are re-entered at a byte offset; the other formats are read
from the start again and skip the records before the window (parquet skips whole row groups).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import itertools
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from moeshard_cli.errors import UserError
from moeshard_cli.files import special_kind

CHUNK = 1 << 22
BOM = codecs.BOM_UTF8
FORMAT_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
MAGIC = {b"\x1f\x8b": "gz", b"\x28\xb5\x2f\xfd": "zst"}  # how standard input says it is compressed
SHOWN = 5  # line numbers a warning lists
PARQUET_BATCH = 4096


@dataclass(frozen=True)
class InputSpec:
    """How to read the input: picklable, it travels to every worker."""

    path: str
    format: str  # txt, jsonl, csv, tsv, parquet
    compression: str | None = None  # gz, zst
    text_field: str = "text"
    id_field: str | None = None  # after the scan: the --id-field, or "id" when the records have one, else None (the record number)
    shown: str | None = None  # how messages name the input (standard input's spool file is named "-")

    @property
    def seekable(self) -> bool:
        """Windows re-enter the file at a byte offset (else: read again from the start, skipping records)."""
        return self.compression is None and self.format in ("txt", "jsonl")

    @property
    def name(self) -> str:
        return self.shown or self.path


def input_spec(path: Path, input_format: str | None = None, text_field: str = "text", id_field: str | None = None,
               compression: str | None = None, shown: str | None = None) -> InputSpec:
    """The format by suffix (`corpus.jsonl.gz`: jsonl, gzip); an unknown suffix reads as text lines."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if compression is None and suffixes and suffixes[-1] in COMPRESSIONS:
        compression = COMPRESSIONS[suffixes.pop()]
    fmt = input_format or (FORMAT_SUFFIXES.get(suffixes[-1], "txt") if suffixes else "txt")
    if fmt == "parquet" and compression:
        raise UserError(f"--input {path} is a compressed parquet file", "parquet compresses its own columns: decompress the file")
    return InputSpec(str(path), fmt, compression, text_field, id_field, shown)


@dataclass(frozen=True)
class Tally:
    """How many records were of a kind, and the first few line (or record) numbers, counted from 1."""

    count: int = 0
    first: tuple[int, ...] = ()

    def add(self, number: int) -> "Tally":
        return Tally(self.count + 1, self.first + (number,) if len(self.first) < SHOWN else self.first)


@dataclass(frozen=True)
class InputInfo:
    spec: InputSpec  # with the id field settled
    lines: int  # records (lines of a .txt)
    bytes: int
    sha256: str  # of the file's bytes, as stored (compressed or not)
    empty: Tally = Tally()
    blank: Tally = Tally()  # whitespace only
    bom: bool = False

    @property
    def path(self) -> Path:
        return Path(self.spec.path)


def scan_input(spec: InputSpec) -> InputInfo:
    """Hash the file, then read every record once: count, check UTF-8 and the fields, note empty
    and whitespace-only texts (bounded memory)."""
    path = Path(spec.path)
    kind = special_kind(path)
    if kind:  # a FIFO could be read once only, and run reads the input twice: to check it, then to encode it
        raise UserError(f"--input {spec.name} is {kind}, not a regular file", "pass a file, or - to read standard input")
    if not path.is_file():
        raise UserError(f"input file {spec.name} does not exist", "pass an existing file with --input")
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
            f.seek(0)
            bom = f.read(len(BOM)) == BOM
    except OSError as exc:
        raise UserError(f"cannot read input file {spec.name} ({exc.strerror})", "check the file's permissions") from exc
    if size == 0:
        raise UserError(f"input file {spec.name} is empty", "give it at least one record")
    spec = replace(spec, id_field=_settle_id_field(spec))
    empty = blank = Tally()
    lines = 0
    for lines, (text, _) in enumerate(records(spec), 1):
        if not text:
            empty = empty.add(lines)
        elif text.isspace():
            blank = blank.add(lines)
    if lines == 0:
        raise UserError(f"input file {spec.name} holds no records", "give it at least one record")
    return InputInfo(spec, lines, size, digest.hexdigest(), empty, blank, bom and spec.compression is None)


@dataclass
class Window:
    """Records [first_line, first_line + len(texts)) of the input; bytes [byte_start, byte_end) when seekable (else 0)."""

    index: int
    first_line: int
    byte_start: int
    byte_end: int
    texts: list[str]


def read_windows(spec: InputSpec, window_lines: int, first_line: int = 0, byte_start: int = 0) -> Iterator[Window]:
    """Consecutive windows of `window_lines` records from record `first_line` (at `byte_start` when seekable)."""
    it = records(spec, first_line, byte_start)
    index, position = first_line // window_lines, byte_start if spec.seekable else 0
    while chunk := list(itertools.islice(it, window_lines)):
        end = position + sum(n for _, n in chunk) if spec.seekable else 0
        yield Window(index, first_line, position, end, [t for t, _ in chunk])
        index, first_line, position = index + 1, first_line + len(chunk), end


def records(spec: InputSpec, first: int = 0, byte_start: int = 0) -> Iterator[tuple[str, int]]:
    """(text, bytes it took in the file) of every record from `first`; `byte_start` is where record
    `first` begins (seekable formats only)."""
    if spec.format == "parquet":
        yield from ((text, 0) for text, _ in _parquet_rows(spec, first))
    elif spec.format in ("csv", "tsv"):
        yield from ((text, 0) for text, _ in itertools.islice(_table_rows(spec), first, None))
    else:
        yield from _line_records(spec, first, byte_start)


def record_ids(spec: InputSpec, count: int) -> Iterator:
    """The ids of the `count` records, in order: each one's --id-field value, or its number from 0."""
    if spec.id_field is None:
        return iter(range(count))
    if spec.format == "parquet":
        return (i for _, i in _parquet_rows(spec, 0))
    if spec.format in ("csv", "tsv"):
        return (i for _, i in _table_rows(spec))
    return (json.loads(raw)[spec.id_field] for raw in _without_bom(_raw_lines(spec, 0, 0)))


def spool_stdin(into: Path) -> tuple[Path, str | None]:
    """Standard input copied to `into` (workers read the input themselves, and twice); the
    compression its first bytes announce."""
    with open(into, "wb") as f:
        head = sys.stdin.buffer.read(CHUNK)
        f.write(head)
        while chunk := sys.stdin.buffer.read(CHUNK):
            f.write(chunk)
    return into, next((c for magic, c in MAGIC.items() if head.startswith(magic)), None)


# ---------------------------------------------------------------- one reader per format


@contextmanager
def _open(spec: InputSpec):
    """The file's bytes, decompressed."""
    try:
        with open(spec.path, "rb") as raw:
            if spec.compression == "gz":
                with gzip.open(raw) as f:
                    yield f
            elif spec.compression == "zst":
                try:
                    import zstandard
                except ImportError:
                    raise UserError(f"--input {spec.name} is zstd-compressed and zstandard is not installed",
                                    "pip install 'moeshard[zstd]', or decompress it (zstd -d)") from None
                with io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)) as f:
                    yield f
            else:
                yield raw
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise UserError(f"input file {spec.name} disappeared during the run", "leave the input in place until the run ends") from exc
        raise UserError(f"cannot read input file {spec.name} ({exc})", "check that the file is whole (not cut short) and readable") from exc


def _raw_lines(spec: InputSpec, first: int, byte_start: int) -> Iterator[bytes]:
    """The lines' bytes from line `first` (at `byte_start` when seekable), newlines and BOM as stored."""
    with _open(spec) as f:
        if spec.seekable:
            f.seek(byte_start)
            yield from f
        else:
            yield from itertools.islice(f, first, None)


def _without_bom(lines: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a file read from its start, without the byte order mark of the first."""
    for i, raw in enumerate(lines):
        yield raw[len(BOM):] if i == 0 and raw.startswith(BOM) else raw


def _line_records(spec: InputSpec, first: int, byte_start: int) -> Iterator[tuple[str, int]]:
    """.txt and .jsonl: one record per line, with the bytes the line took (its BOM included)."""
    number, at = first, byte_start
    bom_left = first == 0 and byte_start == 0
    for raw in _raw_lines(spec, first, byte_start):
        taken = len(raw)
        if bom_left and raw.startswith(BOM):
            raw = raw[len(BOM):]
        bom_left = False
        number += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"byte {at + exc.start}" + ("" if spec.compression is None else " of its decompressed text")
            raise UserError(f"input file {spec.name} is not UTF-8 (line {number}, {where})", "convert it, e.g. `iconv -t utf-8`") from exc
        text = text[:-1] if text.endswith("\n") else text
        text = text[:-1] if text.endswith("\r") else text
        if spec.format == "jsonl":
            text = _json_text(text, spec, number)
        at += taken
        yield text, taken


def _json_text(line: str, spec: InputSpec, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"line {number} of {spec.name} is not a JSON object ({exc.msg})",
                        "give .jsonl one JSON object per line, or pass --input-format txt to encode the lines as they are") from None
    if not isinstance(record, dict) or spec.text_field not in record:
        keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"line {number} of {spec.name} has no field {spec.text_field!r} (it has: {keys})", "name the text's field with --field")
    text = record[spec.text_field]
    if not isinstance(text, str):
        raise UserError(f"line {number} of {spec.name}: field {spec.text_field!r} is {json.dumps(text)[:40]}, not a string",
                        "give every record a text, or drop the records without one")
    if spec.id_field is not None and spec.id_field not in record:
        raise UserError(f"line {number} of {spec.name} has no id field {spec.id_field!r}", "give every record an id, or drop --id-field")
    return text


def _table_rows(spec: InputSpec) -> Iterator[tuple[str, object]]:
    """.csv and .tsv: (text, id) of every row after the header."""
    csv.field_size_limit(2**31 - 1)  # a document may be longer than csv's 128 KiB default
    with _open(spec) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter="\t" if spec.format == "tsv" else ",", strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return
            at = _columns(header, spec)
            for row in reader:
                if len(row) != len(header):
                    raise UserError(f"row {reader.line_num} of {spec.name} has {len(row)} fields, its header {len(header)}",
                                    "fix the row (a quote left open swallows the lines after it)")
                yield row[at[0]], (row[at[1]] if len(at) > 1 else None)
        except UnicodeDecodeError as exc:
            raise UserError(f"input file {spec.name} is not UTF-8 (near row {reader.line_num + 1})", "convert it, e.g. `iconv -t utf-8`") from exc
        except csv.Error as exc:
            raise UserError(f"row {reader.line_num} of {spec.name} is not valid {spec.format.upper()} ({exc})", "fix the row") from None


def _columns(header: list[str], spec: InputSpec) -> list[int]:
    wanted = [spec.text_field] + ([spec.id_field] if spec.id_field is not None else [])
    for name in wanted:
        if name not in header:
            raise UserError(f"{spec.name} has no column {name!r} (it has: {', '.join(header[:8])})",
                            "name the text's column with --column" if name == spec.text_field else "name the id's column with --id-column")
    return [header.index(name) for name in wanted]


def _parquet_file(spec: InputSpec):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"--input {spec.name} is a parquet file and pyarrow is not installed", "pip install 'moeshard[parquet]'") from None
    try:
        return pq.ParquetFile(spec.path)
    except Exception as exc:
        raise UserError(f"cannot read parquet file {spec.name} ({type(exc).__name__}: {str(exc)[:100]})", "check that the file is whole") from None


def _parquet_rows(spec: InputSpec, first: int) -> Iterator[tuple[str, object]]:
    """(text, id) of every row from `first`: whole row groups before it are skipped unread."""
    pf = _parquet_file(spec)
    names = pf.schema_arrow.names
    columns = [spec.text_field] + ([spec.id_field] if spec.id_field is not None else [])
    for name in columns:
        if name not in names:
            raise UserError(f"{spec.name} has no column {name!r} (it has: {', '.join(names[:8])})",
                            "name the text's column with --column" if name == spec.text_field else "name the id's column with --id-column")
    groups, start, skip = [], 0, first  # the row groups from the one holding row `first`, and the rows to skip in it
    for g in range(pf.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        if start + rows > first:
            groups.append(g)
        else:
            skip -= rows
        start += rows
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns, row_groups=groups):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, id_ in itertools.islice(zip(texts, ids), skip, None):
            if not isinstance(text, str):
                raise UserError(f"{spec.name}: column {spec.text_field!r} holds {text!r} in a row, not a string",
                                "give every row a text, or drop the rows without one")
            yield text, id_
        skip = max(0, skip - len(texts))


def _settle_id_field(spec: InputSpec) -> str | None:
    """The id field: the one asked for, else `id` when the records have one (the first record
    decides for .jsonl), else None (the record number)."""
    if spec.format == "txt":
        for flag, value, default in (("--field", spec.text_field, "text"), ("--id-field", spec.id_field, None)):
            if value != default:
                raise UserError(f"{flag} {value}: {spec.name} is read as text lines, which have no fields",
                                f"drop {flag}, or pass --input-format jsonl, csv, tsv or parquet")
        return None
    if spec.id_field is not None:
        return spec.id_field
    if spec.format == "parquet":
        return "id" if "id" in _parquet_file(spec).schema_arrow.names else None
    if spec.format in ("csv", "tsv"):
        with _open(spec) as f:
            header = next(csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""),
                                     delimiter="\t" if spec.format == "tsv" else ","), [])
        return "id" if "id" in header else None
    first = next(_without_bom(_raw_lines(spec, 0, 0)), b"")
    try:
        record = json.loads(first)
    except ValueError:
        return None  # the scan names the line
    return "id" if isinstance(record, dict) and "id" in record else None


def tokenize(texts: list[str], tokenizer, max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token ids with the tokenizer's special tokens, and the indices of the lines cut to max_length.
    Long lines are re-tokenized with transformers' own truncation, so they end as it ends them."""
    if not texts:
        return [], []
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long_rows = [i for i, row in enumerate(ids) if len(row) > max_length]
    if long_rows:
        cut = tokenizer([texts[i] for i in long_rows], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for i, row in zip(long_rows, cut):
            ids[i] = row
    return ids, long_rows
