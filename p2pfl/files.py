"""Writing small private files (keys, memberships) so that a crash never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` (mode 0600): written to a temporary file beside it,
    flushed to disk, then renamed over it."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)  # mkstemp creates the file with mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
