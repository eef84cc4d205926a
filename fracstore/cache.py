"""The local blob cache: one content-addressed pool on this machine, shared by every remote store.

Digests are global, so a blob fetched from ``s3://a`` serves a load from ``gs://b`` too. The pool is laid out like a
store's blob folder (``<cache>/blobs/sha256/<2 hex>/<64 hex>``, read-only files) and managed by the same
:class:`~fracstore.blobs.BlobStore` code, with verified-state records under ``<cache>/verified/``:

* **fill**: download into a temp file with a random name in the blob's folder, hash it, then link it to its name
  (atomic, exclusive). Several processes may fill the same blob at once: one link wins and the others drop their
  copy. No file locks are needed.
* **use**: a cached file is trusted only while its stat matches its verified-state record; otherwise it is re-hashed,
  and a copy that fails is discarded and fetched once more (DESIGN.md section 6).
* **LRU**: each use touches the blob's record, so the record's mtime is the blob's last use. :meth:`BlobCache.prune`
  removes least-recently-used blobs down to a size, never one used in the last minute (a load may be between
  verifying a file and mapping it).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .backend import TEMP_PREFIX, Backend, Data, ProgressHook
from .blobs import BlobStore, VerifiedFile, hash_file
from .config import cache_max_bytes, parse_size
from .digest import Descriptor, Digest
from .errors import ConfigError, FormatError, IntegrityError, NotFoundError, StorageError
from .layout import BLOBS_PREFIX, blob_key, digest_from_blob_key

__all__ = ["PRUNE_GRACE_SECONDS", "BlobCache", "CacheEntry", "CachedBlobStore", "PruneResult", "download_verified"]
__all__ += ["parse_size"]  # re-exported from config: sizes are the cache's vocabulary

IN_MEMORY_BLOB_BYTES = 64 << 20  # blobs up to this size are downloaded in one GET and hashed in memory
IN_MEMORY_BUDGET_BYTES = 256 << 20  # ... with at most this many such bytes held at once by one process
PRUNE_GRACE_SECONDS = 60.0  # a blob used this recently is never pruned (see the module docstring)
STALE_TEMP_SECONDS = 24 * 3600.0  # prune removes fill temp files older than this (left by a killed process)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached blob: its digest, size and when it was last used (UTC)."""

    digest: Digest
    size: int
    last_used: datetime


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What :meth:`BlobCache.prune` removed (or, with ``dry_run``, would remove), and the bytes left."""

    removed: tuple[CacheEntry, ...]
    bytes_freed: int
    bytes_kept: int


class BlobCache:
    """The shared blob pool under ``cache_dir`` (see the module docstring).

    Args:
        cache_dir: the cache folder (``fracstore.config.default_cache_dir()`` by default at the call sites).
    """

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.backend = Backend.from_url(os.fspath(self.cache_dir))
        self.pool = BlobStore(self.backend, verified_dir=self.cache_dir / "verified", touch_records=True)

    def __repr__(self) -> str:
        return f"BlobCache({os.fspath(self.cache_dir)!r})"

    # -- use and fill -----------------------------------------------------------------------------------------

    def lookup(self, descriptor: Descriptor) -> VerifiedFile | None:
        """The verified cached file of a blob, or None when it is not cached. A cached copy that fails
        verification is discarded (and None returned, so the caller fetches it again)."""
        try:
            return self.pool.verified_file(descriptor)
        except NotFoundError:
            return None
        except IntegrityError:
            self.discard(descriptor.digest)
            return None

    def lookup_unsized(self, digest: Digest, *, max_bytes: int) -> VerifiedFile | None:
        """Like :meth:`lookup` for a blob whose size the caller does not know (a manifest named by the registry)."""
        path = self.backend.local_path(blob_key(digest))
        try:
            size = os.lstat(path).st_size if path is not None else -1
        except FileNotFoundError:
            return None
        if not 0 <= size <= max_bytes:
            self.discard(digest)
            return None
        return self.lookup(Descriptor(digest, size))

    def fill(self, descriptor: Descriptor, source: Backend, *, progress: ProgressHook | None = None) -> VerifiedFile:
        """Fetch a blob from ``source`` into the cache, verified, and return its cached file.

        Raises:
            NotFoundError: ``source`` does not have the blob.
            IntegrityError: ``source``'s copy does not match its digest (the message names ``source``).
            StorageError: the transfer or the cache folder failed.
        """
        for _ in range(2):
            if download_verified(source, self.backend, descriptor, progress=progress):
                self.pool.record_verified(descriptor.digest)  # this call's verified copy got the name
            # else another process's copy holds the name: lookup checks it against its record, or re-hashes it
            found = self.lookup(descriptor)
            if found is not None:
                return found
            # Pruned, or another process's copy failed verification and was discarded, in between: fetch again.
        raise StorageError(
            f"blob {descriptor.digest} kept vanishing from the local cache {self.cache_dir} while it was filled; "
            "is another process pruning it with a tiny size limit?",
            key=blob_key(descriptor.digest),
        )

    def get(self, descriptor: Descriptor, source: Backend, *, progress: ProgressHook | None = None) -> VerifiedFile:
        """The cached file of a blob, fetched from ``source`` when it is not cached (see :meth:`fill`)."""
        found = self.lookup(descriptor)
        return found if found is not None else self.fill(descriptor, source, progress=progress)

    def discard(self, digest: Digest) -> None:
        """Remove a blob and its record from the cache (a no-op when absent)."""
        self.backend.delete(blob_key(digest))
        self.pool.forget(digest)

    # -- management -------------------------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every cached blob, least recently used first."""
        return sorted(self._scan(), key=lambda e: (e.last_used, e.digest.hex))

    def total_bytes(self) -> int:
        """Bytes held by cached blobs."""
        return sum(e.size for e in self._scan())

    def prune(self, max_bytes: int, *, dry_run: bool = False) -> PruneResult:
        """Remove least-recently-used blobs until the cache holds at most ``max_bytes`` (blobs used within the last
        :data:`PRUNE_GRACE_SECONDS` are kept even if that leaves it larger).

        Args:
            dry_run: report what would be removed, remove nothing.

        Raises:
            ConfigError: ``max_bytes`` is negative.
        """
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"max_bytes must be a byte count >= 0, not {max_bytes!r}")
        if not dry_run:
            self._remove_stale_temp_files()
        entries = self.entries()
        total = sum(e.size for e in entries)
        recent = datetime.fromtimestamp(time.time() - PRUNE_GRACE_SECONDS, UTC)
        removed: list[CacheEntry] = []
        for entry in entries:
            if total <= max_bytes:
                break
            if entry.last_used >= recent:
                continue
            if not dry_run:
                # The scan may be seconds old in a big pool: another process may have used the blob since.
                used = self.pool.last_verified(entry.digest)
                if used is not None and used >= recent.timestamp():
                    continue
                self.discard(entry.digest)
            removed.append(entry)
            total -= entry.size
        return PruneResult(tuple(removed), sum(e.size for e in removed), total)

    def maybe_prune(self) -> PruneResult | None:
        """Prune to ``$FRACSTORE_CACHE_MAX_SIZE`` when it is set (stores call this after operations that fill the
        cache); None when no limit is set or the cache is within it."""
        limit = cache_max_bytes()
        if limit is None or self.total_bytes() <= limit:
            return None
        return self.prune(limit)

    def _remove_stale_temp_files(self) -> None:
        # A fill killed mid-download (SIGKILL, OOM, power loss) leaves its temp file; a day is far longer than any
        # live fill of one blob takes.
        root = self.cache_dir / BLOBS_PREFIX
        horizon = time.time() - STALE_TEMP_SECONDS
        for path in root.glob(f"*/{TEMP_PREFIX}*") if root.is_dir() else ():
            with contextlib.suppress(OSError):
                if os.lstat(path).st_mtime < horizon:
                    os.unlink(path)

    def _scan(self) -> Iterator[CacheEntry]:
        root = self.cache_dir / BLOBS_PREFIX
        if not root.is_dir():
            return
        for folder in sorted(root.iterdir()):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                try:
                    digest = digest_from_blob_key(f"{BLOBS_PREFIX}{folder.name}/{path.name}")
                    stat = os.lstat(path)
                except (FormatError, FileNotFoundError):
                    continue  # temp files, strays, or removed meanwhile
                used = self.pool.last_verified(digest)
                last = max(stat.st_mtime, used) if used is not None else stat.st_mtime
                yield CacheEntry(digest, stat.st_size, datetime.fromtimestamp(last, UTC))


def download_verified(
    source: Backend, target: Backend, descriptor: Descriptor, *, progress: ProgressHook | None = None
) -> bool:
    """Copy a blob from ``source`` into the local-disk backend ``target`` (a store or the cache pool), verified
    before it gets its name; True when this call created it. A copy that arrives corrupt is fetched once more before
    the error is raised: a transfer can go wrong once, a stored copy that is bad stays bad.

    The download goes to a temp file with a random name in the blob's folder, is hashed, then linked to its name
    (atomic, exclusive), so neither a concurrent filler nor a crash can leave a partial blob under the name. The
    filesystems' own ``get_file`` does the transfer (with its retries and resumption); hashing the finished file
    reads it back from the page cache (measured in benchmarks/bench_remote.py).

    Raises:
        NotFoundError: ``source`` does not have the blob.
        IntegrityError: ``source``'s copy is corrupt (the message names ``source``).
        StorageError: the transfer failed.
    """
    key = blob_key(descriptor.digest)
    if descriptor.size <= IN_MEMORY_BLOB_BYTES:
        return _download_in_memory(source, target, descriptor, progress=progress)
    for attempt in range(2):
        tmp = target.local_temp(key)
        try:
            moved = _Counted(progress)
            source.download(key, tmp, progress=moved)
            actual, size = hash_file(tmp)
            if size == descriptor.size and actual == descriptor.digest:
                return target.link_if_absent(key, tmp, sync_folder=False)
            if progress is not None and moved.total:
                progress(-moved.total)  # the bytes of a discarded copy do not count as progress
            if attempt == 1:
                raise _source_corrupt(descriptor, source, size, actual)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    raise AssertionError("unreachable: the second attempt returns or raises")


def _download_in_memory(
    source: Backend, target: Backend, descriptor: Descriptor, *, progress: ProgressHook | None
) -> bool:
    # A blob of a few MiB in one GET, hashed in memory as it arrived, then written with the local atomic create:
    # no second read of the bytes from disk. Measured in benchmarks/bench_remote.py against get_file + hash_file;
    # the byte budget bounds the memory of parallel transfers.
    key = blob_key(descriptor.digest)
    for attempt in range(2):
        with _in_memory_budget(descriptor.size):
            # Capped: a damaged or hostile object under a small blob's name is not read whole into memory.
            data = source.read_capped(key, descriptor.size)
            actual = Digest.of(data)
            if len(data) == descriptor.size and actual == descriptor.digest:
                created = target.put_if_absent(key, data, sync_folder=False)
                if progress is not None:
                    progress(len(data))
                return created
        if attempt == 1:
            raise _source_corrupt(descriptor, source, len(data), actual)
    raise AssertionError("unreachable: the second attempt returns or raises")


class _ByteBudget:
    """A counting semaphore in bytes: parallel in-memory transfers hold at most ``limit`` bytes between them."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def __call__(self, size: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self._used == 0 or self._used + size <= self._limit)
            self._used += size
        try:
            yield
        finally:
            with self._changed:
                self._used -= size
                self._changed.notify_all()


_in_memory_budget = _ByteBudget(IN_MEMORY_BUDGET_BYTES)


class _Counted:
    """A progress hook that also remembers the bytes it passed on."""

    def __init__(self, hook: ProgressHook | None) -> None:
        self._hook = hook
        self.total = 0

    def __call__(self, count: int) -> None:
        self.total += count
        if self._hook is not None:
            self._hook(count)


def _source_corrupt(descriptor: Descriptor, source: Backend, size: int, actual: Digest) -> IntegrityError:
    found = f"{size} bytes hashing to {actual}"
    return IntegrityError(
        f"blob {descriptor.digest} in {source.url} is corrupt: fetched twice, got {found} (expected "
        f"{descriptor.size} bytes). Restore it by pushing the model again from a store that has a good copy",
        key=blob_key(descriptor.digest),
        expected=str(descriptor.digest),
        actual=str(actual),
        store=source.url,
    )


class CachedBlobStore:
    """A remote store's blobs, read and written through the local cache (the interface of
    :class:`~fracstore.blobs.BlobStore`, so the store facade does not care where its blobs live).

    Reads are served from the cache, filling it first on a miss; loads then memory-map the cached files. Writes go
    through the cache too: a new blob is written (hashed while written) into the pool, then uploaded from that file
    as a streaming, conditional, multipart upload. That bounds a save's memory by the chunk size instead of the blob
    size, and a model saved from this machine loads back with no download.

    Args:
        remote: the store's own blob store (over the remote backend).
        cache: the shared pool.
    """

    def __init__(self, remote: BlobStore, cache: BlobCache) -> None:
        self.remote = remote
        self.cache = cache
        self.backend = remote.backend

    # -- writes -----------------------------------------------------------------------------------------------

    def put(self, descriptor: Descriptor, data: Data, *, sync_folder: bool = True, mutable: bool = False) -> bool:
        """As :meth:`BlobStore.put`: True when the blob was uploaded (one already in the store, with its size, is
        kept). ``sync_folder`` is accepted for the interface; object stores name an object with its upload."""
        del sync_folder
        found = self.remote.inspect(descriptor)
        if found == "good":
            return False
        self.cache.pool.put(descriptor, data, sync_folder=False, mutable=mutable)
        # Just written or just verified, so within the prune grace period: only outside interference loses it.
        cached = self.cache.lookup(descriptor)
        if cached is None:
            raise StorageError(
                f"blob {descriptor.digest} vanished from the local cache {self.cache.cache_dir} right after it was "
                "written (is something else deleting files there?); nothing was uploaded. Save again"
            )
        if found == "bad":
            self.backend.delete(blob_key(descriptor.digest))  # a wrong-sized object under the name; replace it
        return self.backend.upload(blob_key(descriptor.digest), cached.path)

    def put_bytes(self, data: bytes, *, sync_folder: bool = True) -> tuple[Descriptor, bool]:
        """Hash and store ``data``. Returns its descriptor and whether it was uploaded."""
        descriptor = Descriptor(Digest.of(data), len(data))
        return descriptor, self.put(descriptor, data, sync_folder=sync_folder)

    # -- reads ------------------------------------------------------------------------------------------------

    def size_of(self, digest: Digest) -> int:
        """As :meth:`BlobStore.size_of` (asks the store)."""
        return self.remote.size_of(digest)

    def has(self, descriptor: Descriptor) -> bool:
        """True when the *store* has the blob with its size (the confirm step asks the store, not the cache)."""
        return self.remote.has(descriptor)

    def get(self, descriptor: Descriptor) -> bytes:
        """The verified bytes of a blob (from the cache, filled on a miss)."""
        verified = self.cache.get(descriptor, self.backend)
        return verified.path.read_bytes()

    def get_unsized(self, digest: Digest, *, max_bytes: int) -> bytes:
        """As :meth:`BlobStore.get_unsized`, in one request on a miss (a manifest named by the registry)."""
        cached = self.cache.lookup_unsized(digest, max_bytes=max_bytes)
        if cached is not None:
            return cached.path.read_bytes()
        key = blob_key(digest)
        try:
            data = self.backend.read_capped(key, max_bytes)
        except NotFoundError as exc:
            raise NotFoundError(
                f"blob {digest} is missing from {self.backend.url}; the store is damaged (restore the blob, e.g. by "
                "pushing the model again from a store that has it)",
                what=str(digest),
                store=self.backend.url,
            ) from exc
        if len(data) > max_bytes:
            raise IntegrityError(
                f"blob {digest} in {self.backend.url} is over the {max_bytes}-byte limit for its kind",
                key=key,
                store=self.backend.url,
            )
        actual = Digest.of(data)
        if actual != digest:
            raise IntegrityError(
                f"blob {digest} in {self.backend.url} hashes to {actual}: the stored copy is corrupt",
                key=key,
                expected=str(digest),
                actual=str(actual),
                store=self.backend.url,
            )
        self.cache.pool.put(Descriptor(digest, len(data)), data, sync_folder=False)
        return data

    def local_file(self, descriptor: Descriptor) -> Path:
        """A verified local file holding the blob (its cached copy)."""
        return self.verified_file(descriptor).path

    def verified_file(self, descriptor: Descriptor, *, hash_if_stale: bool = True) -> VerifiedFile:
        """The blob's verified cached file, fetched on a miss.

        Raises:
            NotFoundError, IntegrityError: missing from, or corrupt in, the store.
            OfflineError: not cached, and the store is opened offline.
        """
        del hash_if_stale  # a cached file is always checked against its record, and re-hashed when stale
        return self.cache.get(descriptor, self.backend)

    def cached_file(self, descriptor: Descriptor) -> VerifiedFile | None:
        """The blob's cached file when its record matches (no hashing, no request), else None."""
        try:
            return self.cache.pool.verified_file(descriptor, hash_if_stale=False)
        except (NotFoundError, IntegrityError):
            return None

    def unchanged(self, verified: VerifiedFile) -> bool:
        """As :meth:`BlobStore.unchanged`, for a cached file."""
        return self.cache.pool.unchanged(verified)

    def verify(self, descriptor: Descriptor) -> None:
        """Download the store's copy into a temp file and hash it, ignoring the cached copy.

        Raises:
            NotFoundError, IntegrityError: as :meth:`BlobStore.get`.
        """
        tmp = self.cache.backend.local_temp(blob_key(descriptor.digest))
        try:
            self.backend.download(blob_key(descriptor.digest), tmp)
            actual, size = hash_file(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.remote.check(descriptor, actual if size == descriptor.size else None, size)

    def digests(self) -> Iterator[Digest]:
        """Every blob digest in the store."""
        return self.remote.digests()
