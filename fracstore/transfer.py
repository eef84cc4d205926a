"""push / pull / copy of models between two stores (DESIGN.md section 6).

A *transfer* copies versions of a model from a source store to a destination store, any pair of local, memory, S3
and GCS. Only blobs the destination lacks travel: their presence is checked in one parallel batch, the missing ones
are sent with bounded parallelism (each large blob is itself a multipart transfer with parallel parts), and
transient storage errors are retried with backoff. Every blob is verified on the way: a local source file is
checked against its verified-state record (re-hashed when stale), a download is hashed before it gets its name, and
a copy between two local disks is hashed while it is written.

The write order is a save's (DESIGN.md section 5): data blobs, then manifests, then a confirm and a publish entry in
the destination's own log. Version numbers are the destination's: ``m@3`` in the source may become ``m@1`` there.
Publishing is idempotent: a version whose manifest the destination already has live is not published again.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm import tqdm

from .backend import file_chunks
from .blobs import BlobStore
from .cache import CachedBlobStore, download_verified
from .digest import Descriptor, Digest
from .errors import FormatError, NotFoundError, OfflineError, StorageError, UnsupportedBackendError
from .layout import blob_key
from .query import ModelRecord

if TYPE_CHECKING:
    from .store import Store

PARALLEL_BLOBS = 8  # blobs in flight at once; each large one also moves its parts in parallel
CHECK_THREADS = 32  # existence checks are small requests: many at once
RETRIES = 4  # attempts per blob on transient storage errors
_BACKOFF_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class TransferredVersion:
    """One version a transfer carried.

    Attributes:
        name: the model name (the same on both sides).
        source_version, destination_version: its version number in each store.
        digest: the manifest digest (the same on both sides).
        published: True when the transfer appended a publish entry; False when the destination already had it.
    """

    name: str
    source_version: int
    destination_version: int
    digest: Digest
    published: bool

    @property
    def ref(self) -> str:
        """``name@destination_version``."""
        return f"{self.name}@{self.destination_version}"


@dataclass(frozen=True, slots=True)
class TransferSummary:
    """What a push or pull did.

    Attributes:
        source, destination: the store URLs (without credentials).
        versions: the versions carried, in version order.
        blobs_total, bytes_total: every blob the versions reference (their logical size).
        blobs_sent, bytes_sent: the blobs the destination lacked, which were actually sent.
        tags: the tags set on the destination (``name:tag``).
    """

    source: str
    destination: str
    versions: tuple[TransferredVersion, ...]
    blobs_total: int
    blobs_sent: int
    bytes_total: int
    bytes_sent: int
    tags: tuple[str, ...] = ()


def copy(
    source: Store,
    destination: Store,
    ref: str,
    *,
    all_versions: bool = False,
    tags: bool = False,
    progress: bool = False,
) -> TransferSummary:
    """Copy the version ``ref`` names (or, with ``all_versions``, every live version of its model) from ``source``
    to ``destination``.

    Args:
        ref: ``name``, ``name@3``, ``name:tag`` or a digest (prefix), resolved in ``source``.
        all_versions: every live version of the model ``ref`` names.
        tags: also set the source's tags that point at the versions carried (moving them in the destination).
        progress: draw a progress bar in bytes on stderr (only when stderr is a terminal).

    Raises:
        NotFoundError, AmbiguousRefError, FormatError: ``ref`` does not name a live version in ``source``.
        IntegrityError: a source blob is corrupt (nothing is published).
        OfflineError: either store is opened offline and the transfer needs it.
        StorageError: a store failed after retries (blobs sent so far stay, unreferenced; run it again).
    """
    if destination.offline:
        raise OfflineError(f"{destination.url} is opened offline: nothing can be sent to it", store=destination.url)
    if source.id == destination.id and source.url == destination.url:
        raise FormatError(f"source and destination are the same store ({source.url})")
    records = _versions(source, ref, all_versions=all_versions)
    manifests = {r.digest: source.manifest(r.digest) for r in records}
    manifest_blobs = [Descriptor(r.digest, source.blobs.size_of(r.digest)) for r in records]
    data_blobs = list({d.digest: d for m in manifests.values() for d in m.references()}.values())
    every = list({d.digest: d for d in (*data_blobs, *manifest_blobs)}.values())

    missing = _missing(destination, every)
    sent_bytes = sum(d.size for d in every if d.digest in missing)
    # Bytes the bar counts: each blob once as it lands at the destination, plus its download first when it goes
    # from one remote store to another through the local cache and is not cached yet.
    relayed = [
        d
        for d in every
        if d.digest in missing
        and isinstance(source.blobs, CachedBlobStore)
        and not destination.backend.is_local
        and source.blobs.cached_file(d) is None
    ]
    total = sent_bytes + sum(d.size for d in relayed)
    with _ProgressBar(total, enabled=progress, label=f"{source.url} -> {destination.url}") as bar:
        sender = _Sender(source, destination, bar)
        # Data before manifests, manifests before log entries: what a manifest names is in place before it is.
        sender.send_all([d for d in data_blobs if d.digest in missing])
        sender.send_all([d for d in manifest_blobs if d.digest in missing])
    destination.backend.sync_folders(blob_key(d.digest) for d in every)

    carried: list[TransferredVersion] = []
    for record in records:
        had = _has_live(destination, record.name, record.digest)
        published = destination.publish_manifest(record.name, record.digest)
        carried.append(TransferredVersion(record.name, record.version, published.version, record.digest, not had))
    moved_tags = _carry_tags(source, destination, records, carried) if tags else ()
    for store in (source, destination):
        if isinstance(store.blobs, CachedBlobStore):
            store.blobs.cache.maybe_prune()  # blobs relayed or fetched through the pool
    return TransferSummary(
        source=source.url,
        destination=destination.url,
        versions=tuple(carried),
        blobs_total=len(every),
        blobs_sent=len(missing),
        bytes_total=sum(d.size for d in every),
        bytes_sent=sent_bytes,
        tags=moved_tags,
    )


def _versions(source: Store, ref: str, *, all_versions: bool) -> list[ModelRecord]:
    record = source.resolve(ref)
    if not all_versions:
        return [record]
    named = source.registry.refresh().names[record.name]
    return [source.resolve(f"{record.name}@{v.version}") for v in named.live()]


def _missing(destination: Store, blobs: Sequence[Descriptor]) -> set[Digest]:
    """The digests of ``blobs`` the destination lacks (or holds with the wrong size), checked in parallel."""
    if not blobs:
        return set()
    with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, len(blobs)), thread_name_prefix="fracstore-check") as pool:
        present = list(pool.map(destination.blobs.has, blobs))
    return {d.digest for d, here in zip(blobs, present, strict=True) if not here}


def _has_live(store: Store, name: str, digest: Digest) -> bool:
    named = store.registry.refresh().names.get(name)
    return named is not None and any(v.manifest == digest for v in named.live())


def _carry_tags(
    source: Store, destination: Store, records: Sequence[ModelRecord], carried: Sequence[TransferredVersion]
) -> tuple[str, ...]:
    moved = []
    for record, version in zip(records, carried, strict=True):
        for tag in record.tags:
            current = destination.registry.refresh().names[record.name].tags.get(tag)
            if current != version.destination_version:
                destination.tag(version.ref, tag)
            moved.append(f"{record.name}:{tag}")
    return tuple(moved)


class _Sender:
    """Sends blobs from one store to another, verified, with bounded parallelism and retries."""

    def __init__(self, source: Store, destination: Store, progress: Callable[[int], None]) -> None:
        self.source = source
        self.destination = destination
        self.progress = progress

    def send_all(self, blobs: Sequence[Descriptor]) -> None:
        if not blobs:
            return
        # Biggest first, so one huge blob does not start last and serialise the tail.
        ordered = sorted(blobs, key=lambda d: -d.size)
        with ThreadPoolExecutor(
            max_workers=min(PARALLEL_BLOBS, len(ordered)), thread_name_prefix="fracstore-send"
        ) as pool:
            for _ in pool.map(self._send_with_retries, ordered):
                pass

    def _send_with_retries(self, descriptor: Descriptor) -> None:
        for attempt in range(RETRIES):
            try:
                self._send(descriptor)
                return
            except (OfflineError, UnsupportedBackendError, NotFoundError):
                raise
            except StorageError:
                if attempt + 1 == RETRIES:
                    raise
                time.sleep(random.uniform(0.5, 1.0) * _BACKOFF_SECONDS * 2**attempt)

    def _send(self, descriptor: Descriptor) -> None:
        source, destination = self.source, self.destination
        key = blob_key(descriptor.digest)
        # The existence check found the blob missing or of the wrong size. Something wrong under the name would
        # refuse the create below forever: remove it, but only what is seen to be wrong right now (a concurrent copy
        # may have created the right blob since the check). On a local disk "wrong" includes a failed re-hash.
        blobs = destination.blobs
        if (blobs.remote if isinstance(blobs, CachedBlobStore) else blobs).inspect(descriptor) == "bad":
            destination.backend.delete(key)
        pooled = source.blobs.cached_file(descriptor) if isinstance(source.blobs, CachedBlobStore) else None
        if destination.backend.is_local and isinstance(source.blobs, CachedBlobStore) and pooled is None:
            # Straight into the destination's blob folder: no detour through the cache. (A blob the pool holds, such
            # as the manifest this transfer just read, is copied from there below instead: no second download.)
            created = download_verified(source.backend, destination.backend, descriptor, progress=self.progress)
            if created and isinstance(destination.blobs, BlobStore):
                destination.blobs.record_verified(descriptor.digest)  # hashed just now: no re-hash on first load
            return
        # A verified local file: the source's own (stat against its record), or its copy in the cache (fetched now).
        if isinstance(source.blobs, CachedBlobStore):
            found = pooled or source.blobs.cache.get(descriptor, source.backend, progress=self.progress)
            path = found.path
        else:
            verified = source.blobs.verified_file(descriptor)
            if verified is None:  # unreachable: stores not on a local disk read through the cache
                raise StorageError(f"no local copy of blob {descriptor.digest} from {source.url}", key=key)
            path = verified.path
        if destination.backend.is_local:
            # Disk to disk: hashed again while it is copied, so a file that changed after its check is refused.
            destination.blobs.put(descriptor, file_chunks(path, self.progress), sync_folder=False, mutable=True)
        else:
            destination.backend.upload(key, path, progress=self.progress)


class _ProgressBar:
    """A thread-safe byte counter drawn by tqdm on stderr; silent unless enabled and stderr is a terminal."""

    def __init__(self, total: int, *, enabled: bool, label: str) -> None:
        self._lock = threading.Lock()
        self._bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            file=sys.stderr,
            disable=True if not enabled else None,  # None: tqdm turns itself off when stderr is not a terminal
            leave=False,
            dynamic_ncols=True,
        )

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()

    def __call__(self, count: int) -> None:
        with self._lock:
            self._bar.update(count)
