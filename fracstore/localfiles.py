"""Small files fracstore keeps in its cache folder on this machine (verified-state records, the replayed registry
state, which store id a remote URL had). Everything here is an optimisation: a missing or unreadable file costs a
re-hash, a longer replay or an offline open refused, never correctness, so readers treat any problem as "absent".

Files are replaced atomically (a temp file with a random name in the same folder, then ``os.replace``), so
several processes can share one cache folder without locks: the last writer wins with a complete file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def read_cached(path: Path) -> bytes | None:
    """The bytes of a cache file, or None when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def write_cached(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically, creating its folder.

    Raises:
        OSError: the folder cannot be created or written (callers decide whether that matters).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
