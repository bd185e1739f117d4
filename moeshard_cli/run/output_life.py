"""The life of `run`'s output on node 0, owned by one object: claim, lock, journal, same-run check,
resume, finalize, or stop.

    new --claim--> claimed --start--> writing --finish--> finished
                                      writing --stop----> stopped (kept to resume, or removed)

`claim` looks at what is on disk under the output's names and decides, with --resume and
--restart, whether this run starts fresh or continues an unfinished one; every refusal happens
there, before any work. `start` lays out a fresh partial file and journal, or checks the
unfinished ones (the journal's layout, the file's size and header, the checksums of the last
steps, or of every step with `verify_all`) and says where to continue. `finish` writes the
header, renames, and removes the journal; `stop` turns a failure into its one line, keeping
what can be resumed and offering the resume only then. Each stage is a method the tests drive.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from moeshard_cli.errors import Interrupted, UserError
from moeshard_cli.files import special_kind
from moeshard_cli.run import outputs
from moeshard_cli.run.outputs import Position
from moeshard_cli.run.outputs import OutputLayout, partial_path

RECENT_STEPS = 8  # the steps checked on every resume: the last ones written, the likeliest to be torn


class AlreadyComplete(Exception):
    """--resume on an output that this same run already finished: nothing to do."""

    def __init__(self, output: Path):
        self.output = output
        super().__init__(f"{output} is already complete: nothing to resume")


@dataclass(frozen=True)
class RunIdentity:
    """What the journal's first line says about a run: --resume continues only the same one."""

    digest: str
    fingerprint: dict
    argv: list[str]


@dataclass(frozen=True)
class Start:
    """Where the workers begin: a fresh output, or the first step the unfinished one lacks."""

    layout: OutputLayout
    position: Position
    lines_done: int
    truncated_before: int
    journal: Path


class OutputLife:
    def __init__(self, output: Path, *, resume: bool = False, restart: bool = False, verify_all: bool = False, force: bool = False):
        self.output, self.resume, self.restart, self.verify_all, self.force = output, resume, restart, verify_all, force
        self.journal, self.partial = outputs.journal_path(output), partial_path(output)
        self.stage = "new"
        self._lock: int | None = None
        self._found: outputs.JournalState | None = None  # the unfinished run to continue

    # ------------------------------------------------------------ claim

    def claim(self, lines: int, digest: str | None = None) -> None:
        """Lock the journal of an unfinished run and decide how this one begins; every refusal is here.
        A finished output is replaced only with --force; --resume on one made by this same run (its
        recorded fingerprint is `digest`) raises AlreadyComplete: there is nothing to do."""
        self._expect("new")
        kind = special_kind(self.output)
        if kind:
            raise UserError(f"--output {self.output} is {kind}, not a regular file", "give --output a regular file or a new name")
        if self.journal.exists():
            self._lock = _lock(self.journal, self.output)
            if not self.partial.exists() and self.output.exists():
                self.journal.unlink()  # stopped between the final rename and this removal: the output is complete
        unfinished = self.journal.exists()
        if unfinished and not self.restart:
            self._found = outputs.read_journal(self.journal)
            if not self.resume:
                argv = self._found.header.get("argv", ["run"])
                raise UserError(f"{self.output} has an unfinished run ({self._found.lines_done:,} of {lines:,} lines written)",
                                f"continue it with `{resume_command(argv)}`, or start over with --restart")
        elif self.resume and not self.restart:
            if self.output.exists():
                if digest is not None and outputs.recorded_digest(self.output) == digest:
                    raise AlreadyComplete(self.output)
                raise UserError(f"--resume: {self.output} is a finished output of another run (other input, shard set or options)",
                                "choose another --output, or pass --force without --resume to replace it")
            raise UserError(f"--resume: there is no unfinished run of {self.output} to resume (no {self.journal.name})",
                            "check --output, or run without --resume to start a new run")
        elif not unfinished and self.output.exists() and not self.force:
            raise UserError(f"--output {self.output} exists (a finished output)", "pass --force to replace it, or choose another --output")
        self.stage = "claimed"

    # ------------------------------------------------------------ start: fresh or resumed

    def start(self, identity: RunIdentity, layout: OutputLayout) -> Start:
        """A fresh partial output laid out as `layout`, or the unfinished one checked against its journal."""
        self._expect("claimed")
        start = self._continue(identity) if self._found else self._fresh(identity, layout)
        self.stage = "writing"
        return start

    def _fresh(self, identity: RunIdentity, layout: OutputLayout) -> Start:
        outputs.discard(self.output)
        outputs.create_partial(layout)
        argv = [a for a in identity.argv if a not in ("--resume", "--restart")]
        outputs.write_journal_header(self.journal, {"digest": identity.digest, "fingerprint": identity.fingerprint, "argv": argv,
                                                    "layout": asdict(layout)})
        if self._lock is not None:  # the lock was on the journal just replaced
            os.close(self._lock)
        self._lock = _lock(self.journal, self.output)
        return Start(layout, Position(), 0, 0, self.journal)

    def _continue(self, identity: RunIdentity) -> Start:
        found = self._found
        check_same_run(found.header, identity.fingerprint, identity.digest)
        layout = self._journaled_layout(found.header)
        self._check_partial(layout, found)
        return Start(layout, found.position, found.lines_done, found.truncated_before, self.journal)

    def _journaled_layout(self, header: dict) -> OutputLayout:
        try:
            saved = header["layout"]
            layout = OutputLayout(**{**saved, "metadata": tuple(map(tuple, saved["metadata"]))})
        except (KeyError, TypeError, ValueError):
            raise self._damaged("its journal has no readable layout") from None
        if Path(layout.path) != self.partial:
            raise self._damaged(f"its journal names another file, {layout.path}")
        return layout

    def _check_partial(self, layout: OutputLayout, found: outputs.JournalState) -> None:
        """The partial file must be the one the journal describes: size, header, and the checksums of
        the rows that will be kept (the last steps; every step with verify_all)."""
        kind = special_kind(self.partial)
        if kind or not self.partial.exists():
            raise self._damaged("it is missing" if not kind else f"it is {kind}")
        steps = kept_steps(found)
        size = self.partial.stat().st_size
        end = max([layout.size(0)] + [_rows_end(layout, s) for s in steps])
        if size < end or (layout.pooling != "none" and size != layout.size(0)):
            raise self._damaged(f"it has {size:,} bytes, its journal needs {end:,}")
        with open(self.partial, "rb") as f:
            fd = f.fileno()
            header = os.pread(fd, layout.data_start, 0)
            finished = found.position.line == layout.lines and found.position.step == 0
            allowed = {layout.header(0) if layout.fmt in ("npy", "csv") else bytes(layout.data_start)}
            if finished:  # stopped inside finalize, after its header was written
                allowed.add(layout.header(found.position.token))
            if header not in allowed:
                raise self._damaged("its header was overwritten")
            checked = steps if self.verify_all else steps[-RECENT_STEPS:]
            windows = [w for w in found.windows if "crc" in w] if self.verify_all else found.windows[-1:]
            for record in windows:
                if "crc" in record and _crc(fd, [(layout.offset_at(record["line"]), record["lines"] * 8)]) != record["crc"]:
                    raise self._damaged(f"the token offsets of window {record['window']} fail their checksum")
            for record in checked:
                if _crc(fd, _row_spans(layout, record)) != record.get("crc"):
                    raise self._damaged(f"the rows of step {record['step']} of window {record['window']} fail their checksum")

    def _damaged(self, what: str) -> UserError:
        return UserError(f"--resume: the unfinished output {self.partial} does not match its journal ({what})",
                         "start over with --restart; the rows written so far cannot be trusted")

    # ------------------------------------------------------------ the end: finished or stopped

    def finish(self, tokens: int, ids=None) -> None:
        """Header, exact size, fsync, rename to the final name, journal gone (`ids`: each line's id,
        for the formats that store them)."""
        self._expect("writing")
        outputs.finalize(self._layout(), tokens, self.output, ids)
        self.stage = "finished"

    def stop(self, exc: BaseException, lines: int) -> BaseException:
        """The error to report for a run that did not finish: what it wrote is kept, with the command
        that continues it; a run that journaled nothing leaves nothing and offers no resume."""
        self._expect("writing")
        self.stage = "stopped"
        state = outputs.read_journal(self.journal) if self.journal.exists() else None
        if state is None or state.lines_done == 0:
            outputs.discard(self.output)
            return exc
        hint = f"{state.lines_done:,} of {lines:,} lines are saved; continue with `{resume_command(state.header['argv'])}`"
        if isinstance(exc, Interrupted):
            return Interrupted(exc.signum, hint)
        if isinstance(exc, UserError):
            return UserError(exc.problem, f"{exc.fix}; {hint}" if exc.fix else hint)
        return exc

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "OutputLife":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _layout(self) -> OutputLayout:
        return self._journaled_layout(outputs.read_journal(self.journal).header)

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise RuntimeError(f"the output's life is at {self.stage!r}, not {stage!r}")


# ---------------------------------------------------------------- pieces the stages share


def kept_steps(state: outputs.JournalState) -> list[dict]:
    """The step records whose rows a resume keeps: every window before the position's, and the
    position's window up to its first missing step."""
    return [r for r in state.steps if r["window"] < state.position_window or
            (r["window"] == state.position_window and r["step"] < state.position.step)]


def _row_spans(layout: OutputLayout, record: dict) -> list[tuple[int, int]]:
    """(byte offset, bytes) of a step's rows, in the order they were written and checksummed."""
    return [(layout.rows_start + row * layout.row_bytes, count * layout.row_bytes) for row, count in record.get("rows", [])]


def _rows_end(layout: OutputLayout, record: dict) -> int:
    return max((offset + n for offset, n in _row_spans(layout, record)), default=0)


def _crc(fd: int, spans: list[tuple[int, int]]) -> int:
    crc = 0
    for offset, n in spans:
        data = os.pread(fd, n, offset)
        if len(data) != n:
            return -1  # the file ends inside the span
        crc = zlib.crc32(data, crc)
    return crc


def _lock(journal: Path, output: Path) -> int:
    fd = os.open(journal, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another moeshard run is writing {output}", "wait for it to finish, or choose another --output") from None
    return fd


def resume_command(argv: list[str]) -> str:
    return shlex.join(["moeshard", *argv, "--resume"])


def check_same_run(header: dict, fingerprint: dict, digest: str) -> None:
    if header.get("digest") == digest:
        return
    before = _flatten(header.get("fingerprint", {}))
    now = _flatten(fingerprint)
    key = next((k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)), "the moeshard version")
    raise UserError(f"--resume: the unfinished run differs in {key} (was {before.get(key)!r}, now {now.get(key)!r})",
                    "rerun with the input, shard set and options it was started with, or start over with --restart")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
