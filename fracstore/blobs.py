"""The blob store: immutable objects named by the SHA-256 of their bytes.

A *blob* is any immutable object (tensor blob, packed blob, file, history, manifest). Its key is
``blobs/sha256/<2 hex>/<64 hex>`` and its bytes MUST hash to that key. Every read is verified, size first, then the
hash, and a mismatch raises :class:`IntegrityError` naming the digest and the store.

Local stores hand out verified blob *files* for zero-copy mmap loads. Re-hashing gigabytes on every load would be
wasteful, but trusting a changed file would be wrong, so a *verified-state record* remembers the file's identity
(device, inode, size, mtime_ns, ctime_ns) at the moment its hash was last checked; a file is re-hashed only when its
stat no longer matches. ctime cannot be set from user space, so an edit followed by ``touch -d`` still shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import msgpack

from .backend import Backend, Data
from .digest import Descriptor, Digest
from .errors import FormatError, IntegrityError, NotFoundError, StorageError
from .layout import BLOBS_PREFIX, blob_key, digest_from_blob_key
from .localfiles import read_cached, write_cached

_HASH_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class VerifiedFile:
    """A local blob file whose bytes were verified while it had ``identity`` (device, inode, size, times)."""

    path: Path
    identity: tuple[int, ...]


def hash_file(path: Path) -> tuple[Digest, int]:
    """SHA-256 and size of a local file, streamed in 8 MiB chunks (the GIL is released while hashing)."""
    hasher = hashlib.sha256()
    size = 0
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    # O_NOFOLLOW: a blob file is never a symlink in a store fracstore wrote; one planted there is not followed.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
            size += count
    return Digest(hasher.hexdigest()), size


class BlobStore:
    """Verified, content-addressed reads and idempotent writes over a :class:`Backend`.

    Args:
        backend: where the blobs live.
        verified_dir: folder for verified-state records of a local store's blob files; None disables the
            records (every local file load is then re-hashed).
        touch_records: mark each verified use of a file by touching its record, so the record's mtime is the
            blob's last use (the local cache's LRU order).
    """

    def __init__(self, backend: Backend, *, verified_dir: Path | None, touch_records: bool = False) -> None:
        self.backend = backend
        self._verified_dir = verified_dir
        self._touch_records = touch_records

    # -- writes -----------------------------------------------------------------------------------------------

    def put(self, descriptor: Descriptor, data: Data, *, sync_folder: bool = True, mutable: bool = False) -> bool:
        """Store ``data``, which the caller has hashed to ``descriptor``. Returns True if bytes were written.

        Identical bytes are stored once: an existing blob is kept when it is known good (right size, and on a local
        disk a matching verified-state record or a fresh re-hash). A corrupt one is replaced, since the right bytes
        are in hand. ``sync_folder=False`` defers making the new name durable to :meth:`Backend.sync_folders`.

        Args:
            mutable: ``data`` views memory that may change meanwhile (a live tensor). The bytes are then hashed again
                as they are written and the write is abandoned, before the blob gets its name, if they differ.

        Raises:
            IntegrityError: with ``mutable``, the data changed between hashing and writing.
        """
        key = blob_key(descriptor.digest)
        found = self.inspect(descriptor)
        if found == "good":
            return False
        if found == "bad":
            # Only what was seen to be bad is removed: deleting on mere absence could remove the good copy a
            # concurrent save creates in between.
            self.backend.delete(key)  # on a local disk this unlinks a link or stray file too
        stream = _rehashed(data, descriptor, self.backend.url) if mutable else data
        created = self.backend.put_if_absent(key, stream, sync_folder=sync_folder)
        if created:
            self.record_verified(descriptor.digest)
        return created

    def inspect(self, descriptor: Descriptor) -> str:
        """``"absent"``, ``"good"`` (right size, and on a local disk a regular file whose record or re-hash
        matches) or ``"bad"`` (something else is under the blob's name)."""
        key = blob_key(descriptor.digest)
        path = self.backend.local_path(key)
        if path is None:
            try:
                size = self.backend.size(key)
            except NotFoundError:
                return "absent"
            return "good" if size == descriptor.size else "bad"  # remote: trusted by size; reads verify the hash
        if not os.path.lexists(path):
            return "absent"
        try:
            self.local_file(descriptor)  # stat against the record, re-hash when it is stale
        except NotFoundError:
            return "absent"
        except IntegrityError:
            return "bad"
        return "good"

    def put_bytes(self, data: bytes, *, sync_folder: bool = True) -> tuple[Descriptor, bool]:
        """Hash and store ``data``. Returns its descriptor and whether bytes were written."""
        descriptor = Descriptor(Digest.of(data), len(data))
        return descriptor, self.put(descriptor, data, sync_folder=sync_folder)

    # -- reads ------------------------------------------------------------------------------------------------

    def size_of(self, digest: Digest) -> int:
        """The stored size of a blob.

        Raises:
            NotFoundError: the blob is missing.
        """
        try:
            return self.backend.size(blob_key(digest))
        except NotFoundError as exc:
            raise NotFoundError(
                f"blob {digest} is not in {self.backend.url}", what=str(digest), store=self.backend.url
            ) from exc

    def has(self, descriptor: Descriptor) -> bool:
        """True when the blob exists with the expected size (the confirm step of DESIGN.md section 5)."""
        try:
            return self.backend.size(blob_key(descriptor.digest)) == descriptor.size
        except NotFoundError:
            return False

    def get(self, descriptor: Descriptor) -> bytes:
        """The verified bytes of a blob.

        Raises:
            NotFoundError: the blob is missing.
            IntegrityError: its size or hash does not match.
        """
        key = blob_key(descriptor.digest)
        try:
            data = self.backend.read(key)
        except NotFoundError as exc:
            raise NotFoundError(
                f"blob {descriptor.digest} is missing from {self.backend.url}; the store is damaged "
                "(restore the blob, e.g. by pushing the model again from a store that has it)",
                what=str(descriptor.digest),
                store=self.backend.url,
            ) from exc
        self.check(descriptor, Digest.of(data) if len(data) == descriptor.size else None, len(data))
        return data

    def get_unsized(self, digest: Digest, *, max_bytes: int) -> bytes:
        """The verified bytes of a blob whose size the caller does not know (a manifest named by the registry).

        Raises:
            NotFoundError: the blob is missing.
            IntegrityError: it is larger than ``max_bytes`` or its hash does not match.
        """
        try:
            size = self.backend.size(blob_key(digest))
        except NotFoundError:
            size = 0  # let get() raise its explanatory error
        if size > max_bytes:
            raise IntegrityError(
                f"blob {digest} in {self.backend.url} is {size} bytes, over the {max_bytes}-byte limit for its kind",
                key=blob_key(digest),
                store=self.backend.url,
            )
        return self.get(Descriptor(digest, size))

    def local_file(self, descriptor: Descriptor) -> Path | None:
        """A verified local file holding the blob, for zero-copy mmap; None when the store is not local.

        The file is re-hashed only when its stat differs from the verified-state record.

        Raises:
            NotFoundError: the blob is missing.
            IntegrityError: its size or hash does not match.
        """
        verified = self.verified_file(descriptor)
        return None if verified is None else verified.path

    def verified_file(self, descriptor: Descriptor, *, hash_if_stale: bool = True) -> VerifiedFile | None:
        """Like :meth:`local_file`, with the file identity the verification holds for (see :meth:`unchanged`).

        Args:
            hash_if_stale: False returns None instead of re-hashing a file whose record does not match (the
                cheap first pass of a load, before the stale files are hashed on all cores).
        """
        path = self.backend.local_path(blob_key(descriptor.digest))
        if path is None:
            return None
        stat = self._lstat_regular(descriptor, path)
        if stat.st_size != descriptor.size:
            self.check(descriptor, None, stat.st_size)
        identity = _identity(stat)
        if self._read_record(descriptor.digest) != identity:
            if not hash_if_stale:
                return None
            self._hash_and_record(descriptor, path, stat)
        elif self._touch_records and (record := self._record_path(descriptor.digest)) is not None:
            with contextlib.suppress(OSError):  # last-use order is advisory
                os.utime(record)
        return VerifiedFile(path, identity)

    def unchanged(self, verified: VerifiedFile) -> bool:
        """True when the file still has the identity it was verified with (checked after mapping it: a file
        replaced between verification and mmap would otherwise be read unverified)."""
        try:
            return _identity(os.lstat(verified.path)) == verified.identity
        except OSError:
            return False

    def _lstat_regular(self, descriptor: Descriptor, path: Path) -> os.stat_result:
        try:
            stat = os.lstat(path)
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"blob {descriptor.digest} is missing from {self.backend.url}; the store is damaged",
                what=str(descriptor.digest),
                store=self.backend.url,
            ) from exc
        if not S_ISREG(stat.st_mode):
            raise IntegrityError(
                f"blob {descriptor.digest} in {self.backend.url} is not a regular file (a symlink?); fracstore does "
                "not follow links inside a store. Replace it with the real blob file",
                key=blob_key(descriptor.digest),
                store=self.backend.url,
            )
        return stat

    def verify(self, descriptor: Descriptor) -> None:
        """Re-hash the blob's stored bytes, ignoring any verified-state record.

        Raises:
            NotFoundError, IntegrityError: as :meth:`get`.
        """
        path = self.backend.local_path(blob_key(descriptor.digest))
        if path is None:
            self.get(descriptor)
        else:
            self._hash_and_record(descriptor, path, self._lstat_regular(descriptor, path))

    def _hash_and_record(self, descriptor: Descriptor, path: Path, stat: os.stat_result) -> None:
        digest, size = hash_file(path)
        self.check(descriptor, digest, size)
        # Record the identity the hash belongs to, and only if the file did not change while it was hashed.
        if _identity(self._lstat_regular(descriptor, path)) == _identity(stat):
            self._write_record(descriptor.digest, _identity(stat))

    def digests(self) -> Iterator[Digest]:
        """Every blob digest present in the store (malformed keys are skipped: they are not blobs)."""
        for key in self.backend.list(BLOBS_PREFIX):
            with contextlib.suppress(FormatError):
                yield digest_from_blob_key(key)

    def check(self, descriptor: Descriptor, actual: Digest | None, size: int) -> None:
        """Raise IntegrityError unless ``size`` and ``actual`` (None: not hashed) match ``descriptor``."""
        if size != descriptor.size:
            raise IntegrityError(
                f"blob {descriptor.digest} in {self.backend.url} has {size} bytes, expected {descriptor.size}: "
                "the stored copy is corrupt or truncated",
                key=blob_key(descriptor.digest),
                expected=str(descriptor.size),
                actual=str(size),
                store=self.backend.url,
            )
        if actual != descriptor.digest:
            raise IntegrityError(
                f"blob {descriptor.digest} in {self.backend.url} hashes to {actual}: the stored copy is corrupt",
                key=blob_key(descriptor.digest),
                expected=str(descriptor.digest),
                actual=str(actual),
                store=self.backend.url,
            )

    # -- verified-state records -------------------------------------------------------------------------------

    def _record_path(self, digest: Digest) -> Path | None:
        if self._verified_dir is None or not self.backend.is_local:
            return None
        return self._verified_dir / digest.hex[:2] / digest.hex

    def _read_record(self, digest: Digest) -> tuple[int, ...] | None:
        record = self._record_path(digest)
        if record is None:
            return None
        data = read_cached(record)
        try:
            value = msgpack.unpackb(data) if data is not None else None
        except (ValueError, msgpack.UnpackException):
            return None  # an unreadable record only costs a re-hash
        return tuple(value) if isinstance(value, list) else None

    def last_verified(self, digest: Digest) -> float | None:
        """When the blob's record was last written or touched (seconds since the epoch), or None."""
        record = self._record_path(digest)
        try:
            return None if record is None else os.stat(record).st_mtime
        except OSError:
            return None

    def forget(self, digest: Digest) -> None:
        """Remove the blob's verified-state record (its file is then re-hashed before the next use)."""
        record = self._record_path(digest)
        if record is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record)

    def record_verified(self, digest: Digest) -> None:
        """Record the current identity of a blob file whose bytes were just verified or written by this process."""
        path = self.backend.local_path(blob_key(digest))
        if path is not None and self._record_path(digest) is not None:
            with contextlib.suppress(FileNotFoundError):  # discarded meanwhile: no record, its next use re-hashes
                self._write_record(digest, _identity(os.lstat(path)))

    def _write_record(self, digest: Digest, identity: tuple[int, ...]) -> None:
        record = self._record_path(digest)
        if record is None:
            return
        try:
            write_cached(record, msgpack.packb(list(identity)))
        except OSError as exc:
            # The record is an optimisation; failing to write it must not fail a save or load, but a cache folder
            # that cannot be written at all is worth an error the user can act on.
            if not record.parent.exists():
                raise StorageError(
                    f"cannot write the verified-state record under {record.parent}: {exc}; set cache_dir= or "
                    "FRACSTORE_CACHE_DIR to a writable folder"
                ) from exc


def _rehashed(data: Data, descriptor: Descriptor, store: str) -> Iterator[bytes | bytearray | memoryview]:
    """Yield ``data``'s chunks while hashing them; raise before the last write completes if they no longer match."""
    hasher = hashlib.sha256()
    size = 0
    for chunk in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
        yield chunk
        # Hashed after the writer consumed it: a change made before the write shows up here, since memory a
        # training step changes stays changed.
        hasher.update(chunk)
        size += memoryview(chunk).nbytes
    if size != descriptor.size or hasher.hexdigest() != descriptor.digest.hex:
        raise IntegrityError(
            f"the data of blob {descriptor.digest} changed while it was being written to {store} (is another thread "
            "updating the model?); nothing was stored under that name. Save a copy or pause training while saving",
            key=blob_key(descriptor.digest),
            expected=str(descriptor.digest),
            store=store,
        )


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
