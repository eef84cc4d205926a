"""The storage backend: the only module that imports fsspec.

A :class:`Backend` is a small concrete class over ``(fs, root)`` as returned by ``fsspec.core.url_to_fs``. It speaks
in *keys* (``/``-separated strings relative to the store root) and offers exactly what the layers above need: read,
read_range, open_read, put_if_absent, put_overwrite, size, list, delete. Builtin and library errors are translated
into fracstore errors ``from`` the original, so callers never see a backend-specific exception.

Put-if-absent is the one operation whose semantics matter most (it is both the lock and the commit of a registry
append, DESIGN.md section 4), so it is implemented per backend:

* local disk: write a temp file with a random name in the target folder, fsync, ``os.link`` it to the final name
  (fails with EEXIST if taken, atomically), unlink the temp, fsync the folder. fsspec's own local "xb" writes in
  place (a partial file would be visible) and its generic create is exists-then-write, so neither is used.
* memory: the filesystem lives in this process, so a process-wide lock around check-and-write is exact.
* s3 / gcs: the services' conditional create (``If-None-Match: *`` / ``ifGenerationMatch=0``) through
  ``pipe_file(mode="create")`` / ``put_file(mode="create")``; large files go up as multipart uploads with parallel
  parts (s3fs/gcsfs decide the part size), and the condition is checked when the upload completes.

S3 stores get measured defaults for the settings s3fs leaves slow (see :data:`S3_TUNING`); anything the caller puts
in ``storage_options`` wins.

Any other fsspec protocol can hold blobs (content-addressed writes are idempotent) but reports
``atomic_create = False`` and registry writes refuse it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.callbacks import Callback
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .errors import ConfigError, FracstoreError, NotFoundError, OfflineError, StorageError, UnsupportedBackendError
from .layout import probe_key

Buffer = bytes | bytearray | memoryview
Data = Buffer | Iterable[Buffer]

# Protocols whose pipe_file(mode="create") is a server-side conditional create.
_NATIVE_CREATE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})
TEMP_PREFIX = ".tmp-"
_memory_lock = threading.Lock()

# botocore's defaults cost throughput (benchmarks/bench_remote.py): a CRC32 of every request and response body on
# top of the SHA-256 fracstore computes anyway, and a pool of 10 connections shared by parallel blobs that each
# upload 10 parts at once. Merged under the caller's own config_kwargs.
# Retries: botocore's legacy policy waits up to ~15 s on a refused connection before an error surfaces; the standard
# policy with 3 attempts is AWS's own default for new SDKs, and a connect timeout of 10 s (not 60) lets an
# unreachable endpoint fail fast while a slow transfer keeps its read timeout.
S3_TUNING: Mapping[str, Any] = {
    "request_checksum_calculation": "when_required",
    "response_checksum_validation": "when_required",
    "max_pool_connections": 64,
    "retries": {"max_attempts": 3, "mode": "standard"},
    "connect_timeout": 10,
}

SMALL_REQUEST_SECONDS = 10.0  # deadline of one small request on an object store, the client's retries included
_SLOW_LINK_BYTES_PER_SECOND = 256 * 1024  # ... plus this much time per byte sent or received

ProgressHook = Callable[[int], None]
"""Called with the number of bytes moved since its last call."""


class _ByteProgress(Callback):  # type: ignore[misc]
    """An fsspec callback forwarding byte increments, whichever of relative/absolute updates the filesystem uses."""

    def __init__(self, hook: ProgressHook | None) -> None:
        super().__init__()
        self._hook = hook
        self._reported = 0

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self._hook is not None and self.value > self._reported:
            self._hook(self.value - self._reported)
            self._reported = self.value


def tuned_storage_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with fracstore's measured defaults added for the URL's protocol (the caller's win)."""
    options = dict(storage_options or {})
    scheme = urlsplit(url).scheme
    if scheme in ("s3", "s3a"):
        # A deep copy: botocore rewrites the dicts it is given (retries' max_attempts becomes total_max_attempts).
        options["config_kwargs"] = {**copy.deepcopy(dict(S3_TUNING)), **dict(options.get("config_kwargs") or {})}
    if scheme in ("s3", "s3a", "gs", "gcs"):
        # s3fs and gcsfs answer info() from listings cached without expiry (fsspec shares one filesystem object per
        # set of options in a process): after a listing, a blob another machine deleted would still look present,
        # and a save would dedup onto it and publish a version whose data is gone. Presence must be asked, always.
        options.setdefault("use_listings_cache", False)
    return options


def redact_url(url: str) -> str:
    """``url`` without userinfo (``s3://key:secret@bucket`` -> ``s3://bucket``): safe to show and log."""
    parts = urlsplit(url)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return url


def _chunks(data: Data) -> Iterator[Buffer]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield data
    else:
        yield from data


class Backend:
    """Keyed byte storage over one fsspec filesystem and a root path.

    Attributes:
        fs: the fsspec filesystem.
        root: the root path inside ``fs`` (no trailing slash).
        url: the store URL with credentials removed, for messages.
        protocol: the filesystem's primary protocol (``"file"``, ``"memory"``, ``"s3"``, ...).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, *, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/") or "/"  # "/" also stands for fsspec's empty memory root
        self.url = redact_url(url)
        protocol = fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]
        self._local_root = Path(self.root) if isinstance(fs, LocalFileSystem) else None
        self._probed: bool | None = None

    @classmethod
    def from_url(cls, url: str, *, storage_options: Mapping[str, Any] | None = None) -> Backend:
        """Open ``url`` with fsspec, passing ``storage_options`` through untouched.

        Raises:
            StorageError: fsspec cannot open the URL (unknown protocol, missing extra, bad options).
        """
        if not isinstance(url, str | os.PathLike) or not str(url):
            raise StorageError(f"a store URL must be a non-empty string, not {url!r}")
        url = os.fspath(url)
        _refuse_userinfo(url)
        try:
            fs, root = fsspec.core.url_to_fs(url, **tuned_storage_options(url, storage_options))
        except ImportError as exc:
            raise StorageError(
                f"cannot open {redact_url(url)}: {exc}. Install the matching extra, e.g. pip install 'fracstore[s3]'",
                store=redact_url(url),
            ) from exc
        except (ValueError, TypeError, OSError) as exc:
            raise StorageError(f"cannot open {redact_url(url)}: {exc}", store=redact_url(url)) from exc
        return cls(fs, root, url=url if "://" in url else root)

    @staticmethod
    def is_local_url(url: str) -> bool:
        """True when ``url`` names a local folder (a plain path or ``file://``), without opening anything."""
        scheme = urlsplit(url).scheme
        return not scheme or scheme == "file" or (len(scheme) == 1 and url[1:2] == ":")  # "C:\\..." on Windows

    @classmethod
    def offline(cls, url: str) -> Backend:
        """A backend for ``url`` that makes no request at all: every operation raises :class:`OfflineError`.

        A store opened offline reads what the local cache holds and nothing else, so "no network" is a property of
        the object rather than something every caller has to remember. Nothing of fsspec is constructed.

        Raises:
            ConfigError: ``url`` carries credentials.
        """
        _refuse_userinfo(url)
        protocol = urlsplit(url).scheme or "file"
        return cls(_Unreachable(redact_url(url), protocol), urlsplit(url).path, url=url)

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """True when keys are files on a local disk (zero-copy mmap reads are possible)."""
        return self._local_root is not None

    @property
    def atomic_create(self) -> bool:
        """True when :meth:`put_if_absent` is an atomic, exclusive create on this backend."""
        return self.is_local or isinstance(self.fs, MemoryFileSystem) or self.protocol in _NATIVE_CREATE_PROTOCOLS

    def local_path(self, key: str) -> Path | None:
        """The file holding ``key`` on a local backend, else None."""
        return None if self._local_root is None else self._local_root / self._check_key(key)

    def _check_key(self, key: str) -> str:
        # Keys come from fracstore itself, but a key must never climb out of the store, whatever produced it.
        parts = key.split("/") if isinstance(key, str) else [""]
        if not key or any(part in ("", ".", "..") for part in parts) or "\x00" in key:
            raise StorageError(f"invalid key {key!r}", key=str(key), store=self.url)
        return key

    def _local(self, key: str) -> Path:
        if self._local_root is None:
            raise StorageError(f"{self.url} is not a local store", key=key, store=self.url)
        return self._local_root / self._check_key(key)

    def _path(self, key: str) -> str:
        self._check_key(key)
        return f"{self.root}/{key}" if self.root != "/" else f"/{key}"

    @contextlib.contextmanager
    def _translate(self, key: str, action: str) -> Iterator[None]:
        try:
            yield
        except FracstoreError:
            raise
        except FileNotFoundError as exc:
            raise NotFoundError(f"{key} not found in {self.url}", what=key, store=self.url) from exc
        except PermissionError as exc:
            raise StorageError(
                f"permission denied to {action} {key} in {self.url}: check credentials and access rights",
                key=key,
                store=self.url,
            ) from exc
        except Exception as exc:  # fsspec backends raise library-specific errors (botocore, aiohttp, ...)
            raise StorageError(
                f"could not {action} {key} in {self.url}: {type(exc).__name__}: {exc}", key=key, store=self.url
            ) from exc

    # -- reads ------------------------------------------------------------------------------------------------

    def _small(self, method: str, key: str, *args: Any, size: int = 0, **kwargs: Any) -> Any:
        """Call ``fs.<method>`` for a small request (metadata, a log entry, a manifest) with a deadline on object
        stores, retries included, so an unreachable store fails fast instead of after the client's own retry
        schedule (gcsfs retries a refused connection for about 30 s and offers no option to change that). Bulk
        transfers and listings have no deadline: they take as long as the data does."""
        call = getattr(self.fs, method)
        if not isinstance(self.fs, AsyncFileSystem):
            return call(*args, **kwargs)
        deadline = SMALL_REQUEST_SECONDS + size / _SLOW_LINK_BYTES_PER_SECOND
        try:
            return call(*args, timeout=deadline, **kwargs)
        except FSTimeoutError as exc:
            raise StorageError(
                f"{self.url} did not answer within {deadline:.0f} s (to {method.removesuffix('_file')} {key}): is it "
                "reachable (network, endpoint_url)? To use what this machine cached of it, open it with offline=True",
                key=key,
                store=self.url,
            ) from exc

    def read(self, key: str) -> bytes:
        """All bytes of ``key`` (a small object: bounded by :data:`SMALL_REQUEST_SECONDS` on object stores).

        Raises:
            NotFoundError: no such key.
            StorageError: the backend failed, or did not answer in time.
        """
        with self._translate(key, "read"):
            return bytes(self._small("cat_file", key, self._path(key)))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``key``."""
        with self._translate(key, "read"):
            return bytes(self.fs.cat_file(self._path(key), start=start, end=end))

    def read_capped(self, key: str, max_bytes: int) -> bytes:
        """All bytes of ``key`` if it has at most ``max_bytes``, else the first ``max_bytes + 1`` (so the caller
        sees it is too large) — one request, for objects whose size the caller does not know.

        Raises:
            NotFoundError: no such key.
        """
        with self._translate(key, "read"):
            if self._local_root is not None:
                with open(self._local(key), "rb") as handle:
                    return handle.read(max_bytes + 1)
            return bytes(self._small("cat_file", key, self._path(key), start=0, end=max_bytes + 1, size=max_bytes))

    def download(self, key: str, path: Path, *, progress: ProgressHook | None = None) -> None:
        """Copy ``key`` into the local file ``path`` (created or truncated), streaming; the caller verifies it.

        Raises:
            NotFoundError: no such key.
            StorageError: the transfer failed (``path`` may hold part of the data).
        """
        with self._translate(key, "download"):
            self.fs.get_file(self._path(key), os.fspath(path), callback=_ByteProgress(progress))

    def upload(self, key: str, path: Path, *, progress: ProgressHook | None = None) -> bool:
        """Create ``key`` from the local file ``path`` unless it exists; True when this call created it.

        Object stores get a streaming (multipart, parallel parts) conditional upload; on a local disk or in memory
        this is :meth:`put_if_absent` of the file's chunks.

        Raises:
            StorageError: the transfer failed (nothing was created under ``key``: multipart uploads are aborted).
        """
        if self._local_root is not None or isinstance(self.fs, MemoryFileSystem):
            return self.put_if_absent(key, file_chunks(path, progress))
        with self._translate(key, "upload"):
            try:
                self.fs.put_file(os.fspath(path), self._path(key), mode="create", callback=_ByteProgress(progress))
            except FileExistsError:
                return False
            return True

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        """A binary file object for streaming ``key``."""
        with self._translate(key, "read"), self.fs.open(self._path(key), "rb") as handle:
            yield handle

    def size(self, key: str) -> int:
        """The size of ``key`` in bytes.

        Raises:
            NotFoundError: no such key.
        """
        with self._translate(key, "stat"):
            if self._local_root is not None:
                # Direct lstat: LocalFileSystem.info costs several times more per call, and follows links. Only a
                # regular file is an object: a link or a folder under a key is something fracstore never wrote.
                stat = os.lstat(self._local(key))
                if not S_ISREG(stat.st_mode):
                    raise FileNotFoundError(f"{key} is not a regular file")
                return stat.st_size
            if self.protocol in ("s3", "s3a"):
                # One HEAD: s3fs's info() follows a 404 with a LIST to see whether the key is a "directory", which
                # doubles the cost of every existence check of a missing blob or log entry.
                bucket, object_key, _ = self.fs.split_path(self._path(key))
                head = self._small("call_s3", key, "head_object", Bucket=bucket, Key=object_key)
                return int(head["ContentLength"])
            return int(self._small("info", key, self._path(key))["size"])

    def exists(self, key: str) -> bool:
        """True when ``key`` exists. Unlike fsspec's ``exists``, a backend failure raises instead of reading as
        "missing" (an auth error must never make data look absent)."""
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder-like prefix ending in ``/``), sorted. Temp files are skipped."""
        with self._translate(prefix, "list"):
            base = self._path(prefix.rstrip("/"))
            try:
                found = self.fs.find(base, withdirs=False)
            except FileNotFoundError:
                return []
        # fsspec returns paths without protocol; some backends drop the leading "/" the root has, or add one.
        root = self.root.strip("/") + "/"
        keys = []
        for path in found:
            relative = path.lstrip("/")
            if not relative.startswith(root.lstrip("/")):
                continue
            key = relative[len(root.lstrip("/")) :]
            if key and not key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                keys.append(key)
        return sorted(keys)

    # -- writes -----------------------------------------------------------------------------------------------

    def put_if_absent(self, key: str, data: Data, *, sync_folder: bool = True) -> bool:
        """Create ``key`` holding ``data`` unless it exists. Returns True if this call created it.

        On a local disk the object appears complete or not at all, and is read-only once created: everything created
        this way is immutable. Its data is fsynced before it gets its name.

        Args:
            sync_folder: on a local disk, also fsync the folder so the new name survives a power loss. Writers of
                many objects pass False and call :meth:`sync_folders` once for all of them before anything refers to
                them (one folder fsync each instead of one per object).

        Raises:
            StorageError: the backend failed (the key may or may not have been created: read it back).
        """
        with self._translate(key, "create"):
            if self._local_root is not None:
                return self._local_put_if_absent(self._local(key), data, sync_folder=sync_folder)
            path = self._path(key)
            if isinstance(self.fs, MemoryFileSystem):
                with _memory_lock:
                    if path in self.fs.store:
                        return False
                    self.fs.pipe_file(path, b"".join(_chunks(data)))
                    return True
            try:
                # Whole-object upload: what comes here is small (log entries, markers); blobs go through upload().
                joined = b"".join(_chunks(data))
                self._small("pipe_file", key, path, joined, mode="create", size=len(joined))
            except FileExistsError:
                return False
            return True

    def put_overwrite(self, key: str, data: Data) -> None:
        """Write ``key``, replacing any previous content atomically. Only for advisory metadata (DESIGN.md 2)."""
        with self._translate(key, "write"):
            if self._local_root is not None:
                final = self._local(key)
                tmp = self._local_write_temp(final, data, mode=0o644)
                try:
                    os.replace(tmp, final)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                fsync_folder(final.parent)
                return
            joined = b"".join(_chunks(data))
            self._small("pipe_file", key, self._path(key), joined, size=len(joined))

    def delete(self, key: str) -> bool:
        """Remove ``key``. Returns False when it was already absent."""
        with self._translate(key, "delete"):
            if self._local_root is not None:
                try:
                    os.unlink(self._local(key))
                except FileNotFoundError:
                    return False
                return True
            path = self._path(key)
            try:
                # Object stores answer a delete of a missing key with success; ask first so the result is honest.
                self.size(key)
            except NotFoundError:
                return False
            self._small("rm_file", key, path)
            return True

    def probe_atomic_create(self) -> None:
        """Prove that a second create of one key fails and leaves the first content (DESIGN.md section 4).

        The result is remembered for the life of this object.

        Raises:
            UnsupportedBackendError: the backend cannot create atomically, or silently overwrote the probe.
        """
        if self._probed:
            return
        if not self.atomic_create:
            raise UnsupportedBackendError(
                f"{self.url} ({self.protocol}://) has no atomic create-if-absent, so concurrent registry writes could "
                "overwrite each other. Use a local folder, memory://, s3:// or gs://.",
                store=self.url,
            )
        key = probe_key(secrets.token_hex(16))
        first, second = b"first:" + secrets.token_bytes(8), b"second:" + secrets.token_bytes(8)
        try:
            created = self.put_if_absent(key, first)
            refused = not self.put_if_absent(key, second)
            kept = self.read(key) == first
        finally:
            with contextlib.suppress(FracstoreError):
                self.delete(key)
        if not (created and refused and kept):
            raise UnsupportedBackendError(
                f"{self.url} silently overwrote an existing object on a conditional create, so concurrent registry "
                "writes would be lost. Registry writes are refused on it; use a backend or endpoint that honours "
                "If-None-Match / ifGenerationMatch.",
                store=self.url,
            )
        self._probed = True

    # -- local disk -------------------------------------------------------------------------------------------

    def _local_write_temp(self, final: Path, data: Data, *, mode: int, sync_folder: bool = True) -> Path:
        created_dirs = _mkdirs(final.parent)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=TEMP_PREFIX)  # O_EXCL, random name
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in _chunks(data):
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if sync_folder:  # else sync_folders() covers the new folders' entries in their parents
            for folder in created_dirs:
                fsync_folder(folder.parent)
        return tmp

    def sync_folders(self, keys: Iterable[str]) -> None:
        """Make the names of objects created with ``sync_folder=False`` durable: fsync each of their folders, and
        the folders above them up to the store root, once.

        Raises:
            StorageError: an fsync failed.
        """
        if self._local_root is None:
            return  # object stores commit a name with the object itself
        folders: set[Path] = set()
        for key in keys:
            # The folder holding the name, and every folder up to the root: any of them may be new.
            folder = self._local(key).parent
            while folder not in folders and folder != self._local_root.parent:
                folders.add(folder)
                if folder == self._local_root:
                    break
                folder = folder.parent
        for folder in sorted(folders):
            with self._translate(str(folder.relative_to(self._local_root)), "sync"):
                fsync_folder(folder)

    def local_temp(self, key: str) -> Path:
        """A new empty file with a random name in ``key``'s folder on a local disk, for data that
        :meth:`link_if_absent` later gives the name ``key``. Listing skips it; the caller removes it on failure."""
        final = self._local(key)
        _mkdirs(final.parent)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=TEMP_PREFIX)  # O_EXCL, random name
        os.close(fd)
        return Path(tmp_name)

    def link_if_absent(self, key: str, tmp: Path, *, sync_folder: bool = True) -> bool:
        """Give the complete local file ``tmp`` (from :meth:`local_temp`) the name ``key`` unless it is taken,
        atomically; ``tmp`` is consumed either way. The data is fsynced and made read-only first.

        Raises:
            StorageError: the disk failed.
        """
        with self._translate(key, "create"):
            try:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o444)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return self._link_temp(tmp, self._local(key), sync_folder=sync_folder)

    def _local_put_if_absent(self, final: Path, data: Data, *, sync_folder: bool) -> bool:
        if os.path.lexists(final):  # cheap early exit; the link below is what decides
            return False
        tmp = self._local_write_temp(final, data, mode=0o444, sync_folder=sync_folder)
        return self._link_temp(tmp, final, sync_folder=sync_folder)

    def _link_temp(self, tmp: Path, final: Path, *, sync_folder: bool) -> bool:
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno in {1, 95, 38}:  # EPERM / EOPNOTSUPP / ENOSYS: no hard links on this filesystem
                raise UnsupportedBackendError(
                    f"{self.url} is on a filesystem without hard links, which fracstore needs for atomic creates",
                    store=self.url,
                ) from exc
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if sync_folder:
            fsync_folder(final.parent)
        return True

    # -- metadata ---------------------------------------------------------------------------------------------

    def modified(self, key: str) -> datetime:
        """When ``key`` was last written, in UTC (garbage collection's grace period is measured from it).

        Local disks: the file's ``st_mtime`` (by ``lstat``: a link is not followed). Object stores and memory: the
        first of ``LastModified`` (S3), ``mtime`` (GCS, and fsspec's generic form), ``updated``, ``created``
        (memory) that the filesystem's ``info`` reports.

        Raises:
            NotFoundError: no such key.
            StorageError: the backend failed, or reports no modification time for the key.
        """
        with self._translate(key, "stat"):
            if self._local_root is not None:
                return datetime.fromtimestamp(os.lstat(self._local(key)).st_mtime, tz=UTC)
            info = self._small("info", key, self._path(key))
            for field in ("LastModified", "mtime", "updated", "created"):
                value = info.get(field)
                if isinstance(value, datetime):
                    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    return datetime.fromtimestamp(value, tz=UTC)
                if isinstance(value, str):
                    with contextlib.suppress(ValueError):
                        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
            # Without a time, the grace period cannot be honoured; guessing "old" could delete a blob being
            # published right now.
            raise StorageError(
                f"{self.url} reports no modification time for {key} (info fields: {', '.join(sorted(info))}); "
                "garbage collection needs one to apply its grace period",
                key=key,
                store=self.url,
            )


def _refuse_userinfo(url: str) -> None:
    if redact_url(url) != url:
        # fsspec would pass the userinfo on as part of a bucket or host name, into error messages and logs.
        raise ConfigError(
            f"{redact_url(url)}: a store URL must not carry credentials; pass them in storage_options "
            "(e.g. key=/secret= for s3, token= for gs) or through the standard environment and config files"
        )


class _Unreachable:
    """Stands in for the filesystem of a store opened offline; any use raises OfflineError."""

    def __init__(self, url: str, protocol: str) -> None:
        self.protocol = protocol
        self._url = url

    def __getattr__(self, name: str) -> Any:
        raise OfflineError(
            f"{self._url} is opened offline, and this needs the store itself: a write, or data this machine has not "
            "cached. Open it online for that; offline, only models loaded on this machine before can be listed and "
            "loaded",
            store=self._url,
        )


def file_chunks(path: Path, progress: ProgressHook | None = None, chunk_size: int = 8 << 20) -> Iterator[bytes]:
    """The bytes of a local file in chunks, reporting each to ``progress``."""
    # O_NOFOLLOW: the files uploaded are blob files, never links in a store fracstore wrote.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb", buffering=0) as handle:
        while chunk := handle.read(chunk_size):
            yield chunk
            if progress is not None:
                progress(len(chunk))


def _mkdirs(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return the folders created, outermost first."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
    return list(reversed(missing))


def fsync_folder(folder: Path) -> None:
    """Make the names in a local folder durable: a new directory entry survives a power loss only once its folder is
    fsynced (restic / ext4 semantics)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
