"""The content digest: the identity of every immutable object in a store.

A digest is written ``sha256:`` followed by 64 lowercase hex digits (the OCI grammar, restricted to SHA-256). Parsing
is strict: uppercase, other algorithms, whitespace or a short hex string are format errors, because a digest that
could be spelled two ways could name one object under two keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import FormatError

ALGORITHM = "sha256"
_HEX_RE = re.compile(r"[0-9a-f]{64}")
SHORT_LEN = 12


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A SHA-256 digest. Construct with :meth:`parse` or :meth:`of`; ``str()`` gives ``sha256:<hex>``."""

    hex: str

    def __post_init__(self) -> None:
        if not isinstance(self.hex, str) or not _HEX_RE.fullmatch(self.hex):
            raise FormatError(f"not a SHA-256 hex digest: {self.hex!r} (expected 64 lowercase hex digits)")

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<64 lowercase hex>``.

        Raises:
            FormatError: anything else.
        """
        if not isinstance(text, str):
            raise FormatError(f"a digest must be a string, not {type(text).__name__}")
        algorithm, sep, hex_part = text.partition(":")
        if not sep or algorithm != ALGORITHM or not _HEX_RE.fullmatch(hex_part):
            raise FormatError(f"not a digest: {text!r} (expected 'sha256:' followed by 64 lowercase hex digits)")
        return cls(hex_part)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        """The digest of ``data``."""
        return cls(hashlib.sha256(data).hexdigest())

    @classmethod
    def of_chunks(cls, chunks: Iterable[bytes | bytearray | memoryview]) -> tuple[Digest, int]:
        """The digest and total size of the concatenation of ``chunks``, hashed in one pass."""
        hasher = hashlib.sha256()
        size = 0
        for chunk in chunks:
            hasher.update(chunk)
            size += len(memoryview(chunk).cast("B"))
        return cls(hasher.hexdigest()), size

    @property
    def short(self) -> str:
        """A short form for humans, ``sha256:`` plus 12 hex digits. Never use it as a key."""
        return f"{ALGORITHM}:{self.hex[:SHORT_LEN]}"

    def __str__(self) -> str:
        return f"{ALGORITHM}:{self.hex}"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A reference to a blob: its digest and its size in bytes (the OCI descriptor without a media type)."""

    digest: Digest
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.digest, Digest):
            raise FormatError(f"descriptor digest must be a Digest, not {type(self.digest).__name__}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise FormatError(f"descriptor size must be a byte count, not {self.size!r}")
