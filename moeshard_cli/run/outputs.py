"""The output file of `moeshard run`, written in place as batches finish, and its journal.

The file is laid out before the first batch, under a hidden name next to the final one
(`.NAME.partial`): mean pooling needs `lines x d_model` float32 rows, `--pooling none` an
offsets table `[lines + 1]` followed by every token's row, appended in line order. Rank 0
writes each row at its place, syncs the data, then appends a record per finished step to the
journal (`.NAME.journal`): the journal never names rows that are not on disk, so a run
interrupted at any moment resumes from its last record. The final header is written last
and the file renamed to its final name; an unfinished output never carries that name.

Formats, by the suffix of --output: `.safetensors` (`embeddings`, or `hidden_states` +
`offsets`, with metadata), `.npy` (one row per line: `[lines, d_model]` float32) and, for
`--score`, `.csv`: a header line, then one fixed-width record per line
(`line,tokens,logprob,mean_nll`, the line number padded on the left to the record's width), so
rows are written in place like the others and `pandas.read_csv` reads the file as it is (an
empty mean_nll, for a line of one token, reads as NaN).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import queue
import shutil
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from moeshard_cli.errors import UserError
from moeshard_cli.files import check_writable, publish, write_atomic
from moeshard_cli.run.formats import FORMATS, OutputFormat, output_format  # noqa: F401 (the registry, re-exported)

FORMATS_BY_NAME = {f.name: f for f in FORMATS.values()}
METADATA_KEY = "moeshard"  # the run's typed record, as one JSON string (safetensors' metadata holds strings only)

ROW_DTYPE = np.dtype("<f4")
SCORE_COLUMNS = ("line", "tokens", "logprob", "mean_nll")
SCORE_HEADER = (",".join(SCORE_COLUMNS) + "\n").encode()
SCORE_RECORD_BYTES = 58  # the line number (< 10**12) gets what tokens (< 10**10) and two %.8e floats leave


def score_record(line: int, tokens: int, logprob: float, mean_nll: float) -> bytes:
    """One line's CSV record, exactly SCORE_RECORD_BYTES long: spaces before the line number are
    the only padding, since pandas reads a padded number but not a padded NaN."""
    body = f",{tokens},{logprob:.8e},{'' if mean_nll != mean_nll else f'{mean_nll:.8e}'}\n"
    return f"{line:>{SCORE_RECORD_BYTES - len(body)}d}{body}".encode()
_sync_data = getattr(os, "fdatasync", os.fsync)  # the rows must be on disk before the journal names them
_MAX_TOKENS_DIGITS = 10**15  # sizes the reserved header of --pooling none before the token count is known


@dataclass
class Position:
    """Where a run (re)starts: the first line of a window, its byte offset and global token offset,
    and how many of its steps are already written."""

    line: int = 0
    byte: int = 0
    token: int = 0
    step: int = 0


def partial_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def journal_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.journal")


def guard_user_files(outputs: dict[str, Path | None], input_path: Path, shards_root: Path) -> None:
    """Refuse outputs that would overwrite the input or land inside the shard set in use."""
    named = {flag: p for flag, p in outputs.items() if p is not None}
    for flag, path in named.items():
        check_writable(path, flag)
        if _same_file(path, input_path):
            raise UserError(f"{flag} {path} is the input file", f"choose another {flag} path; the input stays untouched")
        if shards_root.resolve() in path.resolve().parents:
            raise UserError(f"{flag} {path} is inside the shard set {shards_root}", f"write {flag} outside the shard set")
    paths = list(named.items())
    for i, (flag, path) in enumerate(paths):
        for other, other_path in paths[i + 1:]:
            if _same_file(path, other_path):
                raise UserError(f"{flag} and {other} are the same file {path}", f"give {other} a path of its own")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


@dataclass(frozen=True)
class OutputLayout:
    """Where every byte of the output goes. Picklable: it travels to rank 0, the writer."""

    path: str  # the partial file
    fmt: str
    pooling: str
    lines: int
    d_model: int
    data_start: int
    metadata: tuple[tuple[str, str], ...]

    @property
    def row_bytes(self) -> int:
        return SCORE_RECORD_BYTES if self.fmt == "csv" else self.d_model * ROW_DTYPE.itemsize

    def encode(self, line: int, rows: np.ndarray) -> np.ndarray:
        """The bytes of one line's rows as the file holds them (a CSV record for scores)."""
        if self.fmt != "csv":
            return rows
        tokens, logprob, mean_nll = rows[0].tolist()
        return np.frombuffer(score_record(line, int(tokens), logprob, mean_nll), dtype=np.uint8)

    def embedding_at(self, line: int) -> int:
        return self.data_start + line * self.row_bytes

    def offset_at(self, line: int) -> int:
        return self.data_start + line * 8

    def token_at(self, token: int) -> int:
        return self.data_start + (self.lines + 1) * 8 + token * self.row_bytes

    @property
    def rows_start(self) -> int:
        """Where row 0 is: the first line's embedding, or (--pooling none) the first token's row."""
        return self.token_at(0) if self.pooling == "none" else self.embedding_at(0)

    def size(self, tokens: int) -> int:
        return self.token_at(tokens) if self.pooling == "none" else self.embedding_at(self.lines)

    def header(self, tokens: int) -> bytes:
        """The bytes before `data_start`, exact for a run of `tokens` tokens."""
        if self.fmt == "csv":
            return SCORE_HEADER
        if FORMATS_BY_NAME[self.fmt].staged:  # raw rows, converted at the end
            return b""
        if self.fmt == "npy":
            out = io.BytesIO()
            np.lib.format.write_array_header_1_0(out, {"descr": ROW_DTYPE.str, "fortran_order": False, "shape": (self.lines, self.d_model)})
            return out.getvalue()
        blob = _safetensors_header(self, tokens)
        return len(blob).to_bytes(8, "little") + blob


def _safetensors_header(layout: OutputLayout, tokens: int, pad: bool = True) -> bytes:
    N, D = layout.lines, layout.d_model
    if layout.pooling != "none":
        tensors = {"embeddings": {"dtype": "F32", "shape": [N, D], "data_offsets": [0, N * D * 4]}}
    else:
        table = (N + 1) * 8
        tensors = {"offsets": {"dtype": "I64", "shape": [N + 1], "data_offsets": [0, table]},
                   "hidden_states": {"dtype": "F32", "shape": [tokens, D], "data_offsets": [table, table + tokens * D * 4]}}
    blob = json.dumps({"__metadata__": dict(layout.metadata), **tensors}, separators=(",", ":")).encode()
    if not pad:
        return blob
    width = layout.data_start - 8
    if len(blob) > width:
        raise RuntimeError(f"safetensors header of {len(blob)} bytes does not fit its {width} reserved bytes")
    return blob + b" " * (width - len(blob))  # safetensors allows trailing spaces in the header


def plan_layout(output: Path, fmt: str, pooling: str, lines: int, d_model: int, metadata: dict) -> OutputLayout:
    """`metadata`: the run's typed record; safetensors' header keeps it as strings (metadata_strings)."""
    draft = OutputLayout(str(partial_path(output)), fmt, pooling, lines, d_model, 0, tuple(sorted(metadata_strings(metadata).items())))
    if fmt != "safetensors":
        start = len(draft.header(0))
    else:
        need = len(_safetensors_header(draft, _MAX_TOKENS_DIGITS, pad=False))
        start = 8 + -(-need // 8) * 8
    return OutputLayout(draft.path, fmt, pooling, lines, d_model, start, draft.metadata)


def create_partial(layout: OutputLayout) -> None:
    """The partial file: mean pooling at full (sparse) size, --pooling none up to its offsets table."""
    needed = layout.size(0)
    free = shutil.disk_usage(Path(layout.path).parent).free
    if needed > free:
        raise UserError(f"the output needs {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free on its disk", "free space or choose another --output")
    fd = os.open(layout.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, needed)
        if layout.fmt in ("npy", "csv"):
            os.pwrite(fd, layout.header(0), 0)
    finally:
        os.close(fd)


def finalize(layout: OutputLayout, tokens: int, output: Path, ids: Iterator | None = None) -> None:
    """Header, exact size, fsync, rename to the final name, journal gone. Formats without room for
    metadata get it beside them first (OUTPUT.json); staged formats are written from the partial
    rows and `ids` (each line's id, in order)."""
    fmt = FORMATS_BY_NAME[layout.fmt]
    record = json.loads(dict(layout.metadata)[METADATA_KEY])
    if fmt.sidecar:
        write_atomic(sidecar_path(output), lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    if fmt.staged:
        rows = np.memmap(layout.path, dtype=ROW_DTYPE, mode="r", shape=(layout.lines, layout.d_model)) if layout.lines else \
            np.zeros((0, layout.d_model), ROW_DTYPE)
        write_atomic(output, lambda tmp: STAGED_WRITERS[fmt.name](tmp, rows, ids if ids is not None else iter(range(layout.lines)),
                                                                   layout.pooling, record))
        del rows
        Path(layout.path).unlink()
        journal_path(output).unlink(missing_ok=True)
        return
    fd = os.open(layout.path, os.O_WRONLY)
    try:
        os.pwrite(fd, layout.header(tokens), 0)
        if layout.pooling == "none":
            os.pwrite(fd, np.array([tokens], dtype="<i8").tobytes(), layout.offset_at(layout.lines))
        os.ftruncate(fd, layout.size(tokens))
        os.fsync(fd)
    finally:
        os.close(fd)
    publish(Path(layout.path), output)
    journal_path(output).unlink(missing_ok=True)


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def metadata_strings(record: dict) -> dict[str, str]:
    """The typed record as one JSON string under "moeshard", beside the flat string keys of earlier
    versions (kept so readers of those keep working); JSON spells their non-strings (null, true, 7)."""
    flat = {**record.get("legacy", {})}
    body = {k: v for k, v in record.items() if k != "legacy"}
    return {**{k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}, METADATA_KEY: json.dumps(body, sort_keys=True)}


def recorded_digest(output: Path) -> str | None:
    """The run fingerprint a finished output records, or None when it records none (or is unreadable)."""
    try:
        fmt = FORMATS[output.suffix]
        if fmt.sidecar:
            return json.loads(sidecar_path(output).read_text())["run_fingerprint"]
        if fmt.name == "parquet":
            import pyarrow.parquet as pq

            return json.loads(pq.read_schema(output).metadata[METADATA_KEY.encode()])["run_fingerprint"]
        with open(output, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return json.loads(json.loads(f.read(size))["__metadata__"][METADATA_KEY])["run_fingerprint"]
    except Exception:
        return None


# ---------------------------------------------------------------- staged formats: written whole at the end

STAGED_BATCH = 8192  # rows per parquet row group and per write


def _batches(rows: np.ndarray, ids: Iterator):
    for start in range(0, rows.shape[0], STAGED_BATCH):
        chunk = np.asarray(rows[start:start + STAGED_BATCH])
        chunk_ids = list(itertools.islice(ids, len(chunk)))
        if len(chunk_ids) != len(chunk):
            raise UserError("the input has fewer records than when the run began", "leave the input alone during a run, then rerun")
        yield chunk, chunk_ids


def _write_parquet(tmp: Path, rows: np.ndarray, ids: Iterator, pooling: str, record: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, id_type = None, None
    try:
        for chunk, chunk_ids in _batches(rows, ids):
            id_array = pa.array(chunk_ids, type=id_type)
            if pooling == "score":
                columns = {"id": id_array, "tokens": pa.array(chunk[:, 0].astype(np.int64)),
                           "logprob": pa.array(chunk[:, 1]), "mean_nll": pa.array(chunk[:, 2])}
            else:
                columns = {"id": id_array, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), chunk.shape[1])}
            table = pa.table(columns)
            if writer is None:
                id_type = id_array.type
                schema = table.schema.with_metadata({METADATA_KEY: json.dumps(record, sort_keys=True)})
                writer = pq.ParquetWriter(str(tmp), schema)
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
    finally:
        if writer is not None:
            writer.close()


def _write_jsonl(tmp: Path, rows: np.ndarray, ids: Iterator, pooling: str, record: dict) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        for chunk, chunk_ids in _batches(rows, ids):
            for id_, row in zip(chunk_ids, chunk.tolist()):
                if pooling == "score":
                    item = {"id": id_, "tokens": int(row[0]), "logprob": row[1], "mean_nll": None if row[2] != row[2] else row[2]}
                else:
                    item = {"id": id_, "embedding": row}
                f.write(json.dumps(item) + "\n")


STAGED_WRITERS = {"parquet": _write_parquet, "jsonl": _write_jsonl}


def discard(output: Path) -> None:
    partial_path(output).unlink(missing_ok=True)
    journal_path(output).unlink(missing_ok=True)


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the journal


@dataclass
class JournalState:
    header: dict
    position: Position
    lines_done: int
    truncated_before: int  # lines cut in the windows before position's window
    windows: list[dict] = field(default_factory=list)  # every window's record, in order
    steps: list[dict] = field(default_factory=list)  # every step's record, in order (rows and their checksum)
    position_window: int = 0  # the window the position is in


def write_journal_header(path: Path, header: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(header) + "\n"))


def read_journal(path: Path) -> JournalState:
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError) as exc:
        raise UserError(f"the journal {path} of the unfinished run is damaged", "start over with --restart") from exc
    windows: list[dict] = []
    records: dict[tuple[int, int], dict] = {}  # (window, step) -> its record
    for text in lines[1:]:
        try:
            record = json.loads(text)
        except json.JSONDecodeError:  # a record cut short by a kill: the rows it names are redone
            continue
        if "steps" in record:
            if not windows or windows[-1]["window"] != record["window"]:
                windows.append(record)
        elif "step" in record:
            records[record["window"], record["step"]] = record
    if not windows:
        return JournalState(header, Position(), 0, 0)
    last = windows[-1]
    steps = {s: r["lines"] for (w, s), r in records.items() if w == last["window"]}
    truncated_before = sum(w["truncated"] for w in windows[:-1])
    finished = 0
    while finished in steps:
        finished += 1
    seen = (windows, list(records.values()))
    if finished >= last["steps"]:
        position = Position(last["line"] + last["lines"], last["byte_end"], last["token"] + last["tokens"], 0)
        return JournalState(header, position, position.line, truncated_before + last["truncated"], *seen, last["window"] + 1)
    position = Position(last["line"], last["byte"], last["token"], finished)
    return JournalState(header, position, last["line"] + sum(steps[s] for s in range(finished)), truncated_before, *seen, last["window"])


# ---------------------------------------------------------------- rank 0's writer


class RowWriter:
    """A thread that writes rows where the layout says and journals what is on disk.

    `window(...)` and `rows(...)` queue work; the thread drains everything queued, writes it,
    syncs the data once (group commit), then appends the journal records of that group.
    """

    def __init__(self, layout: OutputLayout, journal: Path, depth: int = 16):
        self.layout = layout
        self._fd = os.open(layout.path, os.O_WRONLY)
        self._journal = os.open(journal, os.O_WRONLY | os.O_APPEND)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="moeshard-writer", daemon=True)
        self._thread.start()

    def window(self, record: dict, offsets: np.ndarray | None) -> None:
        """A window starts: its journal record, and (--pooling none) its lines' token offsets."""
        writes = [(self.layout.offset_at(record["line"]), offsets)] if offsets is not None else []
        self._put((writes, record))

    def rows(self, record: dict, places: list[tuple[int, np.ndarray]]) -> None:
        """One step's rows: (byte offset, [n, d_model] float32 rows) pairs, and its journal record."""
        self._put((places, record))

    def close(self) -> None:
        """Wait until everything queued is on disk and journaled."""
        self._put(None)
        self._thread.join()
        os.close(self._fd)
        os.close(self._journal)
        self._raise()

    def _put(self, item) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            if isinstance(self.error, OSError):  # the resume is offered by the output's owner, when there is one
                raise UserError(f"cannot write the output {self.layout.path} ({self.error.strerror})",
                                "free space on its disk or fix its permissions") from self.error
            raise self.error

    def _loop(self) -> None:
        try:
            while True:
                group = [self._queue.get()]
                while group[-1] is not None:
                    try:
                        group.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                work = [item for item in group if item is not None]
                for places, record in work:
                    self._write(places, record)
                if any(places for places, _ in work):
                    _sync_data(self._fd)
                if work:
                    os.write(self._journal, "".join(json.dumps(record) + "\n" for _, record in work).encode())
                if group[-1] is None:
                    return
        except BaseException as exc:
            self.error = exc


    def _write(self, places: list[tuple[int, np.ndarray]], record: dict) -> None:
        """Write the rows, and record in the journal which rows they are and their crc32 (a resume checks them)."""
        crc = 0
        for offset, rows in places:
            data = np.ascontiguousarray(rows).data.cast("B")
            _pwrite_all(self._fd, data, offset)
            crc = zlib.crc32(data, crc)
        if places:
            record["crc"] = crc
        if "step" in record:
            start, size = self.layout.rows_start, self.layout.row_bytes
            record["rows"] = [[(offset - start) // size, np.asarray(rows).nbytes // size] for offset, rows in places]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
