"""`run`'s input formats, read in this process: every format and compression gives the same texts,
the same windows re-entered mid-file (as a resume does), the same ids and the same warnings.
Real workers read them in test_run.py (one run per reader path)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys

import pytest

from moeshard_cli.errors import UserError
from moeshard_cli.run.inputs import BOM, Tally, input_spec, read_windows, record_ids, records, scan_input

# Empty and whitespace-only texts, commas, quotes, tabs inside a text, non-ASCII, a long text.
TEXTS = ["first, with a comma", "", 'say "hi"', "   ", "h\u00e9llo w\u00f6rld \u2713", "tab\tinside", "", "x" * 300, "last"]
IDS = [f"doc-{i}" for i in range(len(TEXTS))]


def write(path, fmt: str, compression: str | None = None, ids: bool = True, bom: bool = False):
    """TEXTS (and IDS) as a file of `fmt`, optionally compressed."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"text": TEXTS, **({"id": IDS} if ids else {})}
        pq.write_table(pa.table(columns), path, row_group_size=2)  # several row groups: the skip crosses them
        return path
    if fmt == "txt":
        data = "".join(t + "\n" for t in TEXTS)
    elif fmt == "jsonl":
        data = "".join(json.dumps({"text": t, **({"id": i} if ids else {})}) + "\n" for t, i in zip(TEXTS, IDS))
    else:
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        writer.writerow(["id", "text"] if ids else ["text"])
        writer.writerows([[i, t] if ids else [t] for t, i in zip(TEXTS, IDS)])
        data = out.getvalue()
    raw = (BOM if bom else b"") + data.encode()
    if compression == "gz":
        raw = gzip.compress(raw)
    elif compression == "zst":
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


CASES = [("txt", None), ("txt", "gz"), ("jsonl", None), ("jsonl", "zst"), ("csv", None), ("csv", "gz"), ("tsv", None), ("parquet", None)]


@pytest.mark.parametrize("fmt, compression", CASES, ids=[f"{f}{'.' + c if c else ''}" for f, c in CASES])
def test_every_format_reads_the_same_texts_windows_and_ids(tmp_path, fmt, compression):
    path = write(tmp_path / (f"in.{fmt}" + (f".{compression}" if compression else "")), fmt, compression)
    info = scan_input(input_spec(path))
    spec = info.spec
    assert (spec.format, spec.compression, info.lines) == (fmt, compression, len(TEXTS))
    assert info.empty == Tally(2, (2, 7)) and info.blank == Tally(1, (4,))
    assert spec.seekable == (fmt in ("txt", "jsonl") and compression is None)
    windows = list(read_windows(spec, 4))
    assert [t for w in windows for t in w.texts] == TEXTS
    again = list(read_windows(spec, 4, windows[1].first_line, windows[1].byte_start))  # a resume enters at window 1
    assert [(w.index, w.first_line, w.texts) for w in again] == [(w.index, w.first_line, w.texts) for w in windows[1:]]
    if not spec.seekable:  # entered at any record, by skipping (parquet: whole row groups of 2 first)
        assert all([t for t, _ in records(spec, first)] == TEXTS[first:] for first in range(len(TEXTS) + 1))
    expected_ids = list(range(len(TEXTS))) if fmt == "txt" else IDS
    assert spec.id_field == (None if fmt == "txt" else "id") and list(record_ids(spec, len(TEXTS))) == expected_ids


def test_the_text_field_and_the_id_field_are_chosen_or_the_record_number(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"body": t, "key": 10 * i}) + "\n" for i, t in enumerate(TEXTS)))
    spec = scan_input(input_spec(path, text_field="body", id_field="key")).spec
    assert [t for t, _ in records(spec)] == TEXTS and list(record_ids(spec, len(TEXTS))) == [10 * i for i in range(len(TEXTS))]
    spec = scan_input(input_spec(write(tmp_path / "no-ids.csv", "csv", ids=False))).spec
    assert spec.id_field is None and list(record_ids(spec, len(TEXTS))) == list(range(len(TEXTS)))
    spec = scan_input(input_spec(write(tmp_path / "data.log", "jsonl"), input_format="jsonl")).spec  # the suffix says nothing
    assert [t for t, _ in records(spec)] == TEXTS


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_a_byte_order_mark_is_dropped_and_said(tmp_path, fmt):
    path = write(tmp_path / f"in.{fmt}", fmt, bom=True)
    info = scan_input(input_spec(path))
    assert info.bom and [t for w in read_windows(info.spec, 3) for t in w.texts] == TEXTS
    assert list(read_windows(info.spec, 3))[-1].byte_end in (0, path.stat().st_size)


BAD = [
    ("in.jsonl", b'{"text": "a"}\nnot json\n', {}, 'line 2 of {p} is not a JSON object'),
    ("in.jsonl", b'{"text": "a"}\n{"body": "b"}\n', {}, "line 2 of {p} has no field 'text' (it has: body): name the text's field with --field"),
    ("in.jsonl", b'{"text": "a"}\n{"text": null}\n', {}, "line 2 of {p}: field 'text' is null, not a string"),
    ("in.csv", b"id,body\n1,a\n", {}, "{p} has no column 'text' (it has: id, body): name the text's column with --column"),
    ("in.csv", b"text\n\"open quote\n", {}, "of {p} is not valid CSV"),
    ("in.txt.gz", b"not gzip at all", {}, "cannot read input file {p}"),
    ("in.txt", b"a\n", {"id_field": "id"}, "--id-field id: {p} is read as text lines, which have no fields"),
    ("in.txt", b"a\n", {"text_field": "body"}, "--field body: {p} is read as text lines, which have no fields: drop --field, or pass --input-format"),
]


@pytest.mark.parametrize("name, data, kwargs, message", BAD, ids=[m.split(":")[0][:40] for _, _, _, m in BAD])
def test_bad_records_are_one_line_naming_where(tmp_path, name, data, kwargs, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        scan_input(input_spec(path, **kwargs))
    assert message.format(p=path) in info.value.line() and "\n" not in info.value.line() and info.value.fix


@pytest.mark.parametrize("module, name, extra", [("pyarrow", "in.parquet", "parquet"), ("zstandard", "in.txt.zst", "zstd")])
def test_a_missing_extra_is_one_line_that_names_it(tmp_path, monkeypatch, module, name, extra):
    path = write(tmp_path / name, "parquet" if extra == "parquet" else "txt", None if extra == "parquet" else "zst")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as without the extra
    monkeypatch.setitem(sys.modules, f"{module}.parquet", None)
    with pytest.raises(UserError) as info:
        scan_input(input_spec(path))
    assert info.value.line().endswith(f"is not installed: pip install 'moeshard[{extra}]'" if extra == "parquet" else
                                      f"is not installed: pip install 'moeshard[{extra}]', or decompress it (zstd -d)")
