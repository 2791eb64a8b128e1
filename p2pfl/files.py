"""Writing files so that a crash never leaves half a file: keys, memberships, checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private_atomically(path: Path, data: bytes, previous: Path | None = None) -> None:
    """Replace ``path`` by ``data`` (mode 0600): written to a temporary file beside it,
    flushed to disk, then renamed over it, and the directory flushed too. With ``previous``,
    the current ``path`` (if any) is first moved there, so one older copy survives."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)  # mkstemp creates the file with mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def writable_problem(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (e.g. a read-only file system or missing
    permissions), or None if they can: tries to create and remove a temporary file, which
    also holds for root (whom permission bits do not stop) on a read-only mount."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".p2pfl-write-test.")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    Path(name).unlink(missing_ok=True)
    return None
