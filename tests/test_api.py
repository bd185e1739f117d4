"""The Python API (`import moeshard`), the worker pool, and the one-step `run --model X --gpus N`.

Four launches in all, shared by every test: two one-step `moeshard run`s (cut, then reuse), one
`run --score`, and one Pool whose workers serve every API call (tiny-switch and tiny-qwen3-moe,
reloaded in place). The test that kills a pool worker runs last, since it ends the pool.
Everything else is checked in this process, without workers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, write_lines
from moeshard_cli.errors import UserError
from moeshard_cli.shard.manifest import MANIFEST

pytestmark = pytest.mark.slow

# Empty and blank lines, non-ASCII, a line past --max-length, lengths that pad every batch.
CORPUS = ["Hello world.", "", "non-ASCII: h\u00e9llo w\u00f6rld \u2713", "x", "   ",
          "a line long enough to be cut at forty byte tokens, and then some more words", "the quick brown fox",
          "\u65e5\u672c\u8a9e", "medium length line with some words", "the last line"]
MAX_LENGTH = 40
ONE_STEP = ["run", "--model", "tiny-switch", "--gpus", 2, "--max-length", MAX_LENGTH, "--batch-size", 3]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def cache(place):
    """A shard cache of the module's own: MOESHARD_CACHE is read by this process and its workers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOESHARD_CACHE", str(place / "cache"))
        yield place / "cache"


@pytest.fixture(scope="module")
def corpus(place) -> Path:
    return write_lines(place / "corpus.txt", CORPUS)


@pytest.fixture(scope="module")
def one_step(place, cache, corpus):
    """`run --model tiny-switch --gpus 2` twice: the first cuts into the cache, the second reuses it."""
    runs = []
    for n in (1, 2):
        output = place / f"one-step-{n}.npy"
        code, out, err = invoke([*ONE_STEP, "--input", corpus, "--output", output])
        assert code == 0, err
        sets = sorted(p for p in cache.iterdir())
        runs.append({"err": err, "rows": np.load(output), "sets": sets,
                     "stamp": [(p / MANIFEST).stat().st_mtime_ns for p in sets]})
    return runs


@pytest.fixture(scope="module")
def pool(one_step):
    """One pool for every API test, on the set the one-step run cut; counts the launches it makes."""
    import moeshard
    from moeshard_cli.run import pool as pool_module

    launches = []
    real = pool_module.launch

    def counted(*args, **kwargs):
        launches.append(args)
        return real(*args, **kwargs)

    pool_module.launch = counted
    try:
        with moeshard.Pool("tiny-switch", gpus=2) as workers:
            workers.launches = launches
            yield workers
    finally:
        pool_module.launch = real


# ---------------------------------------------------------------- one step from a model to vectors


def test_one_step_run_cuts_once_then_reuses_the_cache(one_step):
    first, second = one_step
    assert "cut tiny-switch for 2 workers (float32) into" in first["err"] and "first use" in first["err"]
    assert "first use" not in second["err"] and "cut tiny-switch" not in second["err"]
    assert len(first["sets"]) == 1 and first["sets"][0].name.startswith("tiny-switch-w2-float32-")
    assert second["sets"] == first["sets"] and second["stamp"] == first["stamp"]  # not re-cut, not rewritten
    assert not [p for p in first["sets"][0].parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert np.array_equal(first["rows"], second["rows"]) and first["rows"].shape == (len(CORPUS), 64)


# ---------------------------------------------------------------- the API: the same rows as `moeshard run`


def test_encode_equals_runs_rows_in_input_order(pool, one_step, corpus):
    rows = one_step[0]["rows"]
    got = pool.encode(CORPUS, max_length=MAX_LENGTH, batch_size=3)
    assert got.dtype == np.float32 and got.shape == rows.shape
    assert np.abs(got - rows).max() <= 1e-6
    # an iterable (a generator, read once) gives the same rows
    streamed = pool.encode((text for text in CORPUS), max_length=MAX_LENGTH, batch_size=3)
    assert np.abs(streamed - rows).max() <= 1e-6
    with open(corpus, encoding="utf-8") as lines:  # an open file: each line's own line ending is dropped
        assert np.abs(pool.encode(lines, max_length=MAX_LENGTH, batch_size=3) - rows).max() <= 1e-6
    # input order: the reversed corpus gives the reversed rows, which differ from the rows as they are
    backwards = pool.encode(CORPUS[::-1], max_length=MAX_LENGTH, batch_size=3)
    assert np.abs(backwards - rows[::-1]).max() <= 1e-5
    assert np.abs(backwards - rows).max() > 1e-2


def test_pool_serves_every_call_with_one_start(pool, tmp_path):
    from moeshard_cli.run.command import RunOptions, run
    from moeshard_cli.ui import Display

    place = tmp_path
    before = list(pool.pids)
    pool.encode(["one call", "another"])
    summary = run(RunOptions(input=write_lines(place / "pids.txt", CORPUS), shards=pool.shards, output=place / "pids.npy",
                             progress=Display("off"), restart=True, argv=[]), pool=pool._workers)
    assert [r["pid"] for r in summary.result["ranks"]] == before == pool.pids  # the same two processes served
    assert len(pool.launches) == 1 and len(before) == 2 and all(_alive(pid) for pid in before)


def test_pool_normalize_and_pooling_none(pool, one_step):
    rows = one_step[0]["rows"]
    unit = pool.encode(CORPUS, max_length=MAX_LENGTH, batch_size=3, normalize=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    assert np.abs(unit - rows / norms).max() <= 1e-5
    tokens = pool.encode(CORPUS[:3], max_length=MAX_LENGTH, pooling="none")
    assert [t.shape for t in tokens] == [(13, 64), (1, 64), (29, 64)]  # ByT5: a byte a token, plus </s>
    assert np.abs(tokens[0].mean(0) - rows[0]).max() <= 1e-5  # mean pooling is the mean of these rows


def test_score_equals_run_score_rows(pool, place, corpus, cache):
    import pandas

    output = place / "scores.csv"
    code, _, err = invoke(["run", "--model", "tiny-qwen3-moe", "--gpus", 2, "--score", "--input", corpus, "--output", output])
    assert code == 0, err
    expected = pandas.read_csv(output)
    got = pool.score(CORPUS, model="tiny-qwen3-moe")  # the pool's workers load the decoder in place
    assert list(got.dtype.names) == list(expected.columns) == ["line", "tokens", "logprob", "mean_nll"]
    for name in expected.columns:
        assert np.allclose(got[name], expected[name].to_numpy(), rtol=0, atol=1e-6, equal_nan=True), name
    assert np.isnan(got["mean_nll"][1]) and (got["logprob"][2:] < 0).all()  # "" is one token (</s>): no prediction
    # and back to the encoder the pool started with: its rows again
    back = pool.encode(CORPUS, max_length=MAX_LENGTH, batch_size=3)
    assert np.abs(back - np.load(place / "one-step-1.npy")).max() <= 1e-6



def test_empty_input_and_bad_texts(pool):
    assert pool.encode([]).shape == (0, 64)
    for texts, needle in ((["a\nb"], "texts[0] holds a line break"), (["ok\n", "a\r\n\n"], "texts[1] holds"), (["ok", 3], "texts[1] is a int"), ("one string", "a single string")):
        with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            pool.encode(texts)


# ---------------------------------------------------------------- a worker dies during a call: last, it ends the pool


def test_a_killed_worker_fails_the_call_naming_its_rank(pool, place):
    texts = [f"line {i} " + "word " * (i % 23) for i in range(2000)]
    outcome = {}

    def call():
        try:
            pool.encode(texts)
        except BaseException as exc:  # noqa: BLE001: the test reads what the call raised
            outcome["error"] = exc

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    deadline = time.monotonic() + 30
    while not pool._workers._pending and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(pool.pids[1], signal.SIGKILL)
    caller.join(60)
    assert not caller.is_alive(), "the call hangs after its worker died"
    error = outcome.get("error")
    assert isinstance(error, UserError) and "worker rank 1 failed: killed by SIGKILL" in str(error), error
    kept = Path(error.fix.rsplit(" ", 1)[-1])  # the failed launch keeps its worker logs for the user: not for a test
    assert kept.is_dir() and "moeshard-failed-run-logs-" in kept.name
    shutil.rmtree(kept)
    with pytest.raises(UserError, match="worker rank 1 failed"):  # the pool stays dead, and says why
        pool.encode(["again"])


# ---------------------------------------------------------------- without workers: the cache key, the rules


def test_cache_key_follows_source_workers_dtype_and_local_files(tmp_path, monkeypatch):
    from moeshard_cli.shard.cache import cache_key, cached_set_dir

    monkeypatch.setenv("MOESHARD_CACHE", str(tmp_path / "c"))
    keys = {cache_key("tiny-switch", 2, "float32"), cache_key("tiny-switch", 3, "float32"),
            cache_key("tiny-switch", 2, "bfloat16"), cache_key("tiny-olmoe", 2, "float32")}
    assert len(keys) == 4 and cache_key("tiny-switch", 2, "float32") == cache_key("tiny-switch", 2, "float32")
    assert cached_set_dir("tiny-switch", 2).parent == tmp_path / "c"
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "config.json").write_text("{}")
    before = cache_key(str(local), 2, "float32")
    (local / "config.json").write_text('{"changed": 1}')
    assert cache_key(str(local), 2, "float32") != before


def test_concurrent_first_uses_leave_one_complete_set(tmp_path, monkeypatch):
    from moeshard_cli.shard.cache import ensure_shard_set
    from moeshard_cli.shard.manifest import check_files, read_shard_set
    from moeshard_cli.shard.sources import resolve

    monkeypatch.setenv("MOESHARD_CACHE", str(tmp_path / "c"))
    resolve("tiny-switch")  # transformers' lazy imports are not thread-safe the first time (two processes would not share them)
    got = []
    threads = [threading.Thread(target=lambda: got.append(ensure_shard_set("tiny-switch", 2))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] == got[1] and [p.name for p in (tmp_path / "c").iterdir()] == [got[0].name]
    check_files(read_shard_set(got[0]), verify=True)


def _fake_set(root: Path, world: int, age: int) -> Path:
    root.mkdir(parents=True)
    (root / MANIFEST).write_text(json.dumps({"world_size": world}))
    os.utime(root / MANIFEST, ns=(age, age))
    return root


def test_run_without_shards_takes_the_newest_fitting_set(tmp_path, monkeypatch):
    from moeshard_cli.shard.manifest import default_shard_set

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no shard set found.*--model SOURCE --gpus N"):
        default_shard_set()
    demo = _fake_set(tmp_path / "moeshard-demo" / "tiny-switch-w2", 2, 10**18)
    assert default_shard_set() == Path("moeshard-demo/tiny-switch-w2")  # `moeshard demo`'s set is found
    _fake_set(tmp_path / "moeshard-shards" / "a-w4", 4, 3 * 10**18)
    _fake_set(tmp_path / "moeshard-shards" / "b-w2", 2, 2 * 10**18)
    notes = []
    assert default_shard_set(note=notes.append) == Path("moeshard-shards/a-w4")
    assert "the newest of 3 shard sets" in notes[0] and "--shards" in notes[0]
    assert default_shard_set(2, notes.append) == Path("moeshard-shards/b-w2") and "of 2" in notes[1]
    with pytest.raises(UserError, match="no shard set for 3 workers.*--gpus 3"):
        default_shard_set(3)
    assert demo.is_dir()


def test_model_and_gpus_flags_are_checked_before_any_work(tmp_path, monkeypatch):
    from moeshard_cli.api import shard

    monkeypatch.setenv("MOESHARD_CACHE", str(tmp_path / "c"))
    corpus = write_lines(tmp_path / "c.txt", ["a"])
    w2 = shard("tiny-switch", 2, tmp_path / "w2")
    for extra, needle in ((["--model", "tiny-switch", "--shards", w2], "--model and --shards exclude each other"),
                          (["--shards", w2, "--gpus", 3], f"--shards {w2} is cut for 2 workers, not --gpus 3"),
                          (["--model", "tiny-switch", "--gpus", 0], "--gpus"),
                          (["--model", "tiny-switch", "--gpus", 2, "--dtype", "fp16"], "'--dtype'"),
                          (["--model", "tiny-switch", "--gpus", 2, "--batch-size", 0], "--batch-size")):
        code, _, err = invoke(["run", "--input", corpus, *extra])
        assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing was cut




def _alive(pid: int) -> bool:
    from moeshard_cli.launch import process_alive

    return process_alive(pid)
