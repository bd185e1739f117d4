"""The pieces of the streaming `moeshard run`, in this process: the schedule, the input pass,
windows, tokenization, the output layout, the journal and the guards on the user's files."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import ByT5Tokenizer

from conftest import write_lines
from moeshard_cli.errors import UserError
from moeshard_cli.run import outputs
from moeshard_cli.run.command import RunOptions
from moeshard_cli.run.outputs import Position
from moeshard_cli.run.inputs import input_spec, read_windows, scan_input, tokenize
from moeshard_cli.run.schedule import plan_window, round_window, spread, step_tokens

# ---------------------------------------------------------------- schedule

PLANS = [(0, 3, 2), (1, 3, 4), (2, 1, 4), (10, 3, 1), (10, 3, 3), (37, 4, 2), (100, 7, 4), (5, 100, 3), (64, 32, 2), (1000, 32, 3)]


def random_lengths(n: int, seed: int = 0, lo: int = 1, hi: int = 200) -> list[int]:
    return torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n, batch, world", PLANS)
def test_plan_window_covers_every_line_once(n, batch, world):
    lengths = random_lengths(n, n)
    steps = plan_window(lengths, batch, world)
    assert all(len(step) == world for step in steps)
    flat = [i for step in steps for b in step for i in b]
    assert sorted(flat) == list(range(n))
    assert len(steps) == -(-n // (batch * world))
    for step in steps:
        lines = sum(len(b) for b in step)
        assert all(len(b) <= -(-lines // world) <= batch for b in step)


@pytest.mark.parametrize("n, batch, world", PLANS)
def test_steps_take_consecutive_lengths_longest_first(n, batch, world):
    """Each step's lines are the next world * batch of the length order (low padding)."""
    lengths = random_lengths(n, n)
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    for s, step in enumerate(plan_window(lengths, batch, world)):
        assert sorted(i for b in step for i in b) == sorted(order[s * batch * world:(s + 1) * batch * world])


@pytest.mark.parametrize("batch", [32, 64, 128])
@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_token_spread_is_within_five_percent(batch, world, seed):
    """Mixed lengths (1-512 tokens), full steps: busiest rank / mean <= 1.05, far from the old round robin."""
    lengths = random_lengths(batch * world * 6, seed, 1, 512)
    for step in plan_window(lengths, batch, world):
        assert spread(step_tokens(step, lengths)) <= 1.05


def test_round_robin_of_sorted_batches_was_unbalanced():
    """What the schedule replaces: whole sorted batches dealt round robin give rank 0 the longest."""
    lengths = random_lengths(64, 1, 1, 512)
    order = sorted(range(64), key=lambda i: -lengths[i])
    old = [[order[k * 8:(k + 1) * 8] for k in range(r, 8, 4)] for r in range(4)]
    old_tokens = [sum(lengths[i] for b in batches[:1] for i in b) for batches in old]
    assert spread(old_tokens) > 1.2
    assert all(spread(step_tokens(s, lengths)) <= 1.05 for s in plan_window(lengths, 8, 4))


def test_plan_window_rejects_a_batch_below_one():
    with pytest.raises(ValueError):
        plan_window([3, 4], 0, 2)


@pytest.mark.parametrize("window, batch, world, expected", [(8192, 32, 2, 8192), (100, 32, 2, 128), (1, 3, 3, 9), (65, 4, 4, 80)])
def test_round_window_is_whole_steps(window, batch, world, expected):
    assert round_window(window, batch, world) == expected


# ---------------------------------------------------------------- the input file


@pytest.mark.parametrize("data, lines", [
    (b"a\n\nb\n", ["a", "", "b"]),
    (b"a\n\nb", ["a", "", "b"]),
    (b"\n", [""]),
    (b"\n\n", ["", ""]),
    (b"x\r\ny\r\n\r\n", ["x", "y", ""]),
    (b"  spaced  \n\tz", ["  spaced  ", "\tz"]),
    ("h\u00e9llo \u2713\n\u65e5\u672c\n".encode(), ["h\u00e9llo \u2713", "\u65e5\u672c"]),
])
def test_lines_keep_empty_lines_and_strip_the_newline(tmp_path, data, lines):
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    info = scan_input(input_spec(path))
    assert info.lines == len(lines) and info.bytes == len(data)
    for window in (1, 2, 100):
        assert [t for w in read_windows(input_spec(path), window) for t in w.texts] == lines


def test_windows_restart_at_a_recorded_byte_offset(tmp_path):
    path = write_lines(tmp_path / "in.txt", [f"line {i} " + "\u00e9" * (i % 7) for i in range(23)])
    windows = list(read_windows(input_spec(path), 5))
    assert [w.index for w in windows] == [0, 1, 2, 3, 4] and [len(w.texts) for w in windows] == [5, 5, 5, 5, 3]
    assert windows[-1].byte_end == path.stat().st_size
    again = list(read_windows(input_spec(path), 5, windows[2].first_line, windows[2].byte_start))
    assert [(w.index, w.first_line, w.texts) for w in again] == [(w.index, w.first_line, w.texts) for w in windows[2:]]


@pytest.mark.parametrize("data, line", [(b"\xff\n", 1), (b"ok\nok\n\xe9t\xe9\n", 3), (b"a\n\nb\n\nc \x80", 5), ("\u00e9\n".encode() + b"\xc3", 2)])
def test_scan_names_the_line_that_is_not_utf8(tmp_path, data, line):
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        scan_input(input_spec(path))
    assert f"not UTF-8 (line {line}," in info.value.line() and info.value.fix


def test_scan_finds_a_bad_byte_across_chunks(tmp_path, monkeypatch):
    from moeshard_cli.run import inputs

    monkeypatch.setattr(inputs, "CHUNK", 7)
    path = tmp_path / "in.txt"
    path.write_bytes("ab\n\u00e9\u00e9\u00e9\ncd\nxy\n".encode() + b"\xc3(\n")
    with pytest.raises(UserError, match=r"not UTF-8 \(line 5,"):
        scan_input(input_spec(path))
    path.write_bytes(("\u00e9" * 20 + "\n" + "\u2713" * 9).encode())  # characters split across chunk borders
    assert scan_input(input_spec(path)).lines == 2


def test_scan_rejects_missing_empty_and_directories(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_input(input_spec(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        scan_input(input_spec(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="is a directory"):
        scan_input(input_spec(tmp_path))


def test_scan_fingerprints_the_content(tmp_path):
    import hashlib

    path = tmp_path / "in.txt"
    path.write_bytes(b"one\ntwo\n")
    assert scan_input(input_spec(path)).sha256 == hashlib.sha256(b"one\ntwo\n").hexdigest()


def test_tokenize_truncates_like_transformers():
    tokenizer = ByT5Tokenizer()
    lines = ["", "short", "x" * 9, "y" * 10, "z" * 40, "\u00e9\u2713\u65e5" * 5, "w" * 11]
    ids, cut = tokenize(lines, tokenizer, max_length=10)
    full = tokenizer(lines)["input_ids"]
    assert ids == tokenizer(lines, truncation=True, max_length=10)["input_ids"]
    assert cut == [i for i, row in enumerate(full) if len(row) > 10] == [3, 4, 5, 6]
    assert all(row[-1] == tokenizer.eos_token_id for row in ids)  # default special tokens kept
    assert [len(r) for r in ids] == [1, 6, 10, 10, 10, 10, 10]
    assert tokenize(lines, tokenizer, max_length=512)[1] == []


# ---------------------------------------------------------------- the output file


def write_all(layout: outputs.OutputLayout, rows_by_line: list[np.ndarray]) -> int:
    """Write rows the way rank 0 does (line by line, out of order); returns the token count."""
    fd = os.open(layout.path, os.O_WRONLY)
    tokens, starts = 0, []
    for rows in rows_by_line:
        starts.append(tokens)
        tokens += len(rows)
    for line in reversed(range(len(rows_by_line))):
        rows = rows_by_line[line].astype("<f4")
        if layout.pooling == "mean":
            os.pwrite(fd, rows.tobytes(), layout.embedding_at(line))
        else:
            os.pwrite(fd, rows.tobytes(), layout.token_at(starts[line]))
            os.pwrite(fd, np.array([starts[line]], "<i8").tobytes(), layout.offset_at(line))
    os.close(fd)
    return tokens


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_safetensors_layout_loads_with_safetensors(tmp_path, pooling):
    out = tmp_path / "emb.safetensors"
    meta = {"source": {"revision": None, "kind": "builtin"}, "lines": 4, "note": "x" * 300,
            "legacy": {"source_revision": None, "lines": 4, "normalize": False, "family": "switch_transformers"}}
    layout = outputs.plan_layout(out, "safetensors", pooling, 4, 3, meta)
    outputs.create_partial(layout)
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1 if pooling == "mean" else n, 3)) for n in (2, 0, 5, 1)]
    tokens = write_all(layout, rows)
    outputs.finalize(layout, tokens, out)
    assert not outputs.partial_path(out).exists() and out.stat().st_size == layout.size(tokens)
    with safe_open(str(out), framework="pt") as f:  # safetensors metadata is str -> str: the typed record is one JSON string
        assert json.loads(f.metadata().pop("moeshard")) == {k: v for k, v in meta.items() if k != "legacy"}
        assert f.metadata() == {"moeshard": f.metadata()["moeshard"], "source_revision": "null", "lines": "4", "normalize": "false",
                                "family": "switch_transformers"}
        if pooling == "mean":
            assert torch.equal(f.get_tensor("embeddings"), torch.tensor(np.concatenate(rows), dtype=torch.float32))
        else:
            assert f.get_tensor("offsets").tolist() == [0, 2, 2, 7, 8]
            assert torch.equal(f.get_tensor("hidden_states"), torch.tensor(np.concatenate(rows), dtype=torch.float32))


def test_npy_layout_loads_with_numpy(tmp_path):
    out = tmp_path / "emb.npy"
    layout = outputs.plan_layout(out, "npy", "mean", 3, 4, {"run_fingerprint": "abc", "options": {"seed": 7, "shards": None}})
    outputs.create_partial(layout)
    rows = [np.full((1, 4), i, dtype="<f4") for i in range(3)]
    outputs.finalize(layout, write_all(layout, rows), out)
    assert np.array_equal(np.load(out), np.concatenate(rows)) and np.load(out, mmap_mode="r").dtype == np.float32
    assert json.loads((tmp_path / "emb.npy.json").read_text()) == {"run_fingerprint": "abc", "options": {"seed": 7, "shards": None}}
    assert outputs.recorded_digest(out) == "abc"  # what --resume on a finished output compares


@pytest.mark.parametrize("name, pooling, message", [
    ("o.bin", "mean", "has no known suffix"), ("o", "mean", "has no known suffix"), ("o.npy", "none", "cannot hold --pooling none"),
])
def test_output_format_is_chosen_by_suffix(tmp_path, name, pooling, message):
    with pytest.raises(ValueError, match=message):
        outputs.output_format(tmp_path / name, pooling)
    with pytest.raises(UserError) as info:  # the options name the flag and the fix
        RunOptions(input=tmp_path / "in.txt", shards=tmp_path / "set", output=tmp_path / name, pooling=pooling).validate()
    assert info.value.line().startswith(f"--output {tmp_path / name}") and ".safetensors" in info.value.fix
    assert outputs.output_format(tmp_path / "o.safetensors", pooling).name == "safetensors"


def test_a_full_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    layout = outputs.plan_layout(tmp_path / "o.safetensors", "safetensors", "mean", 1000, 64, {})
    with pytest.raises(UserError, match="GiB are free"):
        outputs.create_partial(layout)
    assert not outputs.partial_path(tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------- the journal


def journal_with(tmp_path, records: list[dict | str]):
    path = tmp_path / ".o.journal"
    outputs.write_journal_header(path, {"argv": ["run"]})
    with open(path, "a") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return outputs.read_journal(path)


def window(k: int, line: int, lines: int, steps: int, truncated: int = 0) -> dict:
    return {"window": k, "line": line, "lines": lines, "byte": 10 * line, "byte_end": 10 * (line + lines),
            "token": 7 * line, "tokens": 7 * lines, "truncated": truncated, "steps": steps}


def step(k: int, s: int, lines: int = 4) -> dict:
    return {"window": k, "step": s, "lines": lines}


JOURNALS = {
    "empty": ([], Position(), 0, 0),
    "window-started": ([window(0, 0, 8, 2)], Position(0, 0, 0, 0), 0, 0),
    "mid-window": ([window(0, 0, 8, 2), step(0, 0)], Position(0, 0, 0, 1), 4, 0),
    "window-done": ([window(0, 0, 8, 2, 1), step(0, 0), step(0, 1)], Position(8, 80, 56, 0), 8, 1),
    "second-window": ([window(0, 0, 8, 2, 1), step(0, 0), step(0, 1), window(1, 8, 8, 2, 2), step(1, 0, 3)], Position(8, 80, 56, 1), 11, 1),
    "torn-last-record": ([window(0, 0, 8, 2), step(0, 0), '{"window": 0, "st'], Position(0, 0, 0, 1), 4, 0),
    "resumed-window-written-again": ([window(0, 0, 8, 3), step(0, 0), window(0, 0, 8, 3), step(0, 1)], Position(0, 0, 0, 2), 8, 0),
}


@pytest.mark.parametrize("name", list(JOURNALS))
def test_journal_gives_the_restart_position(tmp_path, name):
    records, position, lines_done, truncated_before = JOURNALS[name]
    state = journal_with(tmp_path, records)
    assert (state.position, state.lines_done, state.truncated_before) == (position, lines_done, truncated_before)


# ---------------------------------------------------------------- the user's files


def test_output_may_not_be_the_input_or_inside_the_shard_set(tmp_path):
    shards = tmp_path / "set"
    shards.mkdir()
    data = tmp_path / "in.txt"
    data.write_text("x\n")
    (tmp_path / "link.txt").hardlink_to(data)
    cases = [({"--output": data}, "is the input file"), ({"--output": tmp_path / "link.txt"}, "is the input file"),
             ({"--output": shards / "o.safetensors"}, "is inside the shard set"), ({"--json": shards / "f.json"}, "is inside the shard set"),
             ({"--output": tmp_path / "o.safetensors", "--json": tmp_path / "o.safetensors"}, "are the same file")]
    for named, message in cases:
        with pytest.raises(UserError, match=message):
            outputs.guard_user_files(named, data, shards)
    outputs.guard_user_files({"--output": tmp_path / "o.safetensors", "--json": tmp_path / "o.json"}, data, shards)
    assert data.read_text() == "x\n" and list(shards.iterdir()) == []


def test_header_is_padded_exactly(tmp_path):
    layout = outputs.plan_layout(tmp_path / "o.safetensors", "safetensors", "none", 10, 8, {"k": "v"})
    for tokens in (0, 1, 10**12):
        header = layout.header(tokens)
        assert len(header) == layout.data_start and layout.data_start % 8 == 0
        assert struct.unpack("<Q", header[:8])[0] == layout.data_start - 8
        assert json.loads(header[8:])["hidden_states"]["shape"] == [tokens, 8]


def test_rank_file_checksums_are_cached_until_a_file_changes(tmp_path, monkeypatch):
    from conftest import invoke
    from moeshard_cli.shard import manifest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert invoke(["shard", "tiny-switch", "--gpus", 2, "--out", tmp_path / "set"])[0] == 0
    shards = manifest.read_shard_set(tmp_path / "set")
    hashed = []
    original = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path.name) or original(path))
    manifest.check_files(shards, verify=True)
    assert sorted(hashed) == ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    manifest.check_files(shards, verify=True)  # unchanged files: nothing read again
    assert len(hashed) == 2
    victim = shards.rank_file(1)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size, written in place
    with open(victim, "r+b") as f:
        f.write(data)
    with pytest.raises(UserError, match="rank-00001-of-00002.safetensors fails its sha256 checksum"):
        manifest.check_files(shards, verify=True)
    assert hashed[2:] == ["rank-00001-of-00002.safetensors"]
