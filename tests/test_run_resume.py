"""`moeshard run` interrupted and resumed, from real processes: SIGKILL of the main process or of
a worker, Ctrl-C, SIGTERM, a worker killed right after spawn. Every resumed output is compared
byte for byte with an uninterrupted run of the same command.

The runs are long enough to be stopped mid-way (1,500 lines, 2 lines per worker per step,
windows of 64 lines) and short enough for CI. They share one module fixture that starts them
two or three at a time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import invoke

pytestmark = pytest.mark.slow

LINES = 1500
FLAGS = ["--batch-size", "2", "--window", "64", "--max-length", "96"]


def corpus_text(lines: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = ["moe", "expert", "shard", "token", "route", "gpu", "skew", "\u00e9t\u00e9", "\u65e5\u672c", "layer"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) + "\n" for _ in range(lines))


def journal_of(output: Path) -> Path:
    return output.with_name(f".{output.name}.journal")


def partial_of(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def steps_journaled(output: Path) -> int:
    try:
        return journal_of(output).read_text().count('"step"')
    except FileNotFoundError:
        return 0


class Run:
    """`moeshard ARGS` in its own session, output to files; keeps every pid it ever saw."""

    def __init__(self, args, log: Path, env: dict | None = None):
        self.log = log
        self.out, self.err = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "moeshard_cli", *map(str, args)], stdout=self.out, stderr=self.err,
                                     env={**os.environ, "COLUMNS": "200", **(env or {})}, start_new_session=True)
        self.pids = {self.proc.pid}

    def children(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.pids |= {k.pid for k in kids}
        return kids

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.children()
            assert self.proc.poll() is None, f"ended before {what}: {self.finish()[1]}"
            assert time.monotonic() < deadline, f"never {what}"
            time.sleep(0.05)

    def finish(self, timeout: float = 240) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.out.close()
            self.err.close()
        return code, self.log.with_suffix(".out").read_text(), self.log.with_suffix(".err").read_text()

    def assert_no_orphans(self, within: float = 10) -> None:
        deadline = time.monotonic() + within
        while alive := [p for p in self.pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
            assert time.monotonic() < deadline, f"processes left running: {alive}"
            time.sleep(0.1)


def worker_of(run: Run, local_rank: int) -> psutil.Process | None:
    """A worker's stderr goes to <log dir>/<run>/attempt_0/<local rank>/stderr.log."""
    for child in run.children():
        try:
            if any(re.search(rf"/attempt_\d+/{local_rank}/stderr\.log$", f.path) for f in child.open_files()):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


def one_error_line(err: str) -> str:
    """The one error line; the warnings about the corpus's empty lines, said before the work, may precede it."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def setup(place):
    shards = place / "w2"
    code, _, err = invoke(["shard", "tiny-switch", "--gpus", 2, "--out", shards])
    assert code == 0, err
    corpus = place / "corpus.txt"
    corpus.write_text(corpus_text(LINES), encoding="utf-8")
    logs = place / "tmp"
    logs.mkdir()
    return shards, corpus, {"TMPDIR": str(logs), "XDG_CACHE_HOME": str(place / "cache")}


def run_args(setup, output: Path, *extra) -> list:
    shards, corpus, _ = setup
    return ["run", "--shards", shards, "--input", corpus, "--output", output, *FLAGS, *extra]


@pytest.fixture(scope="module")
def baselines(setup, place):
    """Uninterrupted runs: mean pooling (.safetensors) and --pooling none."""
    env = setup[2]
    runs = {name: Run(run_args(setup, place / f"base-{name}.safetensors", *extra, "--json", place / f"base-{name}.json"), place / f"base-{name}", env)
            for name, extra in (("mean", []), ("none", ["--pooling", "none"]))}
    done = {}
    for name, run in runs.items():
        code, _, err = run.finish()
        assert code == 0, err
        done[name] = place / f"base-{name}.safetensors"
    return done


def interrupt_and_resume(setup, place, name: str, extra: list, stop, min_steps: int = 40) -> dict:
    """Start a run, let it journal `min_steps` steps, `stop(run)` it, then --resume it to the end.
    The stopped run gets a temporary directory of its own, to see what it leaves there."""
    tmp = place / f"{name}-tmp"
    tmp.mkdir()
    env = {**setup[2], "TMPDIR": str(tmp)}
    output = place / f"{name}.safetensors"
    run = Run(run_args(setup, output, *extra), place / name, env)
    run.wait_for(lambda: steps_journaled(output) >= min_steps, f"journaled {min_steps} steps")
    stopped_at = time.monotonic()
    listening = stop(run)
    code, out, err = run.finish()
    seconds = time.monotonic() - stopped_at
    left_in_group = in_process_group(run.proc.pid)  # zombies included: right after the exit, before init could reap them
    tmp_after_stop = sorted(p.name for p in tmp.iterdir())
    saved = json.loads(journal_of(output).read_text().splitlines()[0]) and steps_journaled(output)
    # the resume shares the stopped run's temporary folder: it reclaims what a SIGKILLed launcher left there
    resumed = Run([*run_args(setup, output, *extra), "--resume", "--json", place / f"{name}.json"], place / f"{name}-resume", env)
    rcode, rout, rerr = resumed.finish()
    return {"code": code, "out": out, "err": err, "seconds": seconds, "run": run, "steps_saved": saved, "output": output, "tmp": tmp,
            "resume": (rcode, rout, rerr), "figures": json.loads((place / f"{name}.json").read_text()) if rcode == 0 else None,
            "listening": listening, "left_in_group": left_in_group, "tmp_after_stop": tmp_after_stop}


def in_process_group(pgid: int) -> list[tuple[int, str]]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append((proc.pid, proc.status()))
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def listening_sockets(run: "Run") -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket the launcher and its workers listen on."""
    found = []
    for pid in {run.proc.pid, *(k.pid for k in run.children())}:
        try:
            found += [(pid, c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return found


def kill_main(run: Run) -> None:
    run.proc.send_signal(signal.SIGKILL)


def kill_worker(run: Run) -> None:
    victim = worker_of(run, 1)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)


def sigterm_main(run: Run) -> None:
    run.proc.send_signal(signal.SIGTERM)


def ctrl_c(run: Run) -> list:
    listening = listening_sockets(run)  # the job is running: its stores and gloo are up
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    return listening


@pytest.fixture(scope="module")
def interrupted(setup, place, baselines):
    return {
        "kill-main": interrupt_and_resume(setup, place, "kill-main", [], kill_main),
        "kill-worker": interrupt_and_resume(setup, place, "kill-worker", ["--pooling", "none"], kill_worker),
        "sigterm": interrupt_and_resume(setup, place, "sigterm", [], sigterm_main),
        "ctrl-c": interrupt_and_resume(setup, place, "ctrl-c", [], ctrl_c),
    }


@pytest.mark.parametrize("name, base", [("kill-main", "mean"), ("kill-worker", "none"), ("sigterm", "mean"), ("ctrl-c", "mean")])
def test_resumed_output_is_identical_to_an_uninterrupted_run(interrupted, baselines, name, base):
    case = interrupted[name]
    rcode, _, rerr = case["resume"]
    assert rcode == 0, rerr
    assert case["output"].read_bytes() == baselines[base].read_bytes()
    assert not journal_of(case["output"]).exists() and not partial_of(case["output"]).exists()


@pytest.mark.parametrize("name", ["kill-main", "kill-worker", "sigterm", "ctrl-c"])
def test_resume_redoes_at_most_the_work_in_flight(interrupted, name):
    """The resumed run starts at the journal's last step: it encodes only the lines not yet written."""
    case = interrupted[name]
    fig = case["figures"]
    assert case["steps_saved"] >= 40
    assert fig["resumed_at_line"] >= 40 * 4  # 4 lines per step on 2 workers
    assert fig["lines_encoded"] == LINES - fig["resumed_at_line"]
    assert "resumed at line" in case["resume"][1]


def test_a_killed_worker_stops_the_run_and_names_its_rank(interrupted):
    case = interrupted["kill-worker"]
    assert case["code"] != 0 and case["seconds"] < 60
    line = one_error_line(case["err"])
    assert "worker rank 1 failed: killed by SIGKILL" in line and "logs are in" in line
    assert "lines are saved; continue with `moeshard run" in line and "--resume`" in line
    case["run"].assert_no_orphans()


def test_a_killed_main_process_leaves_no_worker_behind(interrupted):
    interrupted["kill-main"]["run"].assert_no_orphans()


def test_the_log_folder_of_a_killed_launcher_is_reclaimed_by_the_next_run(interrupted):
    case = interrupted["kill-main"]
    assert [n for n in case["tmp_after_stop"] if n.startswith("moeshard-logs-")], "the SIGKILLed launcher could not remove its folder"
    assert not [p.name for p in case["tmp"].iterdir() if p.name.startswith("moeshard-logs-")]


def test_a_single_node_run_listens_on_loopback_only(interrupted):
    """The c10d stores used to listen on every interface, without authentication."""
    case = interrupted["ctrl-c"]
    launcher = case["run"].proc.pid
    assert len([s for s in case["listening"] if s[0] == launcher]) == 2  # the rendezvous store and the workers' store
    assert {address for _, address, _ in case["listening"]} <= {"127.0.0.1", "::1"}, case["listening"]


@pytest.mark.parametrize("name", ["sigterm", "ctrl-c"])
def test_a_stopped_run_leaves_no_zombie_in_its_process_group(interrupted, name):
    """multiprocessing's resource tracker outlived the launcher and stayed a zombie until init reaped it."""
    assert interrupted[name]["left_in_group"] == []


@pytest.mark.parametrize("name, code, signame", [("sigterm", 143, "SIGTERM"), ("ctrl-c", 130, "SIGINT")])
def test_signals_exit_with_their_code_one_line_and_no_orphans(interrupted, name, code, signame):
    case = interrupted[name]
    assert case["code"] == code and case["seconds"] < 30
    line = one_error_line(case["err"])
    assert f"interrupted ({signame})" in line and "lines are saved; continue with" in line
    case["run"].assert_no_orphans()
    assert list(case["tmp"].iterdir()) == [], "the worker log directory was left behind"


# ---------------------------------------------------------------- an unfinished run, checked before any work


@pytest.fixture(scope="module")
def unfinished(setup, place):
    """A run stopped by SIGKILL and left unfinished, for the refusals below (which must not touch it)."""
    output = place / "unfinished.safetensors"
    run = Run(run_args(setup, output), place / "unfinished", setup[2])
    run.wait_for(lambda: steps_journaled(output) >= 5, "journaled 5 steps")
    kill_main(run)
    run.finish()
    run.assert_no_orphans()
    return output


def snapshot(output: Path) -> tuple[bytes, bytes]:
    return journal_of(output).read_bytes(), partial_of(output).read_bytes()


def test_an_unfinished_run_is_reported_with_the_command_that_resumes_it(setup, unfinished):
    before = snapshot(unfinished)
    code, _, err = invoke(run_args(setup, unfinished))
    line = one_error_line(err)
    assert code == 2 and "has an unfinished run" in line and "lines written" in line
    assert f"continue it with `moeshard run --shards {setup[0]}" in line and "--resume`" in line and "--restart" in line
    assert snapshot(unfinished) == before


def test_resume_refuses_a_changed_input_shard_set_or_option(setup, unfinished, place):
    before = snapshot(unfinished)
    shards, corpus, _ = setup
    changed = place / "changed.txt"
    changed.write_text(corpus_text(LINES, seed=1), encoding="utf-8")
    other = place / "w2-other"
    assert invoke(["shard", "tiny-switch", "--gpus", 2, "--out", other])[0] == 0  # same model, another set (its own manifest)
    cases = [
        (["run", "--shards", shards, "--input", changed, "--output", unfinished, *FLAGS, "--resume"], "input."),
        (["run", "--shards", other, "--input", corpus, "--output", unfinished, *FLAGS, "--resume"], "shards.manifest_sha256"),
        ([*run_args(setup, unfinished), "--batch-size", "3", "--resume"], "options.batch_size"),
        ([*run_args(setup, unfinished), "--normalize", "--resume"], "options.normalize"),
        ([*run_args(setup, unfinished), "--max-length", "50", "--resume"], "options.max_length"),
    ]
    for args, key in cases:
        code, _, err = invoke(args)
        line = one_error_line(err)
        assert code == 2 and f"--resume: the unfinished run differs in {key}" in line and "--restart" in line, line
    assert snapshot(unfinished) == before


def test_a_second_run_may_not_write_an_output_being_written(setup, place):
    output = place / "busy.safetensors"
    run = Run(run_args(setup, output), place / "busy", setup[2])
    try:
        run.wait_for(lambda: steps_journaled(output) >= 1, "journaled a step")
        code, _, err = invoke([*run_args(setup, output), "--resume"])
        assert code == 2 and "another moeshard run is writing" in one_error_line(err)
    finally:
        kill_main(run)
        run.finish()


# ---------------------------------------------------------------- start-up


def test_a_worker_killed_right_after_spawn_ends_the_run_fast(setup, place):
    """The old launcher blocked forever writing a multi-MB job into a dead worker's pipe."""
    big = place / "big.txt"
    big.write_text(corpus_text(20_000, seed=2), encoding="utf-8")
    output = place / "early-kill.safetensors"
    run = Run(["run", "--shards", setup[0], "--input", big, "--output", output], place / "early-kill", setup[2])
    deadline = time.monotonic() + 60
    victim = None
    while victim is None:
        assert time.monotonic() < deadline and run.proc.poll() is None
        kids = workers(run)
        victim = kids[0] if kids else None
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = run.finish(timeout=90)
    assert time.monotonic() - killed < 60
    line = one_error_line(err)
    assert code == 2 and re.search(r"worker rank \d failed: killed by SIGKILL", line)
    run.assert_no_orphans()
    assert not output.exists() and not journal_of(output).exists()  # nothing written, nothing kept


def test_ctrl_c_while_workers_start_is_one_line(setup, place):
    """Workers importing torch used to print their KeyboardInterrupt tracebacks (29 lines) before the error."""
    output = place / "early-ctrl-c.safetensors"
    run = Run(run_args(setup, output), place / "early-ctrl-c", setup[2])
    run.wait_for(lambda: workers(run), "started a worker", timeout=60)
    ctrl_c(run)
    code, _, err = run.finish(timeout=90)
    # forked workers start in a blink: some rows may be saved already, and the line then says how to resume
    assert code == 130 and one_error_line(err).startswith("error: interrupted (SIGINT)")
    run.assert_no_orphans()


def test_a_kill_between_the_last_row_and_the_rename_is_finished_by_resume(setup, place):
    """The run is SIGKILLed inside its final rename: --resume finishes it without encoding a line again."""
    small = place / "small.txt"
    small.write_text(corpus_text(40, seed=3), encoding="utf-8")
    output = place / "rename-kill.safetensors"
    args = ["run", "--shards", setup[0], "--input", small, "--output", output, *FLAGS]
    killed_in_rename = ("import os, signal, sys\nimport moeshard_cli.run.outputs as o\n"
                        "o.publish = lambda tmp, path: os.kill(os.getpid(), signal.SIGKILL)\n"
                        "sys.argv = ['moeshard', *sys.argv[1:]]\nfrom moeshard_cli.cli import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", killed_in_rename, *map(str, args)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **setup[2]})
    assert proc.returncode == -signal.SIGKILL and not output.exists() and partial_of(output).exists()
    baseline = place / "rename-base.safetensors"
    runs = [Run([*args, "--resume"], place / "rename-resume", setup[2]),
            Run(["run", "--shards", setup[0], "--input", small, "--output", baseline, *FLAGS], place / "rename-base", setup[2])]
    (code, out, err), (base_code, _, base_err) = [r.finish() for r in runs]
    assert code == 0 and base_code == 0, err + base_err
    assert "resumed at line" in out and "40 (encoded 0 lines now)" in out
    assert output.read_bytes() == baseline.read_bytes()
    assert not journal_of(output).exists() and not partial_of(output).exists()


def workers(run: Run) -> list[psutil.Process]:
    """The run's workers once started: each names itself moeshard-wRANK (a fork that has not yet become
    one, like the resource tracker's before its exec, still shows the launcher's name)."""
    found = []
    for kid in run.children():
        try:
            if kid.name().startswith("moeshard-w"):
                found.append(kid)
        except psutil.Error:
            pass
    return found


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []
