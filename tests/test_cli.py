"""The console script as users meet it, in real subprocesses: exit codes, one-line errors for
bad values, a --help that does not wait for torch, readable piped tables, the base install.

Refusals are checked before any worker starts, so each of these takes well under a second of
moeshard's own time plus the interpreter's start.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import cli_popen, invoke, run_cli


SCRIPT = Path(sys.executable).with_name("moeshard")  # the console script pip installed beside this python


def console_script(args, env: dict | None = None, timeout: float = 60) -> tuple[int, str, str]:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "moeshard_cli"]
    proc = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and ": " in lines[0][len("error: "):], "the line names a problem and a fix"
    return lines[0]


# ---------------------------------------------------------------- usage errors: click's message, exit 2

USAGE = [
    (["shard", "tiny-switch", "--gpus", "two"], "Invalid value for '--gpus'"),
    (["shard", "tiny-switch"], "Missing option '--gpus'"),
    (["run", "--inptu", "x.txt"], "No such option: --inptu"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["bench", "--iters", "many"], "Invalid value for '--iters'"),
    (["shard", "tiny-switch", "--gpus", "2", "--dtype", "float64"], "Invalid value for '--dtype': Value error, 'float64' is not one of 'float32', 'bfloat16', 'float16'"),
    (["bench", "--device", "tpu"], "Invalid value for '--device': Value error, 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
]


@pytest.mark.parametrize("args, message", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_exit_2_with_clicks_message(args, message):
    code, out, err = console_script(args)
    assert code == 2 and message in err and "Usage: moeshard" in err
    assert "report it" not in err and "Traceback" not in err


def test_help_and_version_import_neither_torch_nor_transformers():
    probe = textwrap.dedent("""
        import sys
        from moeshard_cli.cli import main
        for argv in (["moeshard", "--help"], ["moeshard", "run", "--help"], ["moeshard", "--version"], ["moeshard", "bench", "--iters", "x"],
                     ["moeshard", "bench", "--device", "tpu"], ["moeshard", "bench", "--systems", "moeshard,megatron"],
                     ["moeshard", "bench", "--gpus", "0"], ["moeshard", "bench", "--experts", "8,x"]):
            sys.argv = argv
            try:
                main()
            except SystemExit:
                pass
        print(sorted(m for m in ("torch", "transformers", "deepspeed", "matplotlib") if m in sys.modules), file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "100"})
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    assert "unknown system megatron: choose from moeshard, deepspeed," in proc.stderr and "--gpus 0 must be at least 1" in proc.stderr
    assert "moeshard 0.1.0" in proc.stdout and "--install-completion" in proc.stdout  # shell completion is on


CHOICES = [
    (["shard", "tiny-switch", "--gpus", "2", "--dtype", "fp16"], "--dtype", "'float32', 'bfloat16', 'float16'"),
    (["run", "--input", "c.txt", "--pooling", "cls"], "--pooling", "'mean', 'last', 'none'"),
    (["run", "--input", "c.txt", "--device", "tpu"], "--device", "'auto', 'cpu', 'cuda'"),
    (["run", "--input", "c.txt", "--expert-backend", "triton"], "--expert-backend", "'auto', 'grouped_mm', 'loop', 'megablocks'"),
    (["run", "--input", "c.txt", "--attention", "flash"], "--attention", "'eager', 'fused'"),
    (["run", "--input", "c.txt", "--router", "random"], "--router", "'model', 'skewed'"),
    (["run", "--input", "c.txt", "--input-format", "xml"], "--input-format", "'txt', 'jsonl', 'csv', 'tsv', 'parquet'"),
]


def test_choice_errors_list_the_choices_before_torch_is_imported():
    """One fresh interpreter tries every wrong choice: each fails with click's usage error naming the
    choices, and torch is never imported, so the error is instant (it came after 9 s of imports)."""
    probe = textwrap.dedent("""
        import contextlib, io, json, sys, time
        from moeshard_cli.cli import main
        out = []
        for argv in json.loads(sys.argv[1]):
            sys.argv, err, t0 = ["moeshard", *argv], io.StringIO(), time.perf_counter()
            with contextlib.redirect_stderr(err):
                try:
                    main()
                except SystemExit as exc:
                    out.append([exc.code, err.getvalue(), time.perf_counter() - t0])
        print(json.dumps({"results": out, "heavy": sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)}))
    """)
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps([argv for argv, _, _ in CHOICES])], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})
    report = json.loads(proc.stdout)
    assert report["heavy"] == []  # what made it slow; wall times on a shared CI machine are too noisy to assert
    for (argv, flag, choices), (code, err, _) in zip(CHOICES, report["results"], strict=True):
        assert code == 2 and f"Invalid value for '{flag}'" in err and choices in err, err


def test_help_shows_no_value_after_a_flag_and_no_boxes():
    code, out, _ = invoke(["run", "--help"])
    assert code == 0 and "--normalize " in out and "--pooling <mean|last|none>" in out
    assert "<bool>" not in out and not set("╭│╰─") & set(out)


def test_completion_offers_the_choices_and_the_built_in_models():
    from moeshard_cli.choices import BUILTIN_MODELS, complete_model
    from moeshard_cli.families import builtin_names

    assert list(BUILTIN_MODELS) == builtin_names()  # the torch-free list is the families' own
    assert complete_model("tiny-qwen3") == ["tiny-qwen3-moe"] and "tiny-switch" in complete_model("tiny-")
    env = {"_MOESHARD_COMPLETE": "complete_bash", "COMP_WORDS": "moeshard run --pooling ", "COMP_CWORD": "3"}
    code, out, _ = console_script([], env=env)
    assert code == 0 and out.split() == ["mean", "last", "none"]


# ---------------------------------------------------------------- bad values: one line, exit 2, before any work


@pytest.fixture(scope="module")
def w2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "w2"
    code, stdout, _ = invoke(["shard", "tiny-switch", "--gpus", 2, "--out", out])
    assert code == 0 and stdout.startswith(f"shard set {out}")  # no empty line first (its progress bar, off a terminal)
    (out.parent / "in.txt").write_text("one line\nanother\n")
    return out


def run_with(w2: Path, *extra) -> list:
    return ["run", "--shards", w2, "--input", w2.parent / "in.txt", "--output", w2.parent / "o.safetensors", *extra]


BAD_RUN = [
    (["--timeout", "0.5"], "--timeout 0.5 must be at least 1"),
    (["--timeout", "0"], "--timeout 0 must be at least 1"),
    (["--timeout", "nan"], "--timeout nan is not a finite number"),
    (["--nnodes", "0"], "--nnodes 0 must be at least 1"),
    (["--nnodes", "2", "--rdzv-endpoint", "not-a-host-port"], "--rdzv-endpoint 'not-a-host-port' is not HOST:PORT"),
    (["--skew", "nan", "--router", "skewed"], "--skew nan is not a finite number"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--window", "0"], "--window 0 must be at least 1"),
    (["--resume", "--restart"], "--resume and --restart exclude each other"),
    (["--nnodes", "2", "--rdzv-endpoint", "nohost.invalid:29400"], "--rdzv-endpoint host 'nohost.invalid' does not resolve"),
]


@pytest.mark.parametrize("extra, message", BAD_RUN, ids=[" ".join(a) for a, _ in BAD_RUN])
def test_bad_run_values_are_one_line(w2, extra, message):
    code, _, err = invoke(run_with(w2, *extra))
    assert code == 2 and one_line(err).startswith(f"error: {message}")
    assert not (w2.parent / "o.safetensors").exists()


BAD_BENCH = [
    (["--skew", "nan"], "--skew nan is not a finite number"),
    (["--gpus", "0"], "--gpus 0 must be at least 1"),
    (["--max-cell-seconds", "-1"], "--max-cell-seconds -1 must be positive"),
    (["--timeout", "0"], "--timeout 0 must be at least 1"),
    (["--timeout", "-5"], "--timeout -5 must be at least 1"),
    (["--capacity-factor", "0"], "--capacity-factor 0 must be positive"),
    (["--systems", "moeshard,deepspeed,megatron"], "--systems names unknown system megatron"),
    (["--experts", "0,8"], "--experts must be positive"),
]


@pytest.mark.parametrize("extra, message", BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_bad_bench_values_are_one_line(extra, message, monkeypatch):
    """Without the bench extra (deepspeed, psutil, matplotlib) too: the wrong value is named, not the extra."""
    for name in ("deepspeed", "psutil", "matplotlib"):
        monkeypatch.setitem(sys.modules, name, None)  # what find_spec reads as not installed
    code, out, err = invoke(["bench", *extra, "--plot", "fig.png"])
    assert code == 2 and one_line(err).startswith(f"error: {message}")
    assert "estimated time" not in out  # refused before anything started


def test_a_parquet_output_without_pyarrow_is_refused_before_any_work(w2, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else find_spec(name, *a))
    code, _, err = invoke(["run", "--shards", w2, "--input", w2.parent / "in.txt", "--output", w2.parent / "o.parquet"])
    assert code == 2 and one_line(err) == f"error: --output {w2.parent / 'o.parquet'} is a parquet file and pyarrow is not installed: pip install 'moeshard[parquet]'"


def test_input_that_is_a_directory(w2):
    code, _, err = invoke(["run", "--shards", w2, "--input", w2.parent, "--output", w2.parent / "o.safetensors"])
    assert code == 2 and "--input" in one_line(err) and "is a directory" in err


@pytest.mark.parametrize("gpus, message", [(0, "--gpus must be at least 1, got 0"), (1000, "1000 CPU workers on")])
def test_demo_blames_its_own_flag_and_writes_nothing(tmp_path, gpus, message):
    code, _, err = invoke(["demo", "--gpus", gpus, "--out", tmp_path / "demo"])
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "demo").exists()


def _manifest(w2: Path, tmp_path: Path, edit) -> Path:
    import shutil

    copy = tmp_path / "set"
    shutil.copytree(w2, copy)
    data = json.loads((copy / "moeshard.json").read_text())
    edit(data)
    (copy / "moeshard.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("files"), "no 'files'"),
    (lambda d: d.update(world_size="2"), "'world_size' is '2', not a int"),
    (lambda d: d.update(world_size=0), "world size 0"),
    (lambda d: d["files"][0].pop("sha256"), "a rank file entry lacks"),
    (lambda d: d.update(dtype="float8"), "unknown dtype"),
], ids=["missing-key", "world-size-a-string", "world-size-zero", "file-without-sha", "dtype"])
def test_a_damaged_manifest_is_one_line(w2, tmp_path, edit, message):
    shards = _manifest(w2, tmp_path, edit)
    code, _, err = invoke(run_with(shards))
    line = one_line(err)
    assert code == 2 and "moeshard.json is corrupt" in line and message in line and "--force" in line


def test_a_manifest_world_size_of_a_billion_is_refused_without_filling_memory(w2, tmp_path):
    """Its numbers are checked against the files it lists before anything is sized from them; the
    process runs under a 4 GiB address-space limit (the old code reached 23 GB resident)."""
    import resource

    shards = _manifest(w2, tmp_path, lambda d: d.update(world_size=10**9))
    limit = 4 << 30
    proc = subprocess.run([sys.executable, "-m", "moeshard_cli", *map(str, run_with(shards))], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"}, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    line = one_line(proc.stderr)
    assert proc.returncode == 2 and "moeshard.json is corrupt (it says world size 1000000000 but lists 2 rank files and 2 slices)" in line


def _escaping_name(data):
    data["files"][1]["name"] = "../other-set/rank-00001-of-00002.safetensors"


@pytest.mark.parametrize("edit, message", [
    (_escaping_name, "rank file name '../other-set/rank-00001-of-00002.safetensors' is not a plain file name inside the shard set"),
    (lambda d: d["files"][1].update(name="/etc/passwd"), "rank file name '/etc/passwd' is not a plain file name"),
    (lambda d: d.update(slices=[[0, 60], [65, 130]]), "do not follow each other from 0"),
    (lambda d: d["files"][1].update(rank=0), "rank file entry 1 says rank 0"),
    (lambda d: d["dims"].update(d_model="64"), "'dims' is not the model's dimensions"),
    (lambda d: d.update(family="gpt2"), "its model family: gpt2 is not a family moeshard serves"),
], ids=["parent-folder", "absolute", "slices-with-a-gap", "rank-twice", "dims-not-numbers", "unknown-family"])
def test_manifest_entries_are_confined_and_consistent(w2, tmp_path, edit, message):
    other = tmp_path / "other-set"
    other.mkdir()
    (other / "rank-00001-of-00002.safetensors").write_bytes((w2 / "rank-00001-of-00002.safetensors").read_bytes())
    code, _, err = invoke(run_with(_manifest(w2, tmp_path, edit)))
    line = one_line(err)
    assert code == 2 and "moeshard.json is corrupt" in line and message in line


def test_a_rank_file_that_links_out_of_the_shard_set_is_refused(w2, tmp_path):
    shards = _manifest(w2, tmp_path, lambda d: None)
    outside = tmp_path / "elsewhere.safetensors"
    (shards / "rank-00001-of-00002.safetensors").rename(outside)
    (shards / "rank-00001-of-00002.safetensors").symlink_to(outside)
    code, _, err = invoke(run_with(shards))
    line = one_line(err)
    assert code == 2 and "rank-00001-of-00002.safetensors links out of the shard set" in line and str(outside) in line


@pytest.mark.parametrize("flag", ["--output", "--json"])
def test_a_fifo_is_not_an_output(w2, tmp_path, flag):
    fifo = tmp_path / ("o.safetensors" if flag == "--output" else "o.json")
    os.mkfifo(fifo)
    args = ["run", "--shards", w2, "--input", w2.parent / "in.txt", "--output", tmp_path / "other.safetensors", flag, fifo]
    code, _, err = invoke(args)
    assert code == 2 and one_line(err) == f"error: {flag} {fifo} is a FIFO (named pipe), not a regular file: give {flag} a regular file or a new name"
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not (tmp_path / "other.safetensors").exists()


def test_a_fifo_as_input_is_named_for_what_it_is(w2, tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    code, _, err = invoke(["run", "--shards", w2, "--input", fifo, "--output", tmp_path / "o.safetensors"])
    line = one_line(err)
    assert code == 2 and line.startswith(f"error: --input {fifo} is a FIFO (named pipe), not a regular file") and "does not exist" not in line


# ---------------------------------------------------------------- nodes that never meet: one line within --timeout


@pytest.mark.parametrize("node_rank", [0, 1], ids=["only-node-0", "only-node-1"])
def test_a_missing_node_is_one_line_within_the_timeout(w2, node_rank):
    from moeshard_cli.launch import free_port

    start = time.monotonic()
    code, out, err = run_cli(run_with(w2, "--nnodes", 2, "--node-rank", node_rank, "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                                      "--timeout", 5), timeout=120)
    assert code == 2 and f"node {node_rank} of 2 could not meet the others" in one_line(err)
    assert time.monotonic() - start < 5 + 15  # the timeout plus start-up, not minutes
    assert f"node {node_rank} of 2: waiting up to 5 s" in out  # it says what it waits for


def test_two_nodes_that_disagree_both_stop_at_once_with_one_reason(w2, tmp_path):
    """Node 1 has another input: node 0 used to wait out --timeout, then print a DistStoreError."""
    from conftest import cli_popen
    from moeshard_cli.launch import free_port

    other = tmp_path / "other.txt"
    other.write_text("a different line\n" * 2)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [cli_popen(["run", "--shards", w2, "--input", text, "--output", tmp_path / f"o{n}.safetensors", "--nnodes", 2, "--node-rank", n,
                        "--rdzv-endpoint", endpoint, "--timeout", 120], env={"TMPDIR": str(tmp_path)})
             for n, text in ((0, w2.parent / "in.txt"), (1, other))]
    started = time.monotonic()
    ended = [node.communicate(timeout=150) for node in nodes]
    assert time.monotonic() - started < 60  # both, far from --timeout 120
    for node, (_, err) in zip(nodes, ended):
        line = one_line(err)
        assert node.returncode == 2 and "the input file, shard set or options of node 1 differ from node 0's" in line, line


# ---------------------------------------------------------------- signals


def test_sigterm_during_shard_cleans_up_and_exits_143(tmp_path):
    out = tmp_path / "set"
    proc = cli_popen(["shard", "switch-base-8", "--gpus", 2, "--out", out])
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.tmp-*")) or max(p.stat().st_size for p in out.glob(".*.tmp-*")) < 8 << 20:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and one_line(err).startswith("error: interrupted (SIGTERM): nothing of the shard set")
    assert not out.exists(), "temporary rank files were left behind"


# ---------------------------------------------------------------- piped tables


def test_piped_tables_keep_their_columns(w2):
    """Not a terminal (as in CI logs or `| tee`), and no COLUMNS: rich must not cut the table to 80 columns."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"MOESHARD_PROGRESS_SECONDS": "0"}
    proc = subprocess.run([sys.executable, "-m", "moeshard_cli", *map(str, run_with(w2, "--restart"))], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "wall time (command / encode loop)" in proc.stdout and "\u2026" not in proc.stdout
    # and a plain progress line instead of the terminal's bar (here after every step: the interval is 0)
    progress = [line for line in proc.stdout.splitlines() if line.startswith("encoding: ")]
    assert progress and progress[-1].startswith("encoding: 2/2 lines (100%), ") and " tok/s, elapsed 0:00:" in progress[-1]


def test_piped_bench_table_keeps_its_columns(monkeypatch):
    import io

    from moeshard_cli.bench.report import print_tables
    from moeshard_cli.cli import make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    result = json.loads((Path(__file__).resolve().parents[1] / "docs" / "results" / "bench-default.json").read_text())
    console = make_console()
    console.file = io.StringIO()
    print_tables(console, result, per_layer=False)
    text = console.file.getvalue()
    assert "deepspeed" in text and "\u2026" not in text


# ---------------------------------------------------------------- the base install


def without_bench_extra(tmp_path: Path) -> dict:
    """The environment of a base install: deepspeed, psutil and matplotlib cannot be imported and
    importlib.util.find_spec says they are absent (a None entry in sys.modules does both)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        for name in ("deepspeed", "psutil", "matplotlib"):
            sys.modules[name] = None
    """))
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}


def test_bench_without_its_extra_is_one_line(tmp_path):
    code, out, err = console_script(["bench", "--plot", tmp_path / "fig.png"], env=without_bench_extra(tmp_path))
    line = one_line(err)
    assert code == 2 and "needs psutil, deepspeed, matplotlib" in line and 'pip install "moeshard[bench]"' in line
    assert "estimated time" not in out


def test_bench_values_are_checked_before_its_extra(tmp_path):
    """Without deepspeed a wrong flag is still named, not hidden behind "needs deepspeed"."""
    code, _, err = console_script(["bench", "--skew", "-0.1"], env=without_bench_extra(tmp_path))
    assert code == 2 and one_line(err).startswith("error: --skew -0.1 is negative")


# ---------------------------------------------------------------- bench: refused before an hour of work


def test_a_broken_matplotlib_is_refused_before_the_bench(tmp_path):
    """A matplotlib that raises on import is found before the bench, not after it (when the results were lost)."""
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    code, out, err = console_script(["bench", "--model", "tiny-switch", "--systems", "moeshard", "--plot", tmp_path / "p.png"],
                                    env={"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    line = one_line(err)
    assert code == 2 and line.startswith("error: --plot needs matplotlib, which fails to load (ImportError: broken on purpose)")
    assert "estimated time" not in out and not (tmp_path / "p.png").exists()


def test_an_internal_error_is_one_line_that_asks_for_debug(monkeypatch):
    """The catch-all itself once failed (click.Exit is gone from typer's click): 40 lines of traceback, exit 1."""
    from moeshard_cli.bench.options import BenchOptions

    def broken(self):
        raise RuntimeError("an internal error\nwith a second line")

    monkeypatch.setattr(BenchOptions, "check_values", broken)
    code, _, err = invoke(["bench"])
    assert code == 1 and one_line(err) == "error: RuntimeError: an internal error: rerun with --debug for the traceback and report it"


def test_absurd_bench_sizes_are_refused_up_front():
    started = time.monotonic()
    code, out, err = invoke(["bench", "--seq-len", 10**9, "--batch-sizes", 10**6, "--systems", "moeshard"])
    line = one_line(err)
    assert code == 2 and line.startswith("error: --seq-len 1000000000 with --batch-sizes 1000000 needs at least") and "per worker" in line
    assert "--seq-len 120" in line and "estimated time" not in out and time.monotonic() - started < 10


def test_a_bad_skew_list_gets_a_skew_example():
    code, _, err = invoke(["bench", "--skew", "0,abc"])
    line = one_line(err)
    assert code == 2 and "--skew '0,abc' is not a list of numbers" in line and "e.g. --skew 0,0.6" in line and "8,32,128" not in line


# ---------------------------------------------------------------- progress in logs, -q, -v; bench's table at 80 columns


def test_progress_is_a_bar_on_a_terminal_lines_in_a_log_and_nothing_with_quiet(capsys, monkeypatch):
    from rich.console import Console

    from moeshard_cli.ui import Display, count_of

    monkeypatch.setenv("MOESHARD_PROGRESS_SECONDS", "7")
    assert Display.choose(Console(force_terminal=True), 0) == Display("bar", False, 7.0)
    assert Display.choose(Console(file=io.StringIO()), 1) == Display("lines", True, 7.0)
    assert Display.choose(Console(force_terminal=True), -1).mode == "off"

    tracker = Display("lines", interval_s=0).tracker("encoding", 20_000, done=5_000, count=count_of("lines"))
    tracker.advance(5_000, "1,234 tok/s")
    tracker.advance(2_500)
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("encoding: 10,000/20,000 lines (50%), 1,234 tok/s, elapsed 0:00:00, ETA 0:00:")
    assert second.startswith("encoding: 12,500/20,000 lines (62%), 1,234 tok/s, elapsed 0:00:00, ETA 0:00:")

    slow = Display("lines", interval_s=3600).tracker("encoding", 10)  # nothing until the interval has passed
    quiet = Display("off").tracker("encoding", 10)
    for tracker in (slow, quiet):
        tracker.advance(5, "x")
        tracker.print("detail")
    assert capsys.readouterr().out == "detail\n"  # -v's detail shows without -q, never with it


def test_shard_in_a_log_prints_byte_progress_and_quiet_only_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESHARD_PROGRESS_SECONDS", "0")
    code, out, err = invoke(["shard", "tiny-switch", "--gpus", 2, "--out", tmp_path / "loud"])
    assert code == 0, err
    progress = [line for line in out.splitlines() if line.startswith("sharding: ")]
    assert progress and " MiB (" in progress[-1] and "/s, elapsed 0:00:" in progress[-1] and "(100%)" in progress[-1]
    assert "shard set" in out  # the summary table
    code, out, err = invoke(["-q", "shard", "tiny-switch", "--gpus", 2, "--out", tmp_path / "quiet"])
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'quiet'}" and err == ""


def test_quiet_and_verbose_exclude_each_other():
    code, _, err = invoke(["-q", "-v", "bench"])
    assert code == 2 and one_line(err) == "error: --quiet and --verbose exclude each other: pass one of them"


def test_help_shows_no_value_for_flags(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = invoke(["--help"])
    flags = [line for line in out.splitlines() if any(f in line for f in ("--quiet", "--verbose", "--debug", "--version"))]
    assert code == 0 and len(flags) == 4 and not any("<bool>" in line for line in flags), flags
    code, out, _ = invoke(["bench", "--help"])
    assert "<auto|cpu|cuda>" in out and not any("<bool>" in line for line in out.splitlines() if "--per-layer" in line or "--paper" in line)


def test_systems_complete_as_a_comma_list():
    from moeshard_cli.bench.options import complete_systems

    assert complete_systems("") == ["moeshard", "deepspeed", "deepspeed-dropless", "ep", "hf", "tp"]
    assert complete_systems("moeshard,deep") == ["moeshard,deepspeed", "moeshard,deepspeed-dropless"]
    assert complete_systems("ep,hf,") == ["ep,hf,moeshard", "ep,hf,deepspeed", "ep,hf,deepspeed-dropless", "ep,hf,tp"]


def narrow_result() -> dict:
    """The default sweep's results, with the widest system name, a sub-second cell and a skipped one."""
    result = json.loads((Path(__file__).resolve().parents[1] / "docs" / "results" / "bench-default.json").read_text())
    dropless = dict(result["cells"][1], system="deepspeed-dropless", samples_ms=[35_904.0, 36_100.5, 41_250.0], experts=1024)
    skipped = dict(result["cells"][0], system="hf", samples_ms=[], skipped="needs a full copy of the experts per worker (9.1 GiB), 3.2 GiB free")
    fast = dict(result["cells"][0], system="tp", samples_ms=[850.0, 870.2, 990.4])
    result["cells"] += [dropless, fast, skipped]
    return result


@pytest.mark.parametrize("width", [80, 200])
def test_bench_table_fits_the_terminal_without_cutting_a_cell(width):
    from rich.console import Console

    from moeshard_cli.bench.report import COLUMNS, print_tables

    console = Console(file=io.StringIO(), width=width)
    print_tables(console, narrow_result(), per_layer=False)
    text = console.file.getvalue()
    assert "\u2026" not in text and max(len(line.rstrip()) for line in text.splitlines()) <= width
    header = next(line for line in text.splitlines() if "system" in line and "TTFT" in line).split()
    assert header == (list(COLUMNS) if width == 200 else list(COLUMNS[3:]))  # every column there, the narrow one as headings
    if width == 80:
        assert "E=8 B=8 skew 0.6" in text and "E=1,024 B=8 skew 0.6" in text
    assert "36.1 s" in text and "35.9-40.2 s" in text and "36100" not in text  # seconds when large
    assert "870 ms" in text and "854-966 ms" in text  # ms below a second
    assert "skipped [1]" in text and "[1] E=8 B=8 skew 0.6 hf: needs a full copy of the experts per worker (9.1 GiB)" in text.replace("\n", " ")
