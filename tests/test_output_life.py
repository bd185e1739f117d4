"""The life of `run`'s output (run/output_life.OutputLife), driven stage by stage in this process:
every fault case is one test of one object, with rank 0's real RowWriter writing the rows."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from moeshard_cli.errors import Interrupted, UserError
from moeshard_cli.run import outputs
from moeshard_cli.run.output_life import RECENT_STEPS, AlreadyComplete, OutputLife, RunIdentity
from moeshard_cli.run.outputs import RowWriter

LINES, D, PER_STEP = 48, 4, 2  # one window of 48 lines, 24 steps of 2 lines each
IDENTITY = RunIdentity("digest-1", {"options": {"pooling": "mean"}}, ["run", "--input", "in.txt"])


def rows_of(line: int) -> np.ndarray:
    return np.full((1, D), line + 0.5, dtype="<f4")


def step_lines(step: int) -> list[int]:
    """Lines are dealt out of order, as the length-sorted schedule deals them."""
    return [LINES - 1 - step, step][:PER_STEP]


def begin(output, fmt: str = "safetensors", pooling: str = "mean", width: int = D, **flags) -> tuple[OutputLife, outputs.OutputLayout]:
    life = OutputLife(output, **flags)
    life.claim(LINES)
    start = life.start(IDENTITY, outputs.plan_layout(output, fmt, pooling, LINES, width, {"run_fingerprint": IDENTITY.digest}))
    return life, start


def write_steps(start, steps: range, window_record: bool = True, rows=rows_of) -> None:
    """Rank 0's writer puts `rows(line)` of every line of `steps` in place, as the file holds them."""
    layout = start.layout
    writer = RowWriter(layout, start.journal)
    if window_record:
        writer.window({"window": 0, "line": 0, "lines": LINES, "byte": 0, "byte_end": 10 * LINES, "token": 0, "tokens": 5 * LINES,
                       "truncated": 0, "steps": LINES // PER_STEP}, None)
    for s in steps:
        writer.rows({"window": 0, "step": s, "lines": PER_STEP},
                    [(layout.embedding_at(line), layout.encode(line, rows(line))) for line in step_lines(s)])
    writer.close()


def stopped_after(output, steps: int) -> None:
    """A run killed after `steps` journaled steps: nothing but its files is left."""
    life, start = begin(output)
    write_steps(start, range(steps))
    life.close()


def resume(output, **flags):
    life = OutputLife(output, resume=True, **flags)
    life.claim(LINES)
    return life, life.start(IDENTITY, None)


def test_an_intact_partial_resumes_after_its_last_step(tmp_path):
    output = tmp_path / "o.safetensors"
    stopped_after(output, 3)
    life, start = resume(output)
    assert (start.position.step, start.lines_done) == (3, 3 * PER_STEP)
    write_steps(start, range(3, LINES // PER_STEP), window_record=False)
    life.finish(5 * LINES)
    life.close()
    from safetensors.numpy import load_file

    assert np.array_equal(load_file(output)["embeddings"], np.concatenate([rows_of(i) for i in range(LINES)]))
    assert not outputs.journal_path(output).exists() and not outputs.partial_path(output).exists()


def garbage_over_a_row(partial, layout) -> None:
    with open(partial, "r+b") as f:
        f.seek(layout.embedding_at(step_lines(1)[0]))
        f.write(b"\xff" * 8)


def garbage_file(partial, layout) -> None:
    partial.write_bytes(os.urandom(20_000))


def emptied(partial, layout) -> None:
    os.truncate(partial, 0)


def header_overwritten(partial, layout) -> None:
    with open(partial, "r+b") as f:
        f.write(b"{not a header}")


@pytest.mark.parametrize("damage, what", [
    (emptied, "it has 0 bytes, its journal needs"),
    (garbage_file, "it has 20,000 bytes"),
    (garbage_over_a_row, "the rows of step 1 of window 0 fail their checksum"),
    (header_overwritten, "its header was overwritten"),
], ids=["truncated-to-zero", "20-kb-of-garbage", "a-row-overwritten", "header"])
def test_a_damaged_partial_is_refused_on_resume(tmp_path, damage, what):
    """It used to resume at its last step: zero rows or garbage values in the output, exit 0."""
    output = tmp_path / "o.safetensors"
    stopped_after(output, 3)
    partial = outputs.partial_path(output)
    damage(partial, outputs.plan_layout(output, "safetensors", "mean", LINES, D, {"run_fingerprint": IDENTITY.digest}))
    with pytest.raises(UserError) as info:
        resume(output)
    line = info.value.line()
    assert line.startswith(f"--resume: the unfinished output {partial} does not match its journal") and what in line
    assert "--restart" in info.value.fix


def test_every_step_is_checked_with_verify_all(tmp_path):
    """By default the last steps are checked; an older damaged row is found with --verify-partial."""
    output = tmp_path / "o.safetensors"
    stopped_after(output, RECENT_STEPS + 4)
    garbage_over_a_row(outputs.partial_path(output), outputs.plan_layout(output, "safetensors", "mean", LINES, D, {"run_fingerprint": IDENTITY.digest}))
    life, start = resume(output)
    life.close()
    assert start.position.step == RECENT_STEPS + 4
    with pytest.raises(UserError, match="the rows of step 1 of window 0 fail their checksum"):
        resume(output, verify_all=True)


def test_a_finished_output_is_refused_without_force_and_complete_for_its_own_resume(tmp_path):
    output = tmp_path / "o.safetensors"
    life, start = begin(output)
    write_steps(start, range(LINES // PER_STEP))
    life.finish(5 * LINES)
    life.close()
    before = output.read_bytes()
    with pytest.raises(AlreadyComplete):  # the same run: nothing to do, exit 0
        OutputLife(output, resume=True).claim(LINES, IDENTITY.digest)
    with pytest.raises(UserError) as info:
        OutputLife(output, resume=True).claim(LINES, "digest-of-another-run")
    assert info.value.problem == f"--resume: {output} is a finished output of another run (other input, shard set or options)"
    for flags in ({}, {"restart": True}):
        with pytest.raises(UserError) as info:
            OutputLife(output, **flags).claim(LINES, IDENTITY.digest)
        assert info.value.line() == f"--output {output} exists (a finished output): pass --force to replace it, or choose another --output"
    assert output.read_bytes() == before
    OutputLife(output, force=True).claim(LINES, IDENTITY.digest)


@pytest.mark.parametrize("name", ["o.parquet", "o.jsonl"])
@pytest.mark.parametrize("pooling", ["mean", "score"])
def test_staged_outputs_hold_ids_and_rows_for_pandas(tmp_path, name, pooling):
    """.parquet and .jsonl are written whole at the end from the raw partial rows (which resume as any
    other's), with each line's id; pandas reads them as the rows were written."""
    import pandas as pd

    output = tmp_path / name
    width = 3 if pooling == "score" else D
    rows = (lambda line: np.array([[line + 1, -line - 0.5, np.nan if line == 0 else line / 2]], dtype="<f4")) if pooling == "score" else rows_of
    life, start = begin(output, name.split(".")[1], pooling, width)
    write_steps(start, range(LINES // 2), rows=rows)
    life.close()
    life, start = resume(output)  # stopped half way, resumed
    write_steps(start, range(LINES // 2, LINES // PER_STEP), window_record=False, rows=rows)
    life.finish(5 * LINES, iter(f"doc-{i}" for i in range(LINES)))
    life.close()
    table = pd.read_parquet(output) if name.endswith(".parquet") else pd.read_json(output, lines=True)
    assert table["id"].tolist() == [f"doc-{i}" for i in range(LINES)]
    expected = np.concatenate([rows(line) for line in range(LINES)])
    if pooling == "score":
        assert table.columns.tolist() == ["id", "tokens", "logprob", "mean_nll"] and table["tokens"].tolist() == list(range(1, LINES + 1))
        assert np.allclose(table[["logprob", "mean_nll"]].to_numpy(np.float64), expected[:, 1:], equal_nan=True)
    else:
        assert table.columns.tolist() == ["id", "embedding"]
        assert np.array_equal(np.stack(table["embedding"].to_numpy()).astype("<f4"), expected)  # exact: float32 round-trips
    assert outputs.recorded_digest(output) == IDENTITY.digest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name] + ([f"{name}.json"] if name.endswith(".jsonl") else []))


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    output = tmp_path / "o.safetensors"
    with pytest.raises(UserError) as info:
        OutputLife(output, resume=True).claim(LINES)
    assert info.value.problem == f"--resume: there is no unfinished run of {output} to resume (no .o.safetensors.journal)"
    assert list(tmp_path.iterdir()) == []


def test_an_unfinished_run_is_refused_without_resume_and_kept(tmp_path):
    output = tmp_path / "o.safetensors"
    stopped_after(output, 3)
    before = outputs.partial_path(output).read_bytes()
    with pytest.raises(UserError, match="has an unfinished run \\(6 of 48 lines written\\)"):
        OutputLife(output).claim(LINES)
    assert outputs.partial_path(output).read_bytes() == before


def full_disk(start) -> UserError:
    """The next rows go to /dev/full, as on a disk with no room left."""
    partial = outputs.partial_path(start.journal.with_name(start.journal.name[1:-len(".journal")]))
    partial.unlink()
    partial.symlink_to("/dev/full")
    with pytest.raises(UserError) as info:
        write_steps(start, range(3, 4), window_record=False)
    return info.value


def test_a_full_disk_before_any_step_offers_no_resume_and_leaves_nothing(tmp_path):
    """It printed "then rerun with --resume" after deleting everything there was to resume."""
    output = tmp_path / "o.safetensors"
    life, start = begin(output)
    exc = full_disk(start)
    assert "No space left on device" in exc.problem
    reported = life.stop(exc, LINES)
    assert "--resume" not in reported.line() and reported.fix == "free space on its disk or fix its permissions"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_after_some_steps_keeps_them_and_offers_the_resume(tmp_path):
    output = tmp_path / "o.safetensors"
    life, start = begin(output)
    write_steps(start, range(3))
    reported = life.stop(full_disk(start), LINES)
    assert "6 of 48 lines are saved; continue with `moeshard run --input in.txt --resume`" in reported.fix
    assert outputs.journal_path(output).exists()


def test_a_signal_during_the_final_rename_is_finished_by_resume(tmp_path, monkeypatch):
    """Killed between the last row and the rename: the partial already has its final header; --resume finishes it."""
    output = tmp_path / "o.safetensors"
    life, start = begin(output)
    write_steps(start, range(LINES // PER_STEP))

    def killed(tmp, path):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(outputs, "publish", killed)
    with pytest.raises(Interrupted):
        life.finish(5 * LINES)
    life.close()
    monkeypatch.undo()
    assert not output.exists() and outputs.journal_path(output).exists()
    life, start = resume(output)
    assert (start.position.line, start.lines_done) == (LINES, LINES)
    life.finish(start.position.token)
    from safetensors.numpy import load_file

    assert np.array_equal(load_file(output)["embeddings"], np.concatenate([rows_of(i) for i in range(LINES)]))
    assert not outputs.journal_path(output).exists()


def test_stages_go_in_order(tmp_path):
    life = OutputLife(tmp_path / "o.safetensors")
    with pytest.raises(RuntimeError, match="at 'new', not 'writing'"):
        life.finish(0)


def score_rows(line: int) -> np.ndarray:
    """[tokens, logprob, mean_nll] of a line, as the worker hands them to rank 0 (NaN below 2 tokens)."""
    tokens = line % 5 + 1
    return np.array([[tokens, -1.25 * line, 1.25 * line / (tokens - 1) if tokens > 1 else np.nan]], dtype="<f4")


def test_a_score_csv_resumes_checks_its_records_and_reads_in_pandas(tmp_path):
    """`--score`'s CSV lives the same life: fixed-width records written in place, checked on resume, read by pandas."""
    import pandas as pd

    output = tmp_path / "scores.csv"
    life, start = begin(output, "csv", "score", 3)
    write_steps(start, range(3), rows=score_rows)
    life.close()
    life, again = resume(output)
    assert (again.position.step, again.lines_done) == (3, 3 * PER_STEP)
    write_steps(again, range(3, LINES // PER_STEP), window_record=False, rows=score_rows)
    life.finish(5 * LINES)
    life.close()
    table = pd.read_csv(output)
    assert list(table.columns) == ["line", "tokens", "logprob", "mean_nll"] and table.line.tolist() == list(range(LINES))
    expected = np.concatenate([score_rows(i) for i in range(LINES)])
    assert np.array_equal(table.tokens.to_numpy(), expected[:, 0].astype(int))
    np.testing.assert_allclose(table[["logprob", "mean_nll"]].to_numpy(), expected[:, 1:], rtol=1e-7)
    assert table.mean_nll.isna().sum() == (expected[:, 0] == 1).sum() > 0  # one-token lines: no mean

    damaged = tmp_path / "damaged.csv"
    life, start = begin(damaged, "csv", "score", 3)
    write_steps(start, range(3), rows=score_rows)
    life.close()
    with open(outputs.partial_path(damaged), "r+b") as f:  # a record of step 2 overwritten
        f.seek(start.layout.embedding_at(step_lines(2)[0]) + 3)
        f.write(b"9")
    with pytest.raises(UserError) as info:
        resume(damaged)
    assert "fail their checksum" in info.value.problem
