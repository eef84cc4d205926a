"""Where each object lives inside a store: pure functions from values to keys.

A *key* is a ``/``-separated string relative to the store root (DESIGN.md section 2). Nothing here touches I/O.
"""

from __future__ import annotations

import re

from .digest import Digest
from .errors import FormatError

MARKER_KEY = "fracstore.msgpack"
BLOBS_PREFIX = "blobs/sha256/"
LOG_PREFIX = "log/"
CHECKPOINTS_PREFIX = "checkpoints/"
CHECKPOINT_POINTER_KEY = "checkpoints/_last"
PROBE_PREFIX = "probe/"

SEQ_WIDTH = 20
_SEQ_NAME_RE = re.compile(r"[0-9]{20}\.msgpack")


def blob_key(digest: Digest) -> str:
    """``blobs/sha256/ab/ab12...ef``: two hex digits of fan-out keep local folders small."""
    return f"{BLOBS_PREFIX}{digest.hex[:2]}/{digest.hex}"


def digest_from_blob_key(key: str) -> Digest:
    """Inverse of :func:`blob_key`.

    Raises:
        FormatError: the key is not a well-formed blob key.
    """
    if not key.startswith(BLOBS_PREFIX):
        raise FormatError(f"not a blob key: {key!r}")
    fanout, _, hex_part = key[len(BLOBS_PREFIX) :].partition("/")
    digest = Digest(hex_part)
    if fanout != hex_part[:2]:
        raise FormatError(f"blob key {key!r} is under the wrong fan-out folder")
    return digest


def _seq_name(seq: int) -> str:
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 10**SEQ_WIDTH:
        raise FormatError(f"sequence numbers run from 1 to {10**SEQ_WIDTH - 1}, not {seq!r}")
    return f"{seq:0{SEQ_WIDTH}d}.msgpack"


def log_key(seq: int) -> str:
    """``log/00000000000000000001.msgpack``: zero-padded so that names sort in log order."""
    return LOG_PREFIX + _seq_name(seq)


def checkpoint_key(seq: int) -> str:
    """``checkpoints/00000000000000001000.msgpack``: the replayed registry state up to ``seq``."""
    return CHECKPOINTS_PREFIX + _seq_name(seq)


def seq_from_key(key: str, prefix: str) -> int:
    """The sequence number of a log or checkpoint key.

    Raises:
        FormatError: the key is not a sequence key under ``prefix``.
    """
    name = key[len(prefix) :] if key.startswith(prefix) else ""
    if not _SEQ_NAME_RE.fullmatch(name):
        raise FormatError(f"not a sequence key under {prefix!r}: {key!r}")
    return int(name[:SEQ_WIDTH])


def probe_key(token: str) -> str:
    """A throw-away key for the create-if-absent capability probe (DESIGN.md section 4)."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", token):
        raise FormatError(f"probe token must be hex, not {token!r}")
    return PROBE_PREFIX + token
