"""Every error fracstore raises.

All errors derive from :class:`FracstoreError` and, where one fits, from the matching builtin, so callers can write
``except FileNotFoundError`` / ``except LookupError`` / ``except ValueError`` without knowing fracstore. Each error
carries structured fields (the key, the digest, the store URL with credentials removed) and a message that says what
to do next.
"""

from __future__ import annotations

from collections.abc import Sequence


class FracstoreError(Exception):
    """Root of every fracstore error."""


class NotFoundError(FracstoreError, LookupError):
    """A key, blob, model, version or tag does not exist.

    Attributes:
        what: what was looked for (a ref, a key, a digest).
        store: the store URL, without credentials, or "" when not tied to a store.
    """

    def __init__(self, message: str, *, what: str = "", store: str = "") -> None:
        super().__init__(message)
        self.what = what
        self.store = store


class AmbiguousRefError(FracstoreError, LookupError):
    """A ref (usually a digest prefix) matches more than one model.

    Attributes:
        ref: the ref as typed.
        candidates: every match, as ``name@version (sha256:...)`` strings.
    """

    def __init__(self, ref: str, candidates: Sequence[str]) -> None:
        listing = "\n  ".join(candidates)
        super().__init__(
            f"ref {ref!r} is ambiguous: it matches {len(candidates)} models:\n  {listing}\n"
            "Use a longer digest prefix or name@version."
        )
        self.ref = ref
        self.candidates = tuple(candidates)


class IntegrityError(FracstoreError):
    """Stored bytes do not match what refers to them (a digest, a size, a hash chain).

    Attributes:
        key: the store key (or bundle member) that failed.
        expected: what the reference promised (a digest or a size).
        actual: what was found.
        store: the store URL, without credentials.
    """

    def __init__(self, message: str, *, key: str = "", expected: str = "", actual: str = "", store: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.expected = expected
        self.actual = actual
        self.store = store


class ConflictError(FracstoreError):
    """A registry write lost its race more often than allowed, or its precondition no longer holds."""


class FormatError(FracstoreError, ValueError):
    """Bytes or values that do not follow the format: a bad digest string, an undecodable entry, a bad state dict."""


class StorageError(FracstoreError, OSError):
    """The storage backend failed (permissions, network, a full disk).

    Attributes:
        key: the key being accessed.
        store: the store URL, without credentials.
    """

    def __init__(self, message: str, *, key: str = "", store: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.store = store


class OutcomeUnknownError(StorageError):
    """A registry write may or may not have landed, and reading it back failed too.

    Attributes:
        seq: the log position written.
        commit: the writer's commit id; an entry at ``seq`` with this commit means the write landed.
    """

    def __init__(self, message: str, *, key: str, store: str, seq: int, commit: str) -> None:
        super().__init__(message, key=key, store=store)
        self.seq = seq
        self.commit = commit


class UnsupportedBackendError(StorageError):
    """The backend cannot give the guarantees registry writes need (an atomic create-if-absent)."""


class OfflineError(StorageError):
    """The store was opened offline and the operation needs the store itself (what it asked for is not in the
    local cache, or it writes)."""


class ConfigError(FracstoreError, ValueError):
    """An option or argument that cannot be used as given."""


class NotAvailableError(FracstoreError, NotImplementedError):
    """A feature this version of fracstore does not provide yet; the message names the alternative."""
