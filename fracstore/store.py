"""The Store facade: save, load, list, best, tag, delete, diff over one store URL.

Write order (DESIGN.md section 5): tensor, history and file blobs, then the manifest blob, then a check that every
referenced blob exists with its size, then the registry publish. A crash at any point leaves either a complete,
visible version or unreferenced blobs only. Reads go the other way: registry, manifest, blobs, each verified.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import difflib
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch

from . import bundle, canonical, model_types, transfer, verify
from .backend import Backend, redact_url
from .blobs import BlobStore, VerifiedFile
from .cache import BlobCache, CachedBlobStore
from .codec import MaterializedBlob, PendingBlob, decode_state_dict, plan_state_dict
from .config import MAX_MANIFEST_BYTES, StoreOptions, default_cache_dir
from .digest import Descriptor, Digest
from .errors import (
    AmbiguousRefError,
    ConfigError,
    ConflictError,
    FormatError,
    IntegrityError,
    NotFoundError,
    OfflineError,
    StorageError,
)
from .gc import DEFAULT_GRACE, GcReport, RetentionPolicy, RetentionReport, apply_retention, collect, guarded_publish
from .layout import MARKER_KEY, blob_key
from .localfiles import read_cached, write_cached
from .manifest import (
    FileEntry,
    Manifest,
    TrainingSummary,
    capture_environment,
    check_file_path,
    check_labels,
    check_model_type,
    check_name,
    guess_media_type,
    now,
)
from .query import MetricFilter, ModelRecord, Query, RecordTable, Ref, best
from .registry import Change, Registry
from .registry_state import Entry, RegistryState, VersionState
from .transfer import TransferSummary

STORE_FORMAT = 1
_UNSET: Any = object()
_HISTORY_LIMIT = MAX_MANIFEST_BYTES
_WRITE_THREADS = 8  # blob writes wait on the disk (fsync), not the CPU


class _WriteTally:
    """The blobs one save actually created (those already present cost nothing)."""

    def __init__(self) -> None:
        self.created: list[Descriptor] = []

    def add(self, descriptor: Descriptor, *, created: bool) -> None:
        if created:
            self.created.append(descriptor)


@dataclass(frozen=True, slots=True)
class SavedModel:
    """What a save published.

    Attributes:
        name, version, digest: the new version (``ref`` gives ``name@version``).
        bytes_total: logical bytes of every blob the model references.
        bytes_written: bytes this save actually wrote (blobs already present cost nothing).
        blobs_total, blobs_written: the same, counted in blobs.
    """

    name: str
    version: int
    digest: Digest
    bytes_total: int
    bytes_written: int
    blobs_total: int
    blobs_written: int

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A version's record together with its full manifest."""

    record: ModelRecord
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class ModelDiff:
    """How two versions' weights differ.

    Attributes:
        a, b: the refs compared (``name@version``).
        changed: tensors in both whose value, dtype or shape differ.
        added: tensors only in b.  removed: tensors only in a.  unchanged: tensors equal in both.
        bytes_shared: bytes of b's blobs that a also references (stored once).
        bytes_new: bytes of b's blobs that a does not reference.
        metrics: ``{metric: (value in a, value in b)}`` for every metric either has.
    """

    a: str
    b: str
    changed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]
    bytes_shared: int
    bytes_new: int
    metrics: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)


class Store:
    """A fracstore store at an fsspec URL. Open with :meth:`open`."""

    def __init__(self, backend: Backend, *, store_id: str, options: StoreOptions, offline: bool = False) -> None:
        self.backend = backend
        self.id = store_id
        self.options = options
        self.offline = offline
        cache_dir = options.cache_dir or default_cache_dir()
        store_cache = cache_dir / "stores" / store_id
        self.cache = BlobCache(cache_dir)
        self.blobs: BlobStore | CachedBlobStore
        if backend.is_local:
            # Local stores are read in place (zero-copy mmap of the blob files), never through the cache.
            self.blobs = BlobStore(backend, verified_dir=store_cache / "verified")
        else:
            self.blobs = CachedBlobStore(BlobStore(backend, verified_dir=None), self.cache)
        self.registry = Registry(
            backend, options=options, state_cache=store_cache / "registry.msgpack", offline=offline
        )
        self._manifests: dict[Digest, Manifest] = {}

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        create: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        pack_threshold: int | None = None,
        checkpoint_interval: int | None = None,
        append_attempts: int | None = None,
        offline: bool = False,
    ) -> Store:
        """Open the store at ``url`` (a local folder, ``file://``, ``memory://``, ``s3://``, ``gs://`` ...).

        Args:
            url: where the store lives.
            storage_options: passed to fsspec (credentials, endpoint_url, ...); S3 gets measured transfer defaults
                for the options not given (:data:`fracstore.backend.S3_TUNING`).
            create: create an empty store when there is none at ``url``.
            cache_dir: the local cache folder (default: ``$FRACSTORE_CACHE_DIR`` or the XDG cache folder).
            pack_threshold, checkpoint_interval, append_attempts: see :class:`~fracstore.config.StoreOptions`.
            offline: make no request to a remote store: list, resolve and load from what this machine cached when
                it last used the store online. Writes and anything not cached raise :class:`OfflineError`.
                Ignored for local stores, which are always at hand.

        Raises:
            NotFoundError: no store at ``url`` and ``create`` is False.
            FormatError: something at ``url`` that is not a fracstore store, or a newer store format.
            StorageError: the backend cannot be reached.
            OfflineError: ``offline`` and the store was never opened online on this machine.
        """
        url = os.fspath(url)
        defaults = StoreOptions()
        options = StoreOptions(
            pack_threshold=defaults.pack_threshold if pack_threshold is None else pack_threshold,
            checkpoint_interval=defaults.checkpoint_interval if checkpoint_interval is None else checkpoint_interval,
            append_attempts=defaults.append_attempts if append_attempts is None else append_attempts,
            cache_dir=None if cache_dir is None else Path(cache_dir),
        )
        known = _KnownStores(options.cache_dir or default_cache_dir())
        if offline and not Backend.is_local_url(url):
            # Not even the filesystem object is built: constructing gcsfs's already asks the network for credentials.
            offline_backend = Backend.offline(url)
            return cls(offline_backend, store_id=known.store_id(url, storage_options), options=options, offline=True)
        backend = Backend.from_url(url, storage_options=storage_options)
        if backend.is_local:
            return cls(backend, store_id=_open_marker(backend, create=create), options=options)
        store_id = _open_marker(backend, create=create)
        known.remember(url, storage_options, store_id)
        return cls(backend, store_id=store_id, options=options)

    @property
    def url(self) -> str:
        """The store URL without credentials."""
        return self.backend.url

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- save -------------------------------------------------------------------------------------------------

    def save(
        self,
        model: torch.nn.Module | Mapping[str, torch.Tensor],
        *,
        name: str,
        model_type: str | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        history: Mapping[str, Any] | Sequence[Any] | None = None,
        tags: Iterable[str] = (),
        description: str = "",
        training: TrainingSummary | Mapping[str, Any] | None = None,
        parent: str | Digest | None = None,
        files: Mapping[str, bytes | os.PathLike[str]] | None = None,
        device: str | None = None,
    ) -> SavedModel:
        """Save a model as the next version of ``name``.

        Args:
            model: an ``nn.Module`` (its ``state_dict()`` is saved) or a state dict.
            name: the model name (letters, digits, ``._-``).
            model_type: the type used to rebuild it; default: the registered type of the module's class, else
                the class name, else ``""``.
            config: JSON-like constructor config, restored exactly on load.
            metrics: ``{name: number}``, searchable and usable by :meth:`best`.
            history: training history (e.g. ``{"loss": [...], "val_loss": [...]}``), stored as its own blob.
            tags: descriptive labels (searchable with ``list(tags=...)``).
            description: free text.
            training: duration, epochs, steps, convergence, final/best losses.
            parent: the model this one was fine-tuned from (a ref or digest).
            files: extra artifacts, ``{relative path: bytes or local file}``.
            device: the training device to record; default: the devices the tensors are on.

        Returns:
            the new version, with the bytes it wrote.

        Raises:
            FormatError: a bad name, a non-tensor in the state dict, config that cannot be stored (nothing is
                written then).
            NotFoundError: ``parent`` does not resolve.
            StorageError: the backend failed (only unreferenced blobs can be left behind).
        """
        check_name(name)
        _check_option("config", config, Mapping)
        _check_option("metrics", metrics, Mapping)
        _check_option("training", training, (Mapping, TrainingSummary))
        _check_option("files", files, Mapping)
        _check_option("history", history, (Mapping, list, tuple))
        tags = () if tags is None else tags
        if isinstance(model, torch.nn.Module):
            state_dict: Mapping[str, Any] = model.state_dict()
            if model_type is None:
                model_type = model_types.type_name_of(model) or type(model).__name__
        else:
            state_dict = model
        # Validate everything before the first byte is written, so a bad input leaves nothing behind.
        plan = plan_state_dict(state_dict, pack_threshold=self.options.pack_threshold)
        config_data = canonical.normalize(dict(config or {}), where="config")
        metric_data = _check_metrics(metrics or {})
        history_bytes = None if history is None else canonical.encode(history, where="history")
        if history_bytes is not None and len(history_bytes) > _HISTORY_LIMIT:
            raise FormatError(f"history is {len(history_bytes)} bytes encoded; the limit is {_HISTORY_LIMIT}")
        summary = training if isinstance(training, TrainingSummary) else TrainingSummary.from_mapping(training or {})
        file_data = _read_files(files or {})
        parent_digest = None if parent is None else self._parent_digest(parent)
        labels = check_labels(tags)
        check_model_type(model_type or "")
        environment = capture_environment(devices=[device] if device else list(plan.devices))

        tally = _WriteTally()
        hashed = self._write_tensor_blobs(plan.blobs, tally)
        tensors = plan.entries(hashed)
        history_ref = None
        if history_bytes is not None:
            history_ref = self._put_counted(history_bytes, tally)
        file_entries = []
        for path, data in file_data.items():
            blob = self._put_counted(data, tally)
            file_entries.append(FileEntry(path, blob.digest, blob.size, guess_media_type(path)))
        manifest = Manifest(
            name=name,
            model_type=model_type or "",
            created_at=now(),
            description=str(description),
            labels=labels,
            config=config_data if isinstance(config_data, dict) else {},
            metrics=metric_data,
            training=summary,
            environment=environment,
            parent=parent_digest,
            tensors=tensors,
            # Two separate tensors with equal bytes share one blob: list each blob once.
            tensor_blobs=tuple(dict.fromkeys(hashed[i][0] for i in range(len(plan.blobs)))),
            files=tuple(file_entries),
            history=None if history_ref is None else history_ref.digest,
            history_size=0 if history_ref is None else history_ref.size,
        )
        manifest_bytes = manifest.to_bytes()
        manifest_ref = self._put_counted(manifest_bytes, tally)
        self._manifests[manifest_ref.digest] = manifest
        # The blobs' data was fsynced as each was written; now make their names durable, once per folder. Folders
        # of blobs this save found already present are included: a concurrent save may not have synced them yet.
        self.backend.sync_folders(blob_key(d.digest) for d in (*manifest.references(), manifest_ref))

        def rewrite(missing: frozenset[Digest]) -> None:
            # A gc run may have deleted blobs this save found present (DESIGN.md section 8): write them again.
            for index, (descriptor, _) in hashed.items():
                if descriptor.digest in missing:
                    self.blobs.put(descriptor, plan.blobs[index].materialize().chunks, mutable=True)
            for data in (history_bytes, *file_data.values(), manifest_bytes):
                if data is not None and Digest.of(data) in missing:
                    self.blobs.put_bytes(data)

        version = self._publish(
            name, manifest_ref.digest, confirm=lambda: self._confirm(manifest, manifest_ref), rewrite=rewrite
        )
        if isinstance(self.blobs, CachedBlobStore):
            self.cache.maybe_prune()  # a remote save wrote its blobs through the pool
        references = manifest.references()
        return SavedModel(
            name=name,
            version=version,
            digest=manifest_ref.digest,
            bytes_total=sum(d.size for d in references) + manifest_ref.size,
            bytes_written=sum(d.size for d in tally.created),
            blobs_total=len(references) + 1,
            blobs_written=len(tally.created),
        )

    def _write_tensor_blobs(
        self, pending: Sequence[PendingBlob], tally: _WriteTally
    ) -> dict[int, tuple[Descriptor, Mapping[str, Digest]]]:
        """Hash and write every tensor blob.

        Hashing is CPU work and writing is mostly waiting for the disk (each blob is fsynced), so they run on two
        pools: hashers on every core, writers on a few more threads, with at most ``2 x writers`` hashed blobs
        waiting, which bounds the memory held by tensors that had to be copied (non-contiguous or on a GPU).
        Measured in benchmarks/experiment_write_pools.py: one pool doing both left the cores idle during fsyncs.
        """
        hashers = os.cpu_count() or 2
        writers = _WRITE_THREADS
        backlog = threading.BoundedSemaphore(2 * writers)

        def write(materialized: MaterializedBlob, descriptor: Descriptor) -> bool:
            try:
                return self.blobs.put(descriptor, materialized.chunks, sync_folder=False, mutable=True)
            finally:
                backlog.release()

        def hash_then_queue(index: int) -> tuple[int, Descriptor, Mapping[str, Digest], Future[bool]]:
            backlog.acquire()
            try:
                materialized = pending[index].materialize()
                descriptor, members = materialized.hash()
            except BaseException:
                backlog.release()
                raise
            return index, descriptor, members, write_pool.submit(write, materialized, descriptor)

        results: dict[int, tuple[Descriptor, Mapping[str, Digest]]] = {}
        with (
            ThreadPoolExecutor(max_workers=writers, thread_name_prefix="fracstore-write") as write_pool,
            ThreadPoolExecutor(max_workers=hashers, thread_name_prefix="fracstore-hash") as hash_pool,
        ):
            # Biggest first, so one huge tensor does not start last and serialise the tail.
            order = sorted(range(len(pending)), key=lambda i: -pending[i].size)
            queued = [hash_pool.submit(hash_then_queue, i) for i in order]
            for future in queued:
                index, descriptor, members, written = future.result()
                results[index] = (descriptor, members)
                tally.add(descriptor, created=written.result())
        return results

    def _put_counted(self, data: bytes, tally: _WriteTally) -> Descriptor:
        descriptor, created = self.blobs.put_bytes(data, sync_folder=False)
        tally.add(descriptor, created=created)
        return descriptor

    def _confirm(self, manifest: Manifest, manifest_ref: Descriptor) -> None:
        # DESIGN.md section 5: a log entry must never point at missing data, even if a blob we skipped because it
        # existed was removed meanwhile (a concurrent gc, a damaged store).
        wanted = (*manifest.references(), manifest_ref)
        if self.backend.is_local or len(wanted) < 2:
            present = [self.blobs.has(d) for d in wanted]
        else:  # one round trip each on an object store: ask in parallel
            with ThreadPoolExecutor(max_workers=min(32, len(wanted)), thread_name_prefix="fracstore-confirm") as pool:
                present = list(pool.map(self.blobs.has, wanted))
        missing = [d for d, here in zip(wanted, present, strict=True) if not here]
        if missing:
            raise StorageError(
                f"{len(missing)} blob(s) of the new manifest are missing from {self.url} after writing "
                f"(first: {missing[0].digest}); nothing was published. Run the save (or push, pull, import) again.",
                store=self.url,
            )

    def publish_manifest(self, name: str, digest: Digest) -> ModelRecord:
        """Publish a manifest whose blobs are already in this store as the next version of ``name`` (push, pull and
        bundle import end here). Idempotent: when a live version of ``name`` has this manifest, that version is
        returned and nothing is appended.

        The manifest is read and verified, and every blob it references is confirmed present with its size before
        the log entry is written (DESIGN.md section 5).

        Raises:
            FormatError: a bad name, or the blob is not a manifest.
            NotFoundError, IntegrityError: the manifest is missing or corrupt.
            StorageError: a referenced blob is missing (nothing is published).
        """
        check_name(name)
        manifest = self.manifest(digest)
        version = self._publish(
            name, digest, confirm=lambda: self._confirm(manifest, Descriptor(digest, self.blobs.size_of(digest)))
        )
        return self.resolve(f"{name}@{version}")

    def _publish(
        self,
        name: str,
        manifest: Digest,
        *,
        confirm: Callable[[], None],
        rewrite: Callable[[frozenset[Digest]], None] | None = None,
    ) -> int:
        # confirm runs inside gc.guarded_publish, after it notes the registry seq: the gc protocol needs to know
        # which runs could have deleted a blob after the confirm (docs/format.md section 13.4).
        existing: list[int] = []

        def decide(state: RegistryState) -> Change | None:
            named = state.names.get(name)
            existing[:] = [v.version for v in named.live() if v.manifest == manifest] if named is not None else []
            if existing:
                return None  # already published (a retried save, or a push of a version the store has)
            return Change("publish", name=name, manifest=manifest)

        entry, state = guarded_publish(self, decide, manifest=manifest, confirm=confirm, rewrite=rewrite)
        if entry is None:
            return existing[-1]
        # The version is the one this entry created, whatever other writers did after it (even a delete).
        (version,) = [v.version for v in state.names[name].versions if v.seq == entry.seq]
        return version

    def _parent_digest(self, parent: str | Digest) -> Digest:
        if not isinstance(parent, Digest):
            _, version = self._resolve(Ref.parse(parent), self.registry.refresh())
            return version.manifest
        # A parent given by digest may be a deleted version, but it must be a manifest this store has (or had).
        try:
            self.manifest(parent)
        except NotFoundError:
            raise NotFoundError(f"parent {parent} is not in {self.url}", what=str(parent), store=self.url) from None
        except FormatError:
            raise FormatError(f"parent {parent} in {self.url} is a blob but not a manifest") from None
        return parent

    # -- resolve ----------------------------------------------------------------------------------------------

    def _resolve(self, ref: Ref, state: RegistryState) -> tuple[str, VersionState]:
        if ref.digest_prefix is not None:
            return self._resolve_digest(ref.text, ref.digest_prefix, state)
        name = ref.name or ""  # Ref.parse gives every non-digest ref a name
        named = state.names.get(name)
        if named is None or not named.versions:
            if ref.bare_digest_prefix is not None:
                return self._resolve_digest(ref.text, ref.bare_digest_prefix, state)
            raise self._unknown_name(name, ref.text, state)
        live = named.live()
        if ref.version is None and not live:
            raise NotFoundError(
                f"every version of {ref.name!r} in {self.url} was deleted", what=ref.text, store=self.url
            )
        if ref.version is not None:
            version = named.get(ref.version)
            if version is None or version.deleted:
                state_word = "was deleted" if version is not None else "does not exist"
                raise NotFoundError(
                    f"{ref.name}@{ref.version} {state_word} in {self.url}; live versions: "
                    f"{', '.join(str(v.version) for v in live) or 'none'}",
                    what=ref.text,
                    store=self.url,
                )
            return name, version
        if ref.tag is not None:
            target = named.tags.get(ref.tag)
            if target is None:
                known = ", ".join(sorted(named.tags)) or "none"
                raise NotFoundError(
                    f"{ref.name} has no tag {ref.tag!r} in {self.url} (tags: {known})", what=ref.text, store=self.url
                )
            version = named.get(target)
            if version is None or version.deleted:  # replay never leaves such a tag; a forged checkpoint could
                raise IntegrityError(
                    f"tag {ref.text} points at version {target}, which is not live: the replayed registry state is "
                    "damaged. Delete the local cache folder's stores/ entry and retry",
                    store=self.url,
                )
            return name, version
        return name, live[-1]

    def _resolve_digest(self, text: str, prefix: str, state: RegistryState) -> tuple[str, VersionState]:
        matches = [
            (name, v) for name, named in state.names.items() for v in named.live() if v.manifest.hex.startswith(prefix)
        ]
        if not matches:
            raise NotFoundError(
                f"no live model in {self.url} has a digest starting {prefix}", what=text, store=self.url
            )
        if len({v.manifest for _, v in matches}) > 1:
            raise AmbiguousRefError(text, [f"{n}@{v.version} ({v.manifest})" for n, v in matches])
        return max(matches, key=lambda m: m[1].seq)

    def _unknown_name(self, name: str, ref: str, state: RegistryState) -> NotFoundError:
        live = [n for n, s in state.names.items() if s.live()]
        close = difflib.get_close_matches(name, live, n=3)
        if close:
            hint = f"; did you mean {', '.join(close)}?"
        else:
            hint = f"; {len(live)} model name(s) exist (see `fracstore ls` or Store.list())"
        return NotFoundError(f"no model named {name!r} in {self.url}{hint}", what=ref, store=self.url)

    def resolve(self, ref: str) -> ModelRecord:
        """The live version ``ref`` names.

        Raises:
            FormatError: ``ref`` is not a valid ref.
            NotFoundError: nothing matches.
            AmbiguousRefError: a digest prefix matches several models (the error lists them).
        """
        state = self.registry.refresh()
        name, version = self._resolve(Ref.parse(ref), state)
        return self._record(name, version, state)

    def manifest(self, digest: Digest | str) -> Manifest:
        """The verified manifest with that digest (immutable, so remembered for the life of this object).

        Raises:
            NotFoundError, IntegrityError, FormatError: missing, corrupt or undecodable.
        """
        digest = Digest.parse(digest) if isinstance(digest, str) else digest
        cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        manifest = Manifest.from_bytes(self.blobs.get_unsized(digest, max_bytes=MAX_MANIFEST_BYTES))
        self._manifests[digest] = manifest
        return manifest

    def _record(self, name: str, version: VersionState, state: RegistryState) -> ModelRecord:
        manifest = self.manifest(version.manifest)
        tags = tuple(sorted(t for t, v in state.names[name].tags.items() if v == version.version))
        return ModelRecord(
            name=name,
            version=version.version,
            digest=version.manifest,
            seq=version.seq,
            published_at=version.time,
            model_type=manifest.model_type,
            created_at=manifest.created_at,
            description=manifest.description,
            labels=manifest.labels,
            tags=tags,
            metrics=dict(manifest.metrics),  # copies: the cached manifest must not change under other callers
            training=manifest.training,
            parent=manifest.parent,
            size=sum(t.size for t in manifest.tensors if t.alias is None),
            tensor_count=len(manifest.tensors),
            config=copy.deepcopy(manifest.config),
        )

    # -- load -------------------------------------------------------------------------------------------------

    def load(
        self,
        ref: str,
        *,
        device: str | torch.device | None = None,
        into: torch.nn.Module | None = None,
        strict: bool = True,
    ) -> Any:
        """Load a version's weights.

        From a local store the tensors are memory-mapped from the blob files (zero-copy, copy-on-write), after a
        stat check against the verified-state record (a changed file is re-hashed).

        Args:
            ref: ``name``, ``name@3``, ``name:tag``, or a digest (prefix).
            device: move the tensors there (``"cuda"``, ``"cuda:1"``, ``"mps"``); None keeps them on the CPU.
            into: a module to fill; it is moved to ``device`` when one is given, and returned.
            strict: with ``into``, require exactly the module's keys and shapes; with False, load the tensors whose
                name and shape match and leave the rest of the module as it is.

        Returns:
            the state dict (tied tensors are the same object again), or ``into`` filled.

        Raises:
            NotFoundError, AmbiguousRefError, FormatError: the ref does not name one live version.
            IntegrityError: a blob is corrupt.
            FormatError: with ``strict``, the weights do not fit the module (the message lists the keys).
        """
        return self._load(self.resolve(ref), device=_check_device(device), into=into, strict=strict)

    def _load(
        self, record: ModelRecord, *, device: str | torch.device | None, into: torch.nn.Module | None, strict: bool
    ) -> Any:
        manifest = self.manifest(record.digest)
        sources = self._fetch_verified(manifest.tensor_blobs)

        def source(descriptor: Descriptor) -> Path | bytes:
            found = sources[descriptor.digest]
            return found.path if isinstance(found, VerifiedFile) else found

        state_dict = decode_state_dict(
            manifest.tensors, manifest.tensor_blob_sizes(), source, device=device if into is None else None
        )
        # The files were verified before safetensors mapped them by name; one replaced in between was mapped
        # unverified, so check that each still is the file that was verified.
        for digest, found in sources.items():
            if isinstance(found, VerifiedFile) and not self.blobs.unchanged(found):
                raise IntegrityError(
                    f"blob {digest} in {self.url} was replaced while it was being loaded; load again",
                    key=blob_key(digest),
                    store=self.url,
                )
        if isinstance(self.blobs, CachedBlobStore):
            # Only now: the tensors are mapped (an unlinked file stays mapped), so pruning cannot take this load's
            # own blobs from under it, however long fetching them took.
            self.cache.maybe_prune()
        if into is None:
            return state_dict
        if strict:
            _check_fits(into, state_dict, record.ref)
        else:
            # torch refuses shape mismatches even with strict=False; "load what matches" means leaving them out.
            expected = into.state_dict()
            state_dict = {
                k: v for k, v in state_dict.items() if k not in expected or tuple(expected[k].shape) == tuple(v.shape)
            }
        if device is not None:
            into.to(device)
        into.load_state_dict(state_dict, strict=strict)
        return into

    def load_model(self, ref: str, *, device: str | torch.device | None = None, strict: bool = True) -> torch.nn.Module:
        """Build a module of the version's registered model type from its config, then load its weights.

        Raises:
            NotFoundError: the model type is not registered (see :func:`fracstore.register_model_type`).
            as :meth:`load`.
        """
        record = self.resolve(ref)
        module = model_types.build(record.model_type, record.config)
        if not isinstance(module, torch.nn.Module):
            raise FormatError(f"model type {record.model_type!r} built a {type(module).__name__}, not an nn.Module")
        return self._load(record, device=_check_device(device), into=module, strict=strict)  # type: ignore[no-any-return]

    def _fetch_verified(self, descriptors: Sequence[Descriptor]) -> dict[Digest, VerifiedFile | bytes]:
        """Every blob verified, on all cores: a local file (stat-checked, re-hashed when its record is stale) or
        the bytes of a remote blob. Hashing releases the GIL, so a first load re-hashes at the speed of all cores."""

        def fetch(descriptor: Descriptor) -> tuple[Digest, VerifiedFile | bytes]:
            verified = self.blobs.verified_file(descriptor)
            return descriptor.digest, verified if verified is not None else self.blobs.get(descriptor)

        # Fast path first: files whose stat matches their record need no hashing, no request, and no threads.
        found: dict[Digest, VerifiedFile | bytes] = {}
        for descriptor in descriptors:
            if isinstance(self.blobs, CachedBlobStore):
                verified = self.blobs.cached_file(descriptor)
            else:
                verified = self.blobs.verified_file(descriptor, hash_if_stale=False)
            if verified is not None:
                found[descriptor.digest] = verified
        rest = [d for d in descriptors if d.digest not in found]
        if len(rest) <= 1:
            found.update(map(fetch, rest))
            return found
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="fracstore-verify") as pool:
            found.update(pool.map(fetch, rest))
        return found

    def history(self, ref: str) -> Any:
        """The training history saved with a version, or None.

        Raises:
            as :meth:`resolve`; IntegrityError for a corrupt history blob.
        """
        manifest = self.manifest(self.resolve(ref).digest)
        if manifest.history is None:
            return None
        data = self.blobs.get(Descriptor(manifest.history, manifest.history_size))
        return canonical.decode(data, what="history", max_bytes=_HISTORY_LIMIT)

    def read_file(self, ref: str, path: str) -> bytes:
        """The bytes of an artifact file saved with a version.

        Raises:
            NotFoundError: no such file (the message lists the files).
        """
        manifest = self.manifest(self.resolve(ref).digest)
        for entry in manifest.files:
            if entry.path == path:
                return self.blobs.get(Descriptor(entry.blob, entry.size))
        listing = ", ".join(f.path for f in manifest.files) or "none"
        raise NotFoundError(f"{ref} has no file {path!r} (files: {listing})", what=path, store=self.url)

    def info(self, ref: str) -> ModelInfo:
        """A version's record and full manifest."""
        record = self.resolve(ref)
        return ModelInfo(record, copy.deepcopy(self.manifest(record.digest)))

    # -- find -------------------------------------------------------------------------------------------------

    def list(
        self,
        name: str | None = None,
        *,
        model_type: str | None = None,
        tags: Iterable[str] = (),
        where: Iterable[str | MetricFilter] = (),
        latest_only: bool = False,
    ) -> RecordTable:
        """Live versions matching every given condition, oldest publish first. On a store opened offline: the live
        versions whose manifest this machine has read before (the others cannot be loaded offline either).

        Args:
            name: exact model name.
            model_type: exact model type.
            tags: each must be a label saved with the version or a registry tag pointing at it.
            where: metric thresholds such as ``"val_loss<0.1"``.
            latest_only: only the newest live version of each name.

        Raises:
            FormatError: a malformed filter.
        """
        query = Query(
            name=name,
            model_type=model_type,
            tags=check_labels(() if tags is None else tags),
            where=_check_filters(where),
        )
        state = self.registry.refresh()
        records = []
        for model_name, named in state.names.items():
            if query.name is not None and model_name != query.name:
                continue
            live = named.live()
            for version in live[-1:] if latest_only else live:
                try:
                    record = self._record(model_name, version, state)
                except OfflineError:
                    continue  # offline, a version whose manifest this machine never read cannot be shown or used
                if query.matches(record):
                    records.append(record)
        records.sort(key=lambda r: r.seq)
        return RecordTable(records)

    def best(
        self,
        metric: str,
        *,
        mode: str | None = None,
        name: str | None = None,
        model_type: str | None = None,
        tags: Iterable[str] = (),
        where: Iterable[str | MetricFilter] = (),
    ) -> ModelRecord | None:
        """The live version with the best ``metric`` among those matching the filters; None when none has it.

        ``mode`` is ``"min"`` or ``"max"``; by default losses, errors and durations are minimised and anything else
        maximised. Ties go to the newest version.
        """
        return best(self.list(name, model_type=model_type, tags=tags, where=where), metric, mode=mode)

    def log(self, name: str | None = None) -> builtins.list[Entry]:
        """Registry entries, oldest first, optionally only those about ``name``."""
        entries = self.registry.entries()
        return entries if name is None else [e for e in entries if e.name == name]

    def diff(self, a: str, b: str) -> ModelDiff:
        """Compare the weights and metrics of two versions."""
        ra, rb = self.resolve(a), self.resolve(b)
        ma, mb = self.manifest(ra.digest), self.manifest(rb.digest)
        ta = {t.name: (t.digest, t.dtype, t.shape) for t in ma.tensors}
        tb = {t.name: (t.digest, t.dtype, t.shape) for t in mb.tensors}
        blobs_a = {d.digest for d in ma.references()}
        shared = sum(d.size for d in mb.references() if d.digest in blobs_a)
        new = sum(d.size for d in mb.references() if d.digest not in blobs_a)
        metrics = {m: (ra.metric(m), rb.metric(m)) for m in sorted(set(ma.metrics) | set(mb.metrics))}
        return ModelDiff(
            a=ra.ref,
            b=rb.ref,
            changed=tuple(n for n in tb if n in ta and ta[n] != tb[n]),
            added=tuple(n for n in tb if n not in ta),
            removed=tuple(n for n in ta if n not in tb),
            unchanged=tuple(n for n in tb if n in ta and ta[n] == tb[n]),
            bytes_shared=shared,
            bytes_new=new,
            metrics=metrics,
        )

    # -- change the registry ----------------------------------------------------------------------------------

    def tag(self, ref: str, tag: str, *, expected: int | None = _UNSET) -> ModelRecord:
        """Point ``tag`` of the ref's name at the ref's version (creating or moving it).

        Args:
            ref: the version to tag; resolved at the registry tip, so ``name`` means the newest version then.
            tag: the tag name (letters, digits, ``._-``).
            expected: compare-and-set: the version the tag must point at now, or None for "must not exist".
                Leave it out to move the tag unconditionally.

        Returns:
            the tagged version.

        Raises:
            ConflictError: ``expected`` does not match the tag's current target.
        """
        check_name(tag, what="tag")
        parsed = Ref.parse(ref)
        chosen: list[Any] = []

        def decide(state: RegistryState) -> Change | None:
            name, version = self._resolve(parsed, state)
            chosen[:] = [name, version]
            current = state.names[name].tags.get(tag)
            if expected is not _UNSET and current != expected:
                raise ConflictError(
                    f"tag {name}:{tag} points at {current if current is not None else 'nothing'}, not {expected}; "
                    "re-read it and try again"
                )
            if current == version.version:
                return None
            return Change("tag", name=name, tag=tag, version=version.version)

        _, state = self.registry.append(decide)
        # What this call tagged, as decided at the tip it extended (later writers may have moved the tag since).
        name, version = chosen
        return self._record(name, version, state)

    def untag(self, name: str, tag: str) -> None:
        """Remove ``tag`` from ``name``.

        Raises:
            NotFoundError: the name has no such tag.
        """
        check_name(name)
        check_name(tag, what="tag")

        def decide(state: RegistryState) -> Change | None:
            named = state.names.get(name)
            if named is None or tag not in named.tags:
                raise NotFoundError(f"{name} has no tag {tag!r} in {self.url}", what=f"{name}:{tag}", store=self.url)
            return Change("untag", name=name, tag=tag)

        self.registry.append(decide)

    def delete(self, ref: str, *, all_versions: bool = False) -> builtins.list[str]:
        """Delete the version ``ref`` names, or with ``all_versions`` every version of its name.

        A delete is a tombstone in the registry: the version disappears from list, load and best at once; its
        blobs stay until garbage collection reclaims those no live version references.

        Returns:
            the refs deleted (``name@version``).
        """
        parsed = Ref.parse(ref)
        deleted: list[str] = []

        def decide(state: RegistryState) -> Change | None:
            name, version = self._resolve(parsed, state)
            deleted.clear()
            if all_versions:
                deleted.extend(f"{name}@{v.version}" for v in state.names[name].live())
                return Change("delete", name=name)
            deleted.append(f"{name}@{version.version}")
            return Change("delete", name=name, version=version.version)

        self.registry.append(decide)
        return list(deleted)

    # -- moving models ----------------------------------------------------------------------------------------

    def push(
        self,
        destination: Store,
        ref: str,
        *,
        all_versions: bool = False,
        tags: bool = False,
        progress: bool = False,
    ) -> TransferSummary:
        """Copy the version ``ref`` names (or every live version of its model) from this store to ``destination``;
        only blobs the destination lacks are sent. See :func:`fracstore.transfer.copy`.

        Args:
            tags: also carry the tags pointing at those versions.
            progress: draw a progress bar in bytes on stderr (when it is a terminal).

        Raises:
            as :func:`fracstore.transfer.copy`.
        """
        return transfer.copy(self, destination, ref, all_versions=all_versions, tags=tags, progress=progress)

    def pull(
        self,
        source: Store,
        ref: str,
        *,
        all_versions: bool = False,
        tags: bool = False,
        progress: bool = False,
    ) -> TransferSummary:
        """Copy the version ``ref`` names in ``source`` (or every live version of its model) into this store; only
        blobs this store lacks are fetched. See :func:`fracstore.transfer.copy`."""
        return transfer.copy(source, self, ref, all_versions=all_versions, tags=tags, progress=progress)

    # -- health -----------------------------------------------------------------------------------------------

    def verify(self, *, read_data: bool = False) -> verify.VerifyReport:
        """Check the registry log, every live version's manifest and every blob they reference; problems are
        reported, not raised. See :func:`fracstore.verify.verify_store`.

        Args:
            read_data: re-hash every referenced blob from the store's own copy (reads, or downloads, all data).
        """
        return verify.verify_store(self, read_data=read_data)

    def gc(
        self,
        *,
        grace: timedelta = DEFAULT_GRACE,
        dry_run: bool = False,
        now: Callable[[], datetime] | None = None,
    ) -> GcReport:
        """Delete blobs no live version references that are older than ``grace``; see :func:`fracstore.gc.collect`.

        Args:
            grace: minimum age of a deleted blob (protects blobs a publish is about to reference).
            dry_run: list exactly what a real run would delete, with sizes, and write nothing.
            now: the clock (tests pass a fake one).

        Raises:
            as :func:`fracstore.gc.collect` (an unreadable log or manifest stops gc before it deletes anything).
        """
        return collect(self, grace=grace, dry_run=dry_run, now=now)

    def apply_retention(
        self, policy: RetentionPolicy, *, dry_run: bool = False, now: Callable[[], datetime] | None = None
    ) -> RetentionReport:
        """Delete the live versions ``policy`` does not keep (tombstones; :meth:`gc` then reclaims their blobs).
        See :func:`fracstore.gc.apply_retention`.

        Raises:
            as :func:`fracstore.gc.apply_retention`.
        """
        return apply_retention(self, policy, dry_run=dry_run, now=now)

    def export_bundle(
        self, refs: Sequence[str], path: str | os.PathLike[str], *, all_versions: bool = False
    ) -> bundle.BundleSummary:
        """Write the versions ``refs`` name (or all their live versions) into one verified bundle file at ``path``.
        See :func:`fracstore.bundle.export_bundle`."""
        return bundle.export_bundle(self, refs, path, all_versions=all_versions)

    def import_bundle(self, path: str | os.PathLike[str], *, tags: bool = True) -> bundle.ImportSummary:
        """Verify every member of the bundle at ``path``, then publish its models here. See
        :func:`fracstore.bundle.import_bundle`."""
        return bundle.import_bundle(self, path, tags=tags)


def _check_option(option: str, value: object, expected: type | tuple[type, ...]) -> None:
    if value is not None and not isinstance(value, expected):
        kinds = expected if isinstance(expected, tuple) else (expected,)
        names = " or ".join("a mapping" if k is Mapping else k.__name__ for k in kinds)
        raise FormatError(f"{option}= takes {names}, not {type(value).__name__} ({value!r:.60})")


def _check_filters(where: Iterable[str | MetricFilter]) -> tuple[MetricFilter, ...]:
    if isinstance(where, str):
        raise FormatError(f"where= takes a list of filters, e.g. where=[{where!r}], not a single string")
    return tuple(w if isinstance(w, MetricFilter) else MetricFilter.parse(w) for w in where)


def _check_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        parsed = torch.device(device)
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot load onto device {device!r}: {exc}") from exc
    return parsed


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise FormatError(f"metric names must be non-empty strings, not {key!r}")
        plain = canonical.normalize(value, where=f"metric {key!r}")  # numpy / torch scalars become numbers
        if isinstance(plain, bool) or not isinstance(plain, int | float):
            raise FormatError(f"metric {key!r} must be a number, not {value!r}")
        out[key] = float(plain)
    return out


def _read_files(files: Mapping[str, bytes | os.PathLike[str]]) -> dict[str, bytes]:
    out = {}
    for path, source in files.items():
        check_file_path(path)
        if isinstance(source, bytes | bytearray | memoryview):
            out[path] = bytes(source)
        elif isinstance(source, os.PathLike | str):
            try:
                out[path] = Path(source).read_bytes()
            except OSError as exc:
                raise NotFoundError(f"cannot read file {source!s} for {path!r}: {exc}", what=str(source)) from exc
        else:
            raise FormatError(f"file {path!r} must be bytes or a local path, not {type(source).__name__}")
    return out


def _check_fits(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], ref: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: saved {tuple(state_dict[k].shape)}, module {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing from {ref}: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"not in the module: {', '.join(unexpected[:10])}")
        if mismatched:
            parts.append(f"shape mismatch: {'; '.join(mismatched[:10])}")
        raise FormatError(
            f"the weights of {ref} do not fit {type(module).__name__} ({'; '.join(parts)}); pass strict=False to "
            "load what matches"
        )


class _KnownStores:
    """Which store id each remote URL had when this machine last opened it online (for offline opens). A URL is
    known together with its endpoint: ``s3://models`` on MinIO and on AWS are different stores."""

    def __init__(self, cache_dir: Path) -> None:
        self._folder = cache_dir / "remotes"

    def _where(self, url: str, storage_options: Mapping[str, Any] | None) -> str:
        endpoint = (storage_options or {}).get("endpoint_url")
        where = redact_url(url).rstrip("/")
        return where if not endpoint else f"{where} at {redact_url(str(endpoint)).rstrip('/')}"

    def _path(self, where: str) -> Path:
        return self._folder / f"{Digest.of(where.encode()).hex}.msgpack"

    def remember(self, url: str, storage_options: Mapping[str, Any] | None, store_id: str) -> None:
        where = self._where(url, storage_options)
        record = canonical.encode({"url": where, "store_id": store_id})
        if read_cached(self._path(where)) != record:
            with contextlib.suppress(OSError):  # only offline opens need it
                write_cached(self._path(where), record)

    def store_id(self, url: str, storage_options: Mapping[str, Any] | None) -> str:
        data = read_cached(self._path(self._where(url, storage_options)))
        try:
            raw = canonical.decode(data, what="remembered store", max_bytes=4096) if data is not None else None
            if isinstance(raw, dict):
                return str(uuid.UUID(str(raw["store_id"])))
        except (FormatError, KeyError, ValueError):
            pass  # unreadable: as good as never remembered
        raise OfflineError(
            f"{redact_url(url)} was never opened online on this machine, so nothing of it is cached: open it online "
            "first (offline=False)",
            store=redact_url(url),
        )


def _open_marker(backend: Backend, *, create: bool) -> str:
    """Read (or create) the store marker and return the store id."""
    try:
        data = backend.read(MARKER_KEY)
    except NotFoundError:
        if not create:
            raise NotFoundError(
                f"there is no fracstore store at {backend.url} (check the URL); create one with `fracstore init` or "
                "Store.open(url, create=True)",
                what=backend.url,
                store=backend.url,
            ) from None
        marker = {"format": STORE_FORMAT, "store_id": str(uuid.uuid4()), "created_at": now()}
        backend.put_if_absent(MARKER_KEY, canonical.encode(marker))
        data = backend.read(MARKER_KEY)  # whoever created it first wins; everyone uses that id
    try:
        raw = canonical.decode(data, what=f"store marker of {backend.url}", max_bytes=4096)
        version = raw.get("format") if isinstance(raw, dict) else None
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise FormatError(f"{backend.url}/{MARKER_KEY} is not a fracstore store marker (no format version)")
        if version > STORE_FORMAT:
            raise FormatError(f"{backend.url} is a store of a newer format than this fracstore reads; upgrade")
        store_id = str(uuid.UUID(str(raw["store_id"])))
    except FormatError:
        raise
    except (KeyError, ValueError) as exc:
        raise FormatError(f"{backend.url}/{MARKER_KEY} is not a fracstore store marker: {exc}") from exc
    return store_id
