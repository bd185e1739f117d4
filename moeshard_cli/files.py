"""Writing the user's files safely: nothing ever appears half-written under its final name.

Every file is written under a hidden temporary name beside its final one (`.NAME.tmp-PID`),
synced, then renamed into place; a directory listing shows either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Callable

from moeshard_cli.errors import UserError


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary(name: str) -> bool:
    return ".tmp-" in name


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished, synced file into place and make the rename itself durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary sibling, which then replaces `path`; a failure leaves nothing."""
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_kind(path: Path) -> str | None:
    """What `path` is when it is neither a regular file nor a new name ("a FIFO (named pipe)", ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((kind for is_kind, kind in _KINDS if is_kind(mode)), None)


def check_writable(path: Path, flag: str = "--output") -> None:
    """Fail before any work if the file `flag` names cannot be created, or is not a regular file
    (a FIFO or a device would be silently replaced by the final rename)."""
    parent = path.parent if str(path.parent) else Path(".")
    kind = special_kind(path)
    if kind == "a directory":
        raise UserError(f"{flag} {path} is a directory", "pass a file path")
    if kind:
        raise UserError(f"{flag} {path} is {kind}, not a regular file", f"give {flag} a regular file or a new name")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"cannot write {flag} {path}: {parent} {what}", f"create the directory or choose another {flag}")
    probe = parent / f".{path.name}.probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {flag} {path} ({exc.strerror})", f"choose a writable location for {flag}") from exc
