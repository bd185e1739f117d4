"""`moeshard run` end to end: real worker processes against transformers' own encoder.

Every `moeshard run` costs seconds of process start-up, so the runs share one corpus that
holds every hard case (padding, empty lines, lines past --max-length, non-ASCII) and are
started together, three at a time, by one module fixture; the tests then read their outputs.
Bad input that is refused before any worker starts goes through the CLI in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import invoke, write_lines
from moeshard_cli.launch import free_port
from moeshard_cli.shard.manifest import MANIFEST, read_shard_set
from moeshard_cli.moe.routing import RouterSpec
from moeshard_cli.reference import reference_model, reference_outputs
from moeshard_cli.launch import MAX_CPU_WORKERS_PER_CORE
from moeshard_cli.run.schedule import round_window

pytestmark = pytest.mark.slow

TOL = 1e-4
MAX_LENGTH = 40
BATCH = 3
SKEW = RouterSpec("skewed", skew=0.6)
# Row 0 and others empty; lengths vary so batches of 3 are padded; several lines are longer
# than 40 byte tokens (ASCII and multi-byte ones, cut inside a character); non-ASCII text.
CORPUS = [
    "",
    "Hello world.",
    "A line that is much longer than the forty tokens this run keeps, so it must be truncated.",
    "short",
    "non-ASCII: h\u00e9llo w\u00f6rld, na\u00efve caf\u00e9 \u2713",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "",
    "emoji \U0001f642\U0001f680 and more",
    "x",
    "tabs\tand  spaces  ",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0438 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442, longer than forty bytes",
    "The quick brown fox jumps over the lazy dog",
    "12345",
    "",
    "medium length line with some words",
    "a b c d e f g",
    "   ",
    "the last line",
]
FEW = ["two lines, four workers", "\u00e9"]


# ---------------------------------------------------------------- helpers


@dataclass
class Result:
    code: int
    out: str
    err: str
    seconds: float
    output: Path
    json: Path | None


def start(args, log: Path, cwd: Path | None = None, env: dict | None = None, python: list[str] | None = None, stdin: Path | None = None):
    """`moeshard ARGS` (or `python PYTHON ARGS`) in a subprocess whose stdout/stderr go to files (no pipe to fill);
    standard input is the file `stdin` (else none)."""
    out, err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
    argv = [sys.executable, *(python or ["-m", "moeshard_cli"]), *map(str, args)]
    with open(stdin or os.devnull, "rb") as feed:
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, "COLUMNS": "200", **(env or {})}, stdout=out, stderr=err,
                                stdin=feed, text=True, start_new_session=True)
    return proc, out, err


def finish(proc, out, err, started: float, output: Path, json_path: Path | None, timeout: float = 300) -> Result:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
        err.close()
    return Result(code, Path(out.name).read_text(), Path(err.name).read_text(), time.perf_counter() - started, output, json_path)


def run_groups(groups: dict[str, list[dict]], parallel: int = 3, timeout: float = 300) -> dict[str, list[Result]]:
    """Run groups of `moeshard run` commands, `parallel` groups at a time; a group's commands run together.
    (Three at a time keeps two cores busy through each run's idle start-up and shut-down.)"""
    pending, running, results = list(groups.items()), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmds = pending.pop(0)
            procs = []
            for cmd in cmds:
                procs.append((start(cmd["args"], cmd["log"], cmd.get("cwd"), cmd.get("env"), cmd.get("python"), cmd.get("stdin")), cmd))
                time.sleep(cmd.get("then_wait", 0))
            running.append((name, time.perf_counter(), procs))
        for item in list(running):
            name, started, procs = item
            if time.perf_counter() - started > timeout:  # hung: stop it and its workers
                for (p, _, _), _ in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            if all(p.poll() is not None for (p, _, _), _ in procs):
                results[name] = [finish(p, o, e, started, cmd["output"], cmd.get("json")) for (p, o, e), cmd in procs]
                running.remove(item)
        time.sleep(0.05)
    return results


def pool_runs(plan: dict[str, dict]) -> dict[str, list[Result]]:
    """`moeshard run`s as the library runs them (run/command.run, the code `moeshard run` calls once it has
    parsed its flags), on one WorkerPool per world size: each size's workers start once and load each
    plan's shard set in turn, instead of a process importing torch and transformers per run.
    plan: {name: RunOptions fields (shards, input, output, ...)}; a refusal is a Result with code 2."""
    from moeshard_cli.errors import UserError
    from moeshard_cli.run.command import run
    from moeshard_cli.run.options import RunOptions
    from moeshard_cli.run.pool import WorkerPool
    from moeshard_cli.shard.manifest import read_shard_set
    from moeshard_cli.ui import Display

    by_world: dict[int, list[str]] = {}
    for name, fields in plan.items():
        by_world.setdefault(read_shard_set(Path(fields["shards"])).world_size, []).append(name)
    results = {}
    for world, names in sorted(by_world.items()):
        with WorkerPool(Path(plan[names[0]]["shards"]), device="cpu") as pool:
            for name in names:
                started = time.perf_counter()
                opts = RunOptions(**plan[name], progress=Display("off"), argv=["run", "(tests: a worker pool)"])
                try:
                    run(opts, pool=pool)
                    code, err = 0, ""
                except UserError as exc:
                    code, err = 2, f"error: {exc}"
                results[name] = [Result(code, "", err, time.perf_counter() - started, opts.output, opts.json_path)]
    return results


def read_output(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def error_line(err: str) -> str:
    """The one line a refusal prints; fails if there is anything else (a traceback, a warning)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    return lines[0]


def assert_no_output(path: Path) -> None:
    assert not path.exists()
    if path.parent.is_dir():
        assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")], "temporary files left behind"


def shard(world: int, out: Path) -> Path:
    code, _, err = invoke(["shard", "tiny-switch", "--gpus", world, "--out", out])
    assert code == 0, err
    return out


# `moeshard ARGV[2:]` with every worker running `failing_worker` (sys.argv[1]: this directory)
FAILING_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
import test_run
import moeshard_cli.run.command
launch = moeshard_cli.run.command.launch
moeshard_cli.run.command.launch = lambda entrypoint, *args, **kwargs: launch(test_run.failing_worker, *args, **kwargs)
sys.argv = ["moeshard", *sys.argv[2:]]
from moeshard_cli.cli import main
main()
"""


def failing_worker(job):
    """worker_main, except that rank $MOESHARD_TEST_FAIL_RANK raises in its third MoE layer."""
    from moeshard_cli.moe.layer import ShardedSparseMLP
    from moeshard_cli.run.job import worker_main

    forward, calls = ShardedSparseMLP.forward, []

    def failing(self, hidden_BSD):
        calls.append(1)
        if os.environ["RANK"] == os.environ["MOESHARD_TEST_FAIL_RANK"] and len(calls) == 3:
            raise ValueError("injected failure")
        return forward(self, hidden_BSD)

    ShardedSparseMLP.forward = failing
    return worker_main(job)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def shard_sets(place) -> dict[int, Path]:
    """World 1 lives at ./moeshard-shards/ of `place / "home"`, where `run` finds it on its own."""
    sets = {1: shard(1, place / "home" / "moeshard-shards" / "tiny-switch-w1")}
    for world in (2, 3, 4):
        sets[world] = shard(world, place / "sets" / f"w{world}")
    return sets


@pytest.fixture(scope="module")
def corpora(place) -> dict[str, Path]:
    """CORPUS as text, and in the other formats that take a different reader in the workers: zstd
    .jsonl with ids, gzip .csv without, .parquet with an id column of its own name."""
    import csv
    import gzip
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paths = {"main": place / "corpus.txt", "few": place / "few.txt", "jsonl.zst": place / "corpus.jsonl.zst",
             "csv.gz": place / "corpus.csv.gz", "parquet": place / "corpus.parquet"}
    write_lines(paths["main"], CORPUS)
    paths["few"].write_text("\n".join(FEW), encoding="utf-8")  # no final newline
    jsonl = "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    table = io.StringIO()
    csv.writer(table).writerows([["text"], *[[t] for t in CORPUS]])
    paths["csv.gz"].write_bytes(gzip.compress(table.getvalue().encode()))
    pq.write_table(pa.table({"key": [100 + i for i in range(len(CORPUS))], "text": CORPUS}), paths["parquet"], row_group_size=5)
    return paths


def node_copy(shards: Path, dst: Path, keep_rank: int) -> Path:
    """A copy of a shard set without the rank files of the other node's ranks."""
    shutil.copytree(shards, dst)
    for rank, entry in enumerate(read_shard_set(dst).data["files"]):
        if rank != keep_rank:
            (dst / entry["name"]).unlink()
    return dst


def run_args(corpus: Path, output: Path, *extra) -> list:
    return ["run", "--input", corpus, "--output", output, "--batch-size", BATCH, "--max-length", MAX_LENGTH, *extra]


MATRIX = [(w, r) for w in (1, 2, 3, 4) for r in ("model", "skewed")]
# Other batch sizes and windows: several windows, partial steps, ranks without a line in a step.
ORDER = [(1, 2, 3), (2, 1, 4), (2, 4, 1), (3, 5, 7)]


@pytest.fixture(scope="module")
def runs(place, shard_sets, corpora) -> dict[str, list[Result]]:
    """All successful runs, started together: the world x router matrix, fewer lines than
    workers, and two nodes on this machine. (1, model) finds its shard set on its own;
    (3, model) keeps every token (--pooling none)."""
    out = place / "out"
    out.mkdir()
    env = {"TMPDIR": str(place)}  # worker log directories land here
    groups: dict[str, list[dict]] = {}
    # Two nodes: node 1 starts first, so the c10d rendezvous (which orders nodes by process
    # id) would make it rank 0; --node-rank must still give rank 0 to node 0. Started first,
    # while the free port is still free.
    # Each node holds only the rank file of the rank it hosts, as on two machines.
    endpoint = f"127.0.0.1:{free_port()}"
    output = out / "two-nodes.safetensors"
    node_sets = [node_copy(shard_sets[2], place / f"node{n}-set", keep_rank=n) for n in (0, 1)]
    groups["two-nodes"] = [
        {"args": run_args(corpora["main"], output, "--shards", node_sets[1], "--nnodes", 2, "--node-rank", 1,
                          "--rdzv-endpoint", endpoint, "--timeout", 60),
         "log": out / "node1", "env": env, "output": output, "then_wait": 1.0},
        {"args": run_args(corpora["main"], output, "--json", out / "node0.json", "--shards", node_sets[0], "--nnodes", 2, "--node-rank", 0,
                          "--rdzv-endpoint", endpoint, "--timeout", 60),
         "log": out / "node0", "env": env, "output": output, "json": out / "node0.json"},
    ]
    for world, router in MATRIX:
        name = f"w{world}-{router}"
        output, json_path = out / f"{name}.safetensors", out / f"{name}.json"
        extra = [] if (world, router) == (1, "model") else ["--shards", shard_sets[world]]
        if router == "skewed":
            extra += ["--router", "skewed", "--skew", SKEW.skew]
        if (world, router) == (3, "model"):
            extra += ["--pooling", "none"]
        cwd = place / "home" if (world, router) == (1, "model") else None
        groups[name] = [{"args": run_args(corpora["main"], output, "--json", json_path, *extra), "log": out / name, "cwd": cwd,
                         "env": env, "output": output, "json": json_path}]
    # A worker that raises while its peer waits in a collective: the peer's "connection
    # closed" must not be reported in its place.
    output = out / "failing-rank.safetensors"
    groups["failing-rank"] = [{"args": ["run", "--shards", shard_sets[2], "--input", corpora["main"], "--output", output, "--batch-size", BATCH],
                               "python": ["-c", FAILING_RUN, str(Path(__file__).parent)], "log": out / "failing-rank",
                               "env": {**env, "MOESHARD_TEST_FAIL_RANK": "1"}, "output": output}]
    for world, batch, window in ORDER:
        name, output = f"order-{world}-{batch}-{window}", out / f"order-{world}-{batch}-{window}.safetensors"
        groups[name] = [{"args": ["run", "--shards", shard_sets[world], "--input", corpora["main"], "--output", output, "--batch-size", batch,
                                  "--window", window, "--max-length", MAX_LENGTH], "log": out / name, "env": env, "output": output}]
    for name, output, extra in (("npy", out / "w2.npy", []), ("normalized", out / "w2-normalized.safetensors", ["--normalize"]),
                                ("fused", out / "w2-fused.safetensors", ["--attention", "fused"])):
        groups[name] = [{"args": run_args(corpora["main"], output, "--shards", shard_sets[2], *extra), "log": out / name, "env": env, "output": output}]
    # one run per reader path in the workers, each against the .txt run of its world size; the
    # last one reads standard input, writes its figures to stdout (--json -) and the table to stderr
    for name, corpus, world, output, extra in (
            ("jsonl-zst", corpora["jsonl.zst"], 2, out / "from-jsonl.parquet", []),
            ("csv-gz", corpora["csv.gz"], 4, out / "from-csv.jsonl", []),
            ("stdin-parquet", "-", 1, out / "from-stdin.npy", ["--input-format", "parquet", "--id-column", "key", "--json", "-"])):
        groups[name] = [{"args": run_args(corpus, output, "--shards", shard_sets[world], *extra), "log": out / name, "env": env,
                         "output": output, "stdin": corpora["parquet"] if corpus == "-" else None}]
    output = out / "few.safetensors"
    groups["few"] = [{"args": ["run", "--shards", shard_sets[4], "--input", corpora["few"], "--output", output, "--batch-size", 1],
                      "log": out / "few", "env": env, "output": output}]
    return run_groups(groups)


@pytest.fixture(scope="module")
def tokenizer(shard_sets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shard_sets[2]))


@pytest.fixture(scope="module")
def reference(shard_sets, tokenizer):
    """transformers' encoder, dropless, one line at a time: reference(world, router, lines, pooling)."""
    cache: dict = {}

    def get(world: int, spec: RouterSpec, lines=tuple(CORPUS), pooling: str = "mean"):
        key = (world, spec, tuple(lines), pooling)
        if key not in cache:
            shards = read_shard_set(shard_sets[world])
            model = reference_model(shards)
            ids = tokenizer(list(lines), truncation=True, max_length=MAX_LENGTH)["input_ids"]
            cache[key] = reference_outputs(shards.family, model, ids, spec, pooling)
        return cache[key]

    return get


def succeeded(result: Result) -> None:
    assert result.code == 0, f"exit {result.code}\nstdout:\n{result.out}\nstderr:\n{result.err}"


# ---------------------------------------------------------------- exact against transformers


@pytest.mark.parametrize("world, router", MATRIX, ids=[f"w{w}-{r}" for w, r in MATRIX])
def test_embeddings_match_transformers(runs, reference, world, router):
    (result,) = runs[f"w{world}-{router}"]
    succeeded(result)
    spec = SKEW if router == "skewed" else RouterSpec()
    tensors, _ = read_output(result.output)
    if "embeddings" in tensors:
        got = tensors["embeddings"]
    else:  # --pooling none: the mean of each line's rows
        offsets = tensors["offsets"].tolist()
        got = torch.stack([tensors["hidden_states"][a:b].mean(0) for a, b in zip(offsets, offsets[1:])])
    expected = torch.stack(reference(world, spec))
    assert got.dtype == torch.float32 and got.shape == (len(CORPUS), 64)
    error = (got - expected).abs().max().item()
    assert error <= TOL, f"max abs error {error:.2e}"
    if router == "skewed":
        # the skewed assignment really differs from the checkpoint's router: this test can fail
        other = (got - torch.stack(reference(world, RouterSpec()))).abs().max().item()
        assert other > 100 * TOL


def test_pooling_none_matches_transformers_per_token(runs, reference, tokenizer):
    (result,) = runs["w3-model"]
    succeeded(result)
    tensors, meta = read_output(result.output)
    assert set(tensors) == {"hidden_states", "offsets"} and meta["pooling"] == "none"
    lengths = [len(r) for r in tokenizer(CORPUS, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    offsets = tensors["offsets"]
    assert offsets.dtype == torch.int64 and offsets.tolist() == [sum(lengths[:i]) for i in range(len(CORPUS) + 1)]
    expected = torch.cat(reference(3, RouterSpec(), pooling="none"))
    assert tensors["hidden_states"].shape == expected.shape == (sum(lengths), 64)
    assert (tensors["hidden_states"] - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("world, batch, window", ORDER, ids=[f"w{w}-batch{b}-window{n}" for w, b, n in ORDER])
def test_rows_follow_the_input_for_any_workers_batch_and_window(runs, reference, world, batch, window):
    (result,) = runs[f"order-{world}-{batch}-{window}"]
    succeeded(result)
    got = read_output(result.output)[0]["embeddings"]
    assert (got - torch.stack(reference(world, RouterSpec()))).abs().max().item() <= TOL
    default = read_output(runs["w2-model"][0].output)[0]["embeddings"]  # the built-in weights, whatever the world size
    assert (got - default).abs().max().item() <= 1e-5  # the batching changes float rounding, nothing more


def test_fused_attention_matches_transformers(runs, reference):
    (result,) = runs["fused"]
    succeeded(result)
    got, meta = read_output(result.output)
    assert meta["attention"] == "fused"
    assert (got["embeddings"] - torch.stack(reference(2, RouterSpec()))).abs().max().item() <= TOL


def test_npy_output_matches_the_safetensors_one(runs):
    import numpy as np

    (result,) = runs["npy"]
    succeeded(result)
    array = np.load(result.output)
    assert array.dtype == np.float32 and array.shape == (len(CORPUS), 64)
    assert torch.equal(torch.from_numpy(array), read_output(runs["w2-model"][0].output)[0]["embeddings"])
    assert oct(result.output.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_normalized_rows_are_the_unit_vectors_of_the_plain_ones(runs):
    (result,) = runs["normalized"]
    succeeded(result)
    got, meta = read_output(result.output)
    plain = read_output(runs["w2-model"][0].output)[0]["embeddings"]
    assert meta["normalize"] == "true"
    assert (got["embeddings"] - torch.nn.functional.normalize(plain, dim=-1)).abs().max().item() <= 1e-6
    assert (got["embeddings"].norm(dim=-1) - 1).abs().max().item() <= 1e-5


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_fewer_lines_than_workers(runs, reference):
    (result,) = runs["few"]
    succeeded(result)
    tensors, meta = read_output(result.output)
    assert meta["world_size"] == "4" and tensors["embeddings"].shape == (2, 64)
    assert (tensors["embeddings"] - torch.stack(reference(4, RouterSpec(), FEW))).abs().max().item() <= TOL


# ---------------------------------------------------------------- other input formats, other outputs


def test_every_reader_gives_the_text_runs_rows_with_their_ids(runs, corpora):
    """.jsonl.zst -> .parquet, .csv.gz -> .jsonl, parquet on standard input -> .npy: the rows of the .txt
    run of the same world size, bit for bit, and the ids of the records (or their numbers)."""
    import numpy as np
    import pandas as pd

    for name, base, ids in (("jsonl-zst", "w2-model", [f"doc-{i}" for i in range(len(CORPUS))]),
                            ("csv-gz", "w4-model", list(range(len(CORPUS)))), ("stdin-parquet", "w1-model", None)):
        (result,) = runs[name]
        succeeded(result)
        expected = read_output(runs[base][0].output)[0]["embeddings"].numpy()
        if result.output.suffix == ".npy":
            rows = np.load(result.output)
        else:
            table = pd.read_parquet(result.output) if result.output.suffix == ".parquet" else pd.read_json(result.output, lines=True)
            assert table.columns.tolist() == ["id", "embedding"] and table["id"].tolist() == ids
            rows = np.stack(table["embedding"].to_numpy()).astype(np.float32)
        assert np.array_equal(rows, expected), name
    (stdin,) = runs["stdin-parquet"]
    fig = json.loads(stdin.out)  # --json -: standard output holds the JSON alone, the table went to stderr
    assert fig["lines"] == len(CORPUS) and "expert load" in stdin.err
    record = json.loads(Path(f"{stdin.output}.json").read_text())  # .npy's metadata, beside it
    assert record["input"] | {"sha256": None} == {"path": "-", "format": "parquet", "compression": None, "text_field": "text", "id_field": "key",
                                                   "sha256": None, "bytes": corpora["parquet"].stat().st_size, "records": len(CORPUS)}
    assert not [p for p in stdin.output.parent.iterdir() if ".stdin-" in p.name]  # the spooled input is gone


def test_a_finished_output_is_refused_and_its_own_resume_is_complete(runs, shard_sets, corpora):
    (result,) = runs["w2-model"]
    before = result.output.read_bytes()
    args = run_args(corpora["main"], result.output, "--shards", shard_sets[2])
    code, out, err = invoke(args)
    assert code == 2 and error_line(err) == f"error: --output {result.output} exists (a finished output): pass --force to replace it, or choose another --output"
    code, out, err = invoke([*args, "--resume"])  # the same input, shard set and options: nothing to do
    assert code == 0 and out == "" and err.strip() == f"{result.output} is already complete (same input, shard set and options): nothing to resume"
    code, _, err = invoke([*args, "--resume", "--normalize"])
    assert code == 2 and "is a finished output of another run" in error_line(err)
    code, _, err = invoke([*args[:1], "--input", "-", *args[3:], "--resume"])
    assert code == 2 and error_line(err).startswith("error: --resume cannot continue a run that read standard input")
    assert result.output.read_bytes() == before


# ---------------------------------------------------------------- what the run reports


@pytest.mark.parametrize("world, router", MATRIX, ids=[f"w{w}-{r}" for w, r in MATRIX])
def test_header_json_and_summary(runs, shard_sets, tokenizer, world, router):
    (result,) = runs[f"w{world}-{router}"]
    succeeded(result)
    _, meta = read_output(result.output)
    auto = (world, router) == (1, "model")
    shards = Path("moeshard-shards/tiny-switch-w1") if auto else shard_sets[world]
    home = shard_sets[1].parents[1]
    assert meta["source"] == "tiny-switch"
    assert Path(meta["shards"]) == (home / shards if auto else shards).resolve()
    assert meta["world_size"] == str(world) and meta["dtype"] == "float32"
    assert meta["router"] == router and meta["max_length"] == str(MAX_LENGTH)
    # the typed record: every option that changes the output, JSON's types, absolute paths
    record = json.loads(meta["moeshard"])
    assert record["options"] == {"input_format": None, "text_field": "text", "id_field": None, "batch_size": BATCH, "max_length": MAX_LENGTH,
                                 "window": round_window(8192, BATCH, world),
                                 "pooling": "none" if (world, router) == (3, "model") else "mean", "score": False, "normalize": False,
                                 "device": "cpu", "expert_backend": "auto", "attention": "eager", "router": router,
                                 "skew": SKEW.skew if router == "skewed" else 0.0, "hot_experts": 0.1, "seed": 0}
    assert record["model"] == {"source": "tiny-switch", "source_kind": "builtin", "source_revision": None, "family": "switch_transformers",
                               "dtype": "float32"}
    assert record["input"]["path"] == str(result.output.parents[1] / "corpus.txt") and record["input"]["records"] == len(CORPUS)
    assert record["shards"]["path"] == meta["shards"] and record["output"] == {"format": "safetensors", "rows": len(CORPUS),
                                                                               "row": record["options"]["pooling"]}
    assert record["moeshard_version"] == meta["moeshard_version"] and record["run_fingerprint"] == meta["run_fingerprint"]

    full = tokenizer(CORPUS)["input_ids"]
    ids = tokenizer(CORPUS, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    truncated = sum(len(r) > MAX_LENGTH for r in full)
    assert truncated >= 3
    fig = json.loads(result.json.read_text())
    assert {"shards", "output", "world_size", "device", "backend", "lines", "truncated_lines", "tokens", "wall_s", "tokens_per_s",
            "batches", "ttft_s", "comm_s", "compute_s", "layers"} <= set(fig)
    assert fig["world_size"] == world and fig["device"] == "cpu" and fig["backend"] == "grouped_mm"
    assert fig["lines"] == len(CORPUS) and fig["truncated_lines"] == truncated
    assert fig["tokens"] == sum(len(r) for r in ids)
    assert Path(fig["output"]) == result.output and Path(fig["shards"]) == shards
    assert fig["batches"] == -(-len(CORPUS) // (BATCH * world))  # one window: steps of BATCH lines per worker
    assert set(fig["ttft_s"]) == {"mean", "p50", "p90"} and 0 < fig["ttft_s"]["p50"] <= fig["ttft_s"]["p90"]
    assert fig["wall_s"] > 0 and fig["tokens_per_s"] > 0 and fig["comm_s"] >= 0 and fig["compute_s"] > 0

    # every real token is routed exactly once per MoE layer, padding never
    from moeshard_cli.run.schedule import plan_window

    steps = plan_window([len(r) for r in ids], BATCH, world)
    per_worker = [sum(len(ids[i]) for step in steps for i in step[g]) for g in range(world)]
    assert [layer["layer"] for layer in fig["layers"]] == [1, 3]
    for layer in fig["layers"]:
        assert layer["tokens_per_worker"] == per_worker
        assert layer["mean_tokens_per_expert"] * 8 == pytest.approx(fig["tokens"])
        assert layer["mean_tokens_per_expert"] <= layer["max_tokens_per_expert"] <= fig["tokens"]
        if router == "skewed":  # expert 0 draws (1/8 + 0.6) / 1.6 = 45% of the tokens
            assert layer["max_tokens_per_expert"] > 0.3 * fig["tokens"]

    assert f"{len(CORPUS)} ({truncated} truncated)" in result.out
    assert str(result.output.name) in result.out and "expert load" in result.out
    cut = [i + 1 for i, r in enumerate(full) if len(r) > MAX_LENGTH]  # the data's surprises, said on stderr, lines counted from 1
    assert result.err.splitlines() == [
        "warning: 3 empty lines (lines 1, 7, 14), encoded as the tokenizer's empty input: the output keeps one row per line",
        "warning: 1 whitespace-only line (line 17), encoded as they are",
        f"warning: {truncated} lines longer than --max-length {MAX_LENGTH} tokens, cut to it (lines {', '.join(map(str, cut))})",
    ]


# ---------------------------------------------------------------- two nodes


def test_two_nodes_give_the_one_node_output(runs):
    node1, node0 = runs["two-nodes"]
    succeeded(node0)
    succeeded(node1)
    two, meta = read_output(node0.output)
    one, _ = read_output(runs["w2-model"][0].output)
    assert meta["world_size"] == "2"
    assert (two["embeddings"] - one["embeddings"]).abs().max().item() <= 1e-6
    # rank 0, the one writer, is on node 0 whatever order the nodes joined in
    assert "moeshard run: 2 workers" in node0.out and f"wrote {node0.output}" in node0.out
    assert "rank 0 (on another node)" in node1.out and "moeshard run:" not in node1.out
    assert json.loads(node0.json.read_text())["lines"] == len(CORPUS)
    assert [p.name for p in node0.output.parent.iterdir() if "two-nodes" in p.name] == [node0.output.name]


# ---------------------------------------------------------------- found without --shards


def test_no_fitting_shard_set_is_one_line(tmp_path, corpora):
    """Of several sets `run` takes the newest (tests/test_api.py); none for --gpus is named with the fix."""
    for name, world in (("tiny-switch-w2", 2), ("tiny-switch-w4", 4)):
        (tmp_path / "moeshard-shards" / name).mkdir(parents=True)
        (tmp_path / "moeshard-shards" / name / MANIFEST).write_text(json.dumps({"world_size": world}))
    code, _, err = invoke(["run", "--input", corpora["main"], "--gpus", 3, "--output", tmp_path / "o.safetensors"], cwd=tmp_path)
    line = error_line(err)
    assert code == 2 and "no shard set for 3 workers" in line and "tiny-switch-w2" in line and "tiny-switch-w4" in line and "--model" in line
    code, _, err = invoke(["run", "--input", corpora["main"]], cwd=tmp_path / "moeshard-shards")
    assert code == 2 and "no shard set found" in error_line(err)


# ---------------------------------------------------------------- a worker dies


def test_a_failing_worker_is_named_not_its_peer(runs, place):
    (result,) = runs["failing-rank"]
    assert not list(place.glob("pytorch-errorfile-*")), "torch's error files were left in the temporary folder"
    assert result.code == 2
    warnings = [l for l in result.err.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 2 and "empty lines" in warnings[0]  # the corpus's, said before the work
    line = error_line("\n".join(l for l in result.err.splitlines() if not l.startswith("warning: ")))
    assert "worker rank 1 failed: ValueError: injected failure" in line and "logs are in" in line
    # it failed in its second step: the first one's rows are kept for --resume, under hidden names only
    assert "lines are saved; continue with" in line and "--resume`" in line
    assert not result.output.exists()
    assert sorted(p.name for p in result.output.parent.iterdir() if p.name.startswith(f".{result.output.name}")) == [
        f".{result.output.name}.journal", f".{result.output.name}.partial"]


# A worker killed mid-run, and resuming after it: test_run_resume.py.


# ---------------------------------------------------------------- refused before any worker starts


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    (root / MANIFEST).write_text(json.dumps(data))


def _rank_file(root: Path, rank: int) -> Path:
    return root / read_shard_set(root).data["files"][rank]["name"]


def missing_rank_file(root):
    _rank_file(root, 1).unlink()


def truncated_rank_file(root):
    path = _rank_file(root, 1)
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_rank_file(root):
    path = _rank_file(root, 0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same header: only the checksum tells
    path.write_bytes(bytes(data))


def manifest_world_size(root):
    _edit_manifest(root, lambda d: d.update(world_size=3))


def manifest_bytes(root):
    _edit_manifest(root, lambda d: d["files"][1].update(bytes=d["files"][1]["bytes"] + 1))


def manifest_swapped_files(root):
    def swap(d):
        d["files"][0]["name"], d["files"][1]["name"] = d["files"][1]["name"], d["files"][0]["name"]
    _edit_manifest(root, swap)


SHARD_DAMAGE = [
    (missing_rank_file, [], ["rank file", "rank-00001-of-00002.safetensors is missing"]),
    (truncated_rank_file, [], ["rank-00001-of-00002.safetensors has", "bytes, the manifest says"]),
    (corrupt_rank_file, [], ["rank-00000-of-00002.safetensors fails its sha256 checksum"]),
    (manifest_world_size, [], ["says world size 3 but lists 2 rank files"]),
    (manifest_bytes, [], ["rank-00001-of-00002.safetensors has", "bytes, the manifest says"]),
    (manifest_swapped_files, [], ["does not match the manifest"]),
]


@pytest.mark.parametrize("damage, extra, needles", SHARD_DAMAGE, ids=[d.__name__ for d, _, _ in SHARD_DAMAGE])
def test_damaged_shard_set_is_refused(tmp_path, shard_sets, corpora, damage, extra, needles):
    root = _copy(shard_sets[2], tmp_path / "w2")
    damage(root)
    output = tmp_path / "out.safetensors"
    code, _, err = invoke(["run", "--shards", root, "--input", corpora["main"], "--output", output, *extra])
    line = error_line(err)
    assert code == 2 and all(n in line for n in needles), line
    assert "moeshard shard" in line or "re-shard" in line  # names the fix
    assert_no_output(output)


def test_corrupt_bytes_pass_the_cheap_checks(tmp_path, shard_sets, corpora, monkeypatch):
    """--no-verify skips reading whole files: the size and header checks pass (and the run goes
    on to start workers, which is stopped here)."""
    import moeshard_cli.run.command as run_module

    root = _copy(shard_sets[2], tmp_path / "w2")
    corrupt_rank_file(root)

    def no_launch(*args, **kwargs):
        raise run_module.UserError("launch reached", "")

    monkeypatch.setattr(run_module, "launch", no_launch)
    code, _, err = invoke(["run", "--shards", root, "--input", corpora["main"], "--output", tmp_path / "o.safetensors", "--no-verify"])
    assert code == 2 and "launch reached" in err


def test_output_that_is_the_input_or_inside_the_shard_set_is_refused(tmp_path, shard_sets, corpora):
    root = _copy(shard_sets[2], tmp_path / "w2")
    corpus = tmp_path / "corpus.txt"
    shutil.copyfile(corpora["main"], corpus)
    before = {p: p.read_bytes() for p in [corpus, *root.iterdir()]}
    for output, needle in ((corpus, "is the input file"), (root / "emb.safetensors", "is inside the shard set"),
                           (root / "rank-00000-of-00002.safetensors", "is inside the shard set")):
        code, _, err = invoke(["run", "--shards", root, "--input", corpus, "--output", output])
        assert code == 2 and needle in error_line(err)
    code, _, err = invoke(["run", "--shards", root, "--input", corpus, "--output", tmp_path / "o.safetensors", "--json", root / "f.json"])
    assert code == 2 and "--json" in error_line(err) and "inside the shard set" in err
    assert {p: p.read_bytes() for p in [corpus, *root.iterdir()]} == before


def test_more_workers_than_the_machine_can_host(tmp_path, corpora, monkeypatch):
    cores = 2
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    world = MAX_CPU_WORKERS_PER_CORE * cores + 1
    root = shard(world, tmp_path / f"w{world}")
    output = tmp_path / "out.safetensors"
    code, _, err = invoke(["run", "--shards", root, "--input", corpora["main"], "--output", output])
    line = error_line(err)
    assert code == 2 and f"{world} CPU workers on {cores} cores" in line and f"at most {world - 1} ranks" in line
    assert_no_output(output)


def test_cuda_without_gpus(tmp_path, shard_sets, corpora, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    output = tmp_path / "out.safetensors"
    code, _, err = invoke(["run", "--shards", shard_sets[2], "--input", corpora["main"], "--output", output, "--device", "cuda"])
    line = error_line(err)
    assert code == 2 and "has 0 GPUs" in line and "--device cpu" in line
    assert_no_output(output)


def _input(tmp_path, data: bytes | None) -> Path:
    path = tmp_path / "in.txt"
    if data is not None:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("data, needle", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"fine\n\nstill fine \xc3\xa9\nnot \xe9 utf-8\n", "is not UTF-8 (line 4"),
], ids=["missing", "empty", "not-utf8"])
def test_bad_input_is_refused(tmp_path, shard_sets, data, needle):
    path = _input(tmp_path, data)
    output = tmp_path / "out.safetensors"
    code, _, err = invoke(["run", "--shards", shard_sets[2], "--input", path, "--output", output])
    line = error_line(err)
    assert code == 2 and needle in line and str(path) in line
    assert_no_output(output)


@pytest.mark.parametrize("where", ["is-a-directory", "parent-missing", "parent-is-a-file", "json-parent-missing"])
def test_unwritable_output_is_refused(tmp_path, shard_sets, corpora, where):
    (tmp_path / "a-file").write_text("x")
    output = {"is-a-directory": tmp_path, "parent-missing": tmp_path / "nope" / "o.safetensors",
              "parent-is-a-file": tmp_path / "a-file" / "o.safetensors"}.get(where, tmp_path / "o.safetensors")
    extra = ["--json", tmp_path / "nope" / "o.json"] if where == "json-parent-missing" else []
    code, _, err = invoke(["run", "--shards", shard_sets[2], "--input", corpora["main"], "--output", output, *extra])
    line = error_line(err)
    assert code == 2 and ("cannot write" in line or "is a directory" in line)
    assert not (tmp_path / "o.safetensors").exists()


def test_node_rank_outside_the_nodes(tmp_path, shard_sets, corpora):
    output = tmp_path / "out.safetensors"
    code, _, err = invoke(["run", "--shards", shard_sets[2], "--input", corpora["main"], "--output", output,
                           "--nnodes", 2, "--node-rank", 2, "--rdzv-endpoint", "127.0.0.1:1"])
    assert code == 2 and "--node-rank 2 is outside 0..1" in error_line(err)
    assert_no_output(output)


# ---------------------------------------------------------------- the same refusals from a real process


def test_real_process_refuses_unwritable_output_fast(tmp_path, shard_sets, corpora):
    """Checked before any work: before the shard set (here missing a rank file) and the workers."""
    root = _copy(shard_sets[4], tmp_path / "w4")
    missing_rank_file(root)
    output = tmp_path / "nope" / "o.safetensors"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moeshard_cli", "run", "--shards", str(root), "--input", str(corpora["main"]),
                           "--output", str(output), "--verify"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    seconds = time.perf_counter() - started
    line = error_line(proc.stderr)
    assert proc.returncode == 2 and "cannot write --output" in line and "does not exist" in line
    assert seconds < 8, f"took {seconds:.1f} s"


def test_real_process_refuses_a_missing_input(tmp_path, shard_sets):
    proc = subprocess.run([sys.executable, "-m", "moeshard_cli", "run", "--shards", str(shard_sets[1]), "--input", str(tmp_path / "nope.txt")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    line = error_line(proc.stderr)
    assert proc.returncode == 2 and "nope.txt does not exist" in line and "--input" in line
    assert list(tmp_path.iterdir()) == []
