"""Bundles: one portable, verified file that carries models to another store (DESIGN.md section 7).

A *bundle* is an uncompressed (stored) zip file holding

* the *index* member ``index.msgpack`` (canonical msgpack): the bundle format version, the *models* (name, version,
  the registry tags pointing at that version, manifest digest, and their *provenance*: the stored bytes of the
  publish entry and of the tag entries that set those tags), and the descriptor of every blob member;
* one *blob member* per blob the models reference (tensor, packed, file and history blobs and the manifests), each
  stored once and named by the 64 hex digits of its digest, nothing else.

Export is deterministic: the bytes are a function of the chosen versions' registry facts (name, version, tags,
manifest digest, the provenance entries) and the blob bytes; no clock, path, store URL or store id goes in. Import
never uses a member name as a path: names are compared with the digests the index lists, and blobs are written under
keys built from parsed digests. Every member is checked against the index (size first, then SHA-256, while
streaming), and nothing is published until every member has been verified and stored; blobs stored before that are
unreferenced, so invisible (DESIGN.md section 5). The normative format is in docs/format.md, "Bundles".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import canonical
from .backend import file_chunks, fsync_folder
from .config import MAX_ENTRY_BYTES, MAX_MANIFEST_BYTES
from .digest import Descriptor, Digest
from .errors import ConflictError, FormatError, FracstoreError, IntegrityError, NotFoundError, StorageError
from .layout import blob_key, log_key
from .manifest import Manifest, check_name
from .query import ModelRecord
from .registry_state import Entry, RegistryState, VersionState

if TYPE_CHECKING:
    from .store import Store

BUNDLE_FORMAT = 1
INDEX_MEMBER = "index.msgpack"
MAX_INDEX_BYTES = 16 << 20  # a few hundred bytes per model and ~80 per blob: far below this for any real bundle
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the zip epoch: no clock in the file, so equal models give equal bytes
ZIP_MEMBER_MODE = 0o100444  # a read-only regular file, as blobs are in a store
ZIP_CREATE_SYSTEM = 3  # "Unix", fixed so the bytes do not depend on the exporting platform
_CHUNK = 8 << 20
_HEX_LEN = 64

Buffer = bytes | bytearray | memoryview


def member_name(digest: Digest) -> str:
    """The zip member name of a blob: the 64 lowercase hex digits of its digest."""
    return digest.hex


# -- value types --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BundleModel:
    """One model version carried by a bundle.

    Attributes:
        name: the model name.
        version: its version number in the exporting store (the importing store numbers its own versions).
        digest: the manifest digest, the model's identity.
        tags: the registry tags that pointed at this version when it was exported, sorted.
        log: provenance: the exporting store's publish entry of this version and the tag entry that set each of
            ``tags``, as their stored bytes, in log order. Informational: an import appends its own entries.
    """

    name: str
    version: int
    digest: Digest
    tags: tuple[str, ...]
    log: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_name(self.name)
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise FormatError(f"bundle model {self.name!r}: version must be an int >= 1, not {self.version!r}")
        if not isinstance(self.digest, Digest):
            raise FormatError(f"bundle model {self.name!r}: digest must be a Digest, not {type(self.digest).__name__}")
        if not isinstance(self.tags, tuple) or not isinstance(self.log, tuple):
            raise FormatError(f"bundle model {self.ref}: tags and log must be tuples")
        for tag in self.tags:
            check_name(tag, what="tag")
        if len(set(self.tags)) != len(self.tags):
            raise FormatError(f"bundle model {self.ref} lists a tag twice: {self.tags!r}")
        self._check_provenance()

    @property
    def ref(self) -> str:
        """``name@version`` (a ref into the exporting store)."""
        return f"{self.name}@{self.version}"

    def entries(self) -> tuple[Entry, ...]:
        """The provenance entries, decoded.

        Raises:
            FormatError: an entry does not decode.
        """
        out = []
        for data in self.log:
            if not isinstance(data, bytes):
                raise FormatError(f"bundle model {self.ref}: log entries must be bytes, not {type(data).__name__}")
            raw = canonical.decode(data, what=f"log entry of bundle model {self.ref}", max_bytes=MAX_ENTRY_BYTES)
            seq = raw.get("seq") if isinstance(raw, dict) else None
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise FormatError(f"bundle model {self.ref}: a log entry has no seq")
            out.append(Entry.from_bytes(data, seq=seq))
        return tuple(out)

    def _check_provenance(self) -> None:
        # The entries must say what the model says: one publish of this manifest under this name, then one tag
        # entry for each tag, targeting this version. A bundle whose provenance contradicts it is malformed.
        entries = self.entries()
        seqs = [e.seq for e in entries]
        if seqs != sorted(set(seqs)):
            raise FormatError(f"bundle model {self.ref}: its log entries are not in log order")
        publishes = [e for e in entries if e.op == "publish"]
        if len(publishes) != 1 or publishes[0].name != self.name or publishes[0].manifest != self.digest:
            raise FormatError(f"bundle model {self.ref}: its log does not hold exactly one publish of {self.digest}")
        if publishes[0] is not entries[0]:
            raise FormatError(f"bundle model {self.ref}: its publish entry must come first")
        tagged = []
        for entry in entries[1:]:
            if entry.op != "tag" or entry.name != self.name or entry.version != self.version:
                raise FormatError(
                    f"bundle model {self.ref}: log entry {entry.seq} is a {entry.op} of {entry.name}, not a tag of "
                    "this version"
                )
            tagged.append(entry.tag)
        if sorted(str(t) for t in tagged) != sorted(self.tags):
            raise FormatError(f"bundle model {self.ref}: its tag entries name {tagged}, its tags are {list(self.tags)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for canonical encoding."""
        return {
            "name": self.name,
            "version": self.version,
            "manifest": str(self.digest),
            "tags": list(self.tags),
            "log": list(self.log),
        }


@dataclass(frozen=True, slots=True)
class BundleIndex:
    """The index member of a bundle.

    Attributes:
        models: the model versions, in the order an import publishes them.
        blobs: every blob member, in member order; each manifest and every blob a manifest references, once.
        format: the bundle format version.
    """

    models: tuple[BundleModel, ...]
    blobs: tuple[Descriptor, ...]
    format: int = BUNDLE_FORMAT

    def __post_init__(self) -> None:
        if not self.models:
            raise FormatError("a bundle carries at least one model")
        refs = [m.ref for m in self.models]
        if len(set(refs)) != len(refs):
            raise FormatError(f"bundle index lists a model twice: {sorted(refs)}")
        digests = [d.digest for d in self.blobs]
        if len(set(digests)) != len(digests):
            raise FormatError("bundle index lists a blob twice")
        missing = [m.ref for m in self.models if m.digest not in set(digests)]
        if missing:
            raise FormatError(f"bundle index lists no manifest blob for {', '.join(missing)}")

    @property
    def total_bytes(self) -> int:
        """The sum of the blob sizes (each blob once)."""
        return sum(d.size for d in self.blobs)

    def to_bytes(self) -> bytes:
        """Canonical msgpack bytes."""
        return canonical.encode(
            {
                "format": self.format,
                "models": [m.to_dict() for m in self.models],
                "blobs": [{"digest": str(d.digest), "size": d.size} for d in self.blobs],
            },
            where="bundle index",
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> BundleIndex:
        """Decode an index, ignoring unknown fields.

        Raises:
            FormatError: not a bundle index, or one of a newer format.
        """
        raw = canonical.decode(data, what="bundle index", max_bytes=MAX_INDEX_BYTES)
        if not isinstance(raw, dict):
            raise FormatError("bundle index is not a map")
        version = raw.get("format")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise FormatError(f"bundle index has no valid format version ({version!r}); is this a fracstore bundle?")
        if version > BUNDLE_FORMAT:
            raise FormatError(
                f"bundle format {version} is newer than this fracstore reads ({BUNDLE_FORMAT}); upgrade fracstore"
            )
        try:
            models = tuple(
                BundleModel(
                    name=m["name"],
                    version=m["version"],
                    digest=Digest.parse(m["manifest"]),
                    tags=tuple(_typed(m.get("tags", []), list, "tags")),
                    log=tuple(_typed(m["log"], list, "log")),
                )
                for m in _typed(raw["models"], list, "models")
            )
            blobs = tuple(
                Descriptor(Digest.parse(b["digest"]), _count(b["size"])) for b in _typed(raw["blobs"], list, "blobs")
            )
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"bundle index is malformed: {type(exc).__name__}: {exc}") from exc
        return cls(models=models, blobs=blobs, format=version)


@dataclass(frozen=True, slots=True)
class BundleSummary:
    """What an export wrote.

    Attributes:
        path: the bundle file.
        models: the model versions it carries, in index order.
        blob_count: blob members (each blob once).
        total_bytes: the sum of the blob sizes.
        file_size: the size of the bundle file.
    """

    path: Path
    models: tuple[BundleModel, ...]
    blob_count: int
    total_bytes: int
    file_size: int

    def __post_init__(self) -> None:
        _check_counts(self.blob_count, self.total_bytes, self.file_size)


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What an import did.

    Attributes:
        path: the bundle file.
        models: the imported versions as this store now has them (its own version numbers and tags), in index order.
        published: refs of the versions this import published (a manifest already live under its name is reused,
            so importing the same bundle twice publishes nothing the second time).
        blobs_written: blobs this import wrote.
        blobs_present: blobs the store already had (not written again).
        bytes_written: bytes of the blobs written.
        bytes_total: bytes of every blob in the bundle.
    """

    path: Path
    models: tuple[ModelRecord, ...]
    published: tuple[str, ...]
    blobs_written: int
    blobs_present: int
    bytes_written: int
    bytes_total: int

    def __post_init__(self) -> None:
        _check_counts(self.blobs_written, self.blobs_present, self.bytes_written, self.bytes_total)


def _check_counts(*counts: int) -> None:
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise FormatError(f"counts are ints >= 0, not {count!r}")


def _typed(value: Any, expected: type, field: str) -> Any:
    if not isinstance(value, expected):
        raise FormatError(f"bundle index field {field!r} must be a {expected.__name__}, not {type(value).__name__}")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"bundle index holds {value!r} where a size (int >= 0) belongs")
    return value


# -- export -------------------------------------------------------------------------------------------------------


def export_bundle(
    store: Store, refs: Sequence[str], path: str | os.PathLike[str], *, all_versions: bool = False
) -> BundleSummary:
    """Write the versions ``refs`` name, with everything they reference, into one bundle file.

    The file is deterministic: exporting the same versions again (while their registry tags and provenance entries
    stay the same) gives byte-identical files, whatever the order of ``refs``. It is written to a temp file next to
    ``path`` and renamed into place at the end, so a failed export leaves nothing at ``path``; an existing file at
    ``path`` is replaced.

    Args:
        store: the store to export from.
        refs: what users type (``name``, ``name@3``, ``name:prod``, a digest prefix); each names one version.
        path: the bundle file to write (``.zip`` by convention).
        all_versions: take every live version of each name the refs resolve to.

    Returns:
        what was written.

    Raises:
        FormatError: ``refs`` is not a list of refs, or one is malformed.
        NotFoundError, AmbiguousRefError: a ref does not name one live version.
        ConflictError: a chosen version was deleted while the export started (run it again).
        IntegrityError: a blob or the registry log of the store is corrupt (nothing is written at ``path``).
        StorageError: the store or the bundle's folder cannot be read or written.
    """
    state, chosen = _choose(store, refs, all_versions=all_versions)
    provenance = _provenance(store, state, chosen)
    manifests: dict[Digest, bytes] = {}
    sizes: dict[Digest, int] = {}
    models = []
    for (name, number), version in chosen:
        data = manifests.get(version.manifest)
        if data is None:
            data = store.blobs.get_unsized(version.manifest, max_bytes=MAX_MANIFEST_BYTES)
            manifests[version.manifest] = data
        for descriptor in (Descriptor(version.manifest, len(data)), *Manifest.from_bytes(data).references()):
            if sizes.setdefault(descriptor.digest, descriptor.size) != descriptor.size:
                raise IntegrityError(
                    f"manifests in {store.url} give blob {descriptor.digest} two sizes "
                    f"({sizes[descriptor.digest]} and {descriptor.size}); the store is damaged",
                    key=blob_key(descriptor.digest),
                    store=store.url,
                )
        tags = tuple(sorted(t for t, v in state.names[name].tags.items() if v == number))
        models.append(BundleModel(name, number, version.manifest, tags, provenance[(name, number)]))
    # Members sorted by digest: an order that depends only on the set of blobs, not on how they were found.
    index = BundleIndex(
        models=tuple(models), blobs=tuple(Descriptor(d, sizes[d]) for d in sorted(sizes, key=lambda d: d.hex))
    )

    def chunks(descriptor: Descriptor) -> Iterable[Buffer]:
        if descriptor.digest in manifests:
            return [manifests[descriptor.digest]]
        local = store.blobs.local_file(descriptor)  # verified (a stat check, or a re-hash when stale)
        if local is not None:
            return file_chunks(local)
        return [store.blobs.get(descriptor)]  # verified; one blob in memory at a time

    file_size = write_bundle(path, index, chunks)
    return BundleSummary(
        path=Path(path),
        models=index.models,
        blob_count=len(index.blobs),
        total_bytes=index.total_bytes,
        file_size=file_size,
    )


def _choose(
    store: Store, refs: Sequence[str], *, all_versions: bool
) -> tuple[RegistryState, list[tuple[tuple[str, int], VersionState]]]:
    if isinstance(refs, str | bytes) or not isinstance(refs, Sequence):
        raise FormatError(f"refs takes a list of refs, e.g. [{refs!r}], not {type(refs).__name__}")
    if not refs:
        raise FormatError("export needs at least one ref")
    records = [store.resolve(ref) for ref in refs]
    # Tags and provenance come from one replayed state, so they agree with each other; the resolved versions must
    # still be live in it (resolve ran at a tip at or before this one).
    state = store.registry.refresh()
    chosen: dict[tuple[str, int], VersionState] = {}
    for record in records:
        named = state.names.get(record.name)
        current = None if named is None else named.get(record.version)
        if named is None or current is None or current.deleted or current.manifest != record.digest:
            raise ConflictError(
                f"{record.ref} was deleted from {store.url} while the export started; run the export again"
            )
        for version in named.live() if all_versions else [current]:
            chosen[(record.name, version.version)] = version
    # Sorted by name and version, so the file does not depend on the order or spelling of the refs.
    return state, sorted(chosen.items())


def _provenance(
    store: Store, state: RegistryState, chosen: Sequence[tuple[tuple[str, int], VersionState]]
) -> dict[tuple[str, int], tuple[bytes, ...]]:
    """The stored bytes of each chosen version's publish entry and of the tag entries that set its current tags.

    The log is read backwards from the state's tip down to the oldest chosen publish, checking the hash chain on the
    way (each entry's ``prev`` is the digest of the bytes read next), so the entries carried are the ones replay
    trusted. The tag entry that set a tag now pointing at version V is the last tag entry of that tag with target V:
    any later entry of that tag either had no effect or moved it away for good.
    """
    publishes = {version.seq: key for key, version in chosen}
    wanted_tags = {
        (name, tag): number
        for (name, number), _ in chosen
        for tag, target in state.names[name].tags.items()
        if target == number
    }
    found: dict[tuple[str, int], list[tuple[int, bytes]]] = {key: [] for key, _ in chosen}
    expected = state.tip
    for seq in range(state.seq, min(publishes) - 1, -1):
        key = log_key(seq)
        data = store.backend.read(key)
        if expected is None or Digest.of(data) != expected:
            raise IntegrityError(
                f"registry log entry {key} of {store.url} does not hash to what the entry after it names: the log was "
                "rewritten. Restore it before exporting",
                key=key,
                expected=str(expected),
                actual=str(Digest.of(data)),
                store=store.url,
            )
        entry = Entry.from_bytes(data, seq=seq)
        expected = entry.prev
        if seq in publishes:
            found[publishes[seq]].append((seq, data))
        elif entry.op == "tag" and entry.name is not None and entry.tag is not None:
            target = wanted_tags.get((entry.name, entry.tag))
            if target is not None and target == entry.version:
                found[(entry.name, target)].append((seq, data))
                del wanted_tags[(entry.name, entry.tag)]
    return {key: tuple(data for _, data in sorted(entries)) for key, entries in found.items()}


def write_bundle(
    path: str | os.PathLike[str], index: BundleIndex, chunks: Callable[[Descriptor], Iterable[Buffer]]
) -> int:
    """Write a bundle file: the index, then each blob of ``index.blobs`` in order, from ``chunks(descriptor)``.

    Every blob's bytes are hashed as they are written and must match its descriptor. The file is written to a temp
    file in ``path``'s folder (created exclusively, with a random name), fsynced, and renamed to ``path`` only when
    complete; on any error the temp file is removed and ``path`` is left as it was.

    Returns:
        the size of the file written.

    Raises:
        IntegrityError: the bytes of a blob do not match its descriptor (the source is corrupt).
        StorageError: the file cannot be written.
    """
    target = Path(path)
    folder = target.parent
    try:
        fd, temp_name = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".zip")
    except OSError as exc:
        raise StorageError(f"cannot create the bundle {target} in {folder}: {exc}") from exc
    temp = Path(temp_name)
    try:
        with open(fd, "wb") as handle:
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                _write_member(archive, INDEX_MEMBER, [index.to_bytes()], None)
                for descriptor in index.blobs:
                    _write_member(archive, member_name(descriptor.digest), chunks(descriptor), descriptor)
            handle.flush()
            os.fsync(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, FracstoreError):
            raise StorageError(f"cannot write the bundle {target}: {exc}") from exc
        raise
    with contextlib.suppress(OSError):  # durability of the new name; the file itself is complete either way
        fsync_folder(folder)
    return size


def _zip_info(name: str, size: int) -> zipfile.ZipInfo:
    # Every field that zipfile would take from the clock or the platform is fixed (docs/format.md, "Bundles").
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = ZIP_CREATE_SYSTEM
    info.external_attr = ZIP_MEMBER_MODE << 16
    info.file_size = size  # known in advance, so zipfile decides zip64 from it alone
    return info


def _write_member(archive: zipfile.ZipFile, name: str, chunks: Iterable[Buffer], descriptor: Descriptor | None) -> None:
    data = list(chunks) if descriptor is None else chunks
    size = descriptor.size if descriptor is not None else sum(len(memoryview(c).cast("B")) for c in data)
    hasher = hashlib.sha256()
    written = 0
    with archive.open(_zip_info(name, size), "w") as out:
        for chunk in data:
            hasher.update(chunk)
            written += len(memoryview(chunk).cast("B"))
            if written > size:
                break
            out.write(chunk)
    if descriptor is not None and (written != descriptor.size or hasher.hexdigest() != descriptor.digest.hex):
        raise IntegrityError(
            f"blob {descriptor.digest} read for the bundle has {'other bytes' if written == size else 'another size'} "
            "than its descriptor: the store's copy is corrupt (verify the store); no bundle was written",
            key=blob_key(descriptor.digest),
            expected=str(descriptor.digest),
        )


# -- reading and import -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_bundle(path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the with below, after ZipFile may have failed)
    except FileNotFoundError as exc:
        raise NotFoundError(f"there is no bundle at {path}", what=str(path)) from exc
    except OSError as exc:
        raise StorageError(f"cannot read the bundle {path}: {exc}") from exc
    with handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
            raise FormatError(
                f"{path} is not a fracstore bundle: it is not a zip file, or it is truncated ({exc}). Copy or export "
                "it again"
            ) from exc
        with archive:
            yield archive


def _check_member_name(name: str, path: Path) -> None:
    # Names are only ever compared with the index's digests, never used as paths; this refuses the shapes of path
    # traversal explicitly, so the error says what is wrong.
    if "/" in name or "\\" in name or "\x00" in name or name in ("", ".", "..") or ".." in name:
        raise FormatError(
            f"bundle {path} has a member named {name!r}: a bundle member is named by a digest only (no folders, "
            "'..' or absolute paths). The file was not written by fracstore or was tampered with; do not use it"
        )


def _read_index(archive: zipfile.ZipFile, path: Path) -> tuple[BundleIndex, dict[str, zipfile.ZipInfo]]:
    """The validated index and the member table: ``{member name: ZipInfo}`` for every blob member."""
    infos = archive.infolist()
    seen: set[str] = set()
    for info in infos:
        for name in {info.filename, info.orig_filename}:
            _check_member_name(name, path)
        if info.filename in seen:
            raise FormatError(f"bundle {path} holds member {info.filename!r} twice; do not use it")
        seen.add(info.filename)
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise FormatError(
                f"bundle {path}: member {info.filename!r} is compressed or encrypted; fracstore bundles store every "
                "member uncompressed. Export it again with fracstore"
            )
        if info.compress_size != info.file_size:
            raise FormatError(f"bundle {path}: stored member {info.filename!r} has two different sizes in the zip")
    by_name = {info.filename: info for info in infos}
    index_info = by_name.pop(INDEX_MEMBER, None)
    if index_info is None:
        raise FormatError(f"{path} is a zip file but not a fracstore bundle: it has no {INDEX_MEMBER} member")
    if index_info.file_size > MAX_INDEX_BYTES:
        raise FormatError(
            f"bundle {path}: the index is {index_info.file_size} bytes, over the {MAX_INDEX_BYTES}-byte limit; "
            "the file is not a fracstore bundle or is damaged"
        )
    index = BundleIndex.from_bytes(_read_small(archive, index_info, path, limit=MAX_INDEX_BYTES))
    expected = {member_name(d.digest): d for d in index.blobs}
    unknown = sorted(set(by_name) - set(expected))
    if unknown:
        raise FormatError(
            f"bundle {path} holds {len(unknown)} member(s) its index does not list (first: {unknown[0]!r}); the "
            "file was changed after export. Export it again"
        )
    missing = sorted(set(expected) - set(by_name))
    if missing:
        raise FormatError(
            f"bundle {path} lacks {len(missing)} blob member(s) its index lists (first: {missing[0]}); the file is "
            "incomplete. Export it again"
        )
    for name, info in by_name.items():
        # Size first: the zip's own record of the member's size must equal the index's, before any data is read.
        if info.file_size != expected[name].size:
            raise IntegrityError(
                f"bundle {path}: member {name} is {info.file_size} bytes, the index says {expected[name].size}; "
                "the bundle is corrupt. Export it again",
                key=name,
                expected=str(expected[name].size),
                actual=str(info.file_size),
            )
    return index, by_name


def _read_small(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, *, limit: int) -> bytes:
    try:
        with archive.open(info) as handle:
            data = handle.read(limit + 1)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise IntegrityError(
            f"bundle {path}: member {info.filename} is corrupt or truncated ({exc}); export it again",
            key=info.filename,
        ) from exc
    if len(data) > limit:
        raise FormatError(f"bundle {path}: member {info.filename} is over the {limit}-byte limit for its kind")
    return data


class _MemberStream:
    """A blob member read in chunks, with its size checked as it goes and, when ``verify``, its SHA-256 at the end.

    Attributes:
        started, exhausted: whether the reader took the first chunk, and all of them (with the checks passed).
        error: the IntegrityError this stream raised, if any (to tell it apart from the blob store's own).
    """

    def __init__(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, descriptor: Descriptor, path: Path, *, verify: bool
    ) -> None:
        self._archive = archive
        self._info = info
        self._descriptor = descriptor
        self._path = path
        self._verify = verify
        self.started = False
        self.exhausted = False
        self.error: IntegrityError | None = None

    def __iter__(self) -> Iterator[bytes]:
        self.started = True
        hasher = hashlib.sha256() if self._verify else None
        size = 0
        try:
            with self._archive.open(self._info) as handle:
                while chunk := handle.read(_CHUNK):
                    size += len(chunk)
                    if size > self._descriptor.size:
                        raise self._fail(f"has more than the {self._descriptor.size} bytes the index says")
                    if hasher is not None:
                        hasher.update(chunk)
                    yield chunk
        except (zipfile.BadZipFile, EOFError) as exc:
            # zipfile checks each member's CRC-32 at its end: a flipped byte usually shows up here first.
            raise self._fail(f"is corrupt or truncated ({exc})") from exc
        if size != self._descriptor.size:
            raise self._fail(f"has {size} bytes, the index says {self._descriptor.size}")
        if hasher is not None and hasher.hexdigest() != self._descriptor.digest.hex:
            raise self._fail(f"does not hash to {self._descriptor.digest}")
        self.exhausted = True

    def _fail(self, what: str) -> IntegrityError:
        self.error = _member_error(self._path, self._info.filename, self._descriptor, what)
        return self.error


def _member_error(path: Path, name: str, descriptor: Descriptor, what: str) -> IntegrityError:
    return IntegrityError(
        f"bundle {path}: member {name} {what}; the bundle is corrupt or was tampered with. Nothing was published; "
        "export it again",
        key=name,
        expected=str(descriptor.digest),
    )


def _read_manifest(archive: zipfile.ZipFile, info: zipfile.ZipInfo, descriptor: Descriptor, path: Path) -> bytes:
    if descriptor.size > MAX_MANIFEST_BYTES:
        raise FormatError(f"bundle {path}: manifest member {info.filename} is over the {MAX_MANIFEST_BYTES}-byte limit")
    return b"".join(_MemberStream(archive, info, descriptor, path, verify=True))


def _check_complete(index: BundleIndex, manifests: dict[Digest, bytes], path: Path) -> None:
    """Every manifest decodes, every blob it references is in the bundle with the same size, and every blob in the
    bundle is a manifest or referenced by one (a bundle carries nothing else)."""
    listed = {d.digest: d.size for d in index.blobs}
    used = set(manifests)
    for model in index.models:
        try:
            manifest = Manifest.from_bytes(manifests[model.digest])
        except FormatError as exc:
            raise FormatError(f"bundle {path}: the manifest of {model.ref} is not a valid manifest: {exc}") from exc
        for descriptor in manifest.references():
            if listed.get(descriptor.digest) != descriptor.size:
                raise FormatError(
                    f"bundle {path} is incomplete: the manifest of {model.ref} references blob {descriptor.digest} "
                    f"({descriptor.size} bytes), which the bundle does not carry. Export it again"
                )
            used.add(descriptor.digest)
    extra = sorted(str(d) for d in set(listed) - used)
    if extra:
        raise FormatError(f"bundle {path} carries blob {extra[0]}, which no model in it references; do not use it")


def read_bundle_index(path: str | os.PathLike[str]) -> BundleIndex:
    """The index of a bundle, after checking the zip's structure against it (member names, sizes, no compression).

    Member data is not read: that is what :func:`import_bundle` verifies.

    Raises:
        NotFoundError: no file at ``path``.
        FormatError: not a zip file, truncated, or not a well-formed bundle.
        IntegrityError: the index member is corrupt, or a member's size differs from the index's.
    """
    bundle = Path(path)
    with _open_bundle(bundle) as archive:
        index, _ = _read_index(archive, bundle)
    return index


def import_bundle(store: Store, path: str | os.PathLike[str], *, tags: bool = True) -> ImportSummary:
    """Verify every member of a bundle, store its blobs, then publish its models (and move their tags).

    Nothing is published unless every member matches the index (size, then SHA-256): a corrupt, truncated or
    tampered bundle leaves the registry unchanged (blobs stored before the error are unreferenced, so invisible,
    and garbage collection reclaims them). Each model is published through :meth:`Store.publish_manifest`, in index
    order: a manifest already live under its name is reused, so importing a bundle twice publishes nothing new.

    Args:
        store: the store to import into.
        path: the bundle file.
        tags: point each model's registry tags (as the bundle lists them) at the imported versions, moving tags the
            store already has.

    Returns:
        what was imported.

    Raises:
        NotFoundError: no file at ``path``.
        FormatError: not a zip file, truncated, or not a well-formed bundle (unknown, duplicate, missing, compressed
            or badly named members, an oversized or undecodable index, an incomplete bundle).
        IntegrityError: a member's size or digest differs from the index.
        StorageError: the store cannot be written.
    """
    bundle = Path(path)
    written = present = bytes_written = 0
    with _open_bundle(bundle) as archive:
        index, members = _read_index(archive, bundle)
        sizes = {d.digest: d for d in index.blobs}
        # The manifests first (small, and they decide whether the bundle is complete): a malformed bundle is refused
        # before a single blob is written.
        manifests = {
            digest: _read_manifest(archive, members[member_name(digest)], sizes[digest], bundle)
            for digest in dict.fromkeys(model.digest for model in index.models)
        }
        _check_complete(index, manifests, bundle)
        for name, info in members.items():  # zip order: one sequential pass over the file
            descriptor = sizes[Digest(name)]
            data = manifests.get(descriptor.digest)
            if data is not None:
                created = store.blobs.put(descriptor, data, sync_folder=False)
            else:
                created = _put_member(store, archive, info, descriptor, bundle)
            if created:
                written += 1
                bytes_written += descriptor.size
            else:
                present += 1
        # Make the new blob names durable once per folder before anything refers to them (format.md section 8).
        store.backend.sync_folders(blob_key(d.digest) for d in index.blobs)
    tip = store.registry.refresh().seq
    records = [store.publish_manifest(model.name, model.digest) for model in index.models]
    published = tuple(dict.fromkeys(r.ref for r in records if r.seq > tip))
    latest = {r.ref: r for r in records}
    if tags:
        for model, record in zip(index.models, records, strict=True):
            for tag in model.tags:
                latest[record.ref] = store.tag(record.ref, tag)
    return ImportSummary(
        path=bundle,
        models=tuple(latest[r.ref] for r in records),
        published=published,
        blobs_written=written,
        blobs_present=present,
        bytes_written=bytes_written,
        bytes_total=index.total_bytes,
    )


def _put_member(
    store: Store, archive: zipfile.ZipFile, info: zipfile.ZipInfo, descriptor: Descriptor, path: Path
) -> bool:
    """Store one blob member; True when it was written. The member is verified whether or not it is written."""
    # Written blobs are hashed once, by the blob store (mutable=True re-hashes while writing and refuses to name
    # bytes that do not match); this stream only counts. A blob the store already has is not read by put at all,
    # and is then verified here: a damaged bundle is refused whether or not the store needed its bytes.
    stream = _MemberStream(archive, info, descriptor, path, verify=False)
    try:
        created = store.blobs.put(descriptor, stream, sync_folder=False, mutable=True)
    except IntegrityError as exc:
        if exc is stream.error:
            raise
        raise _member_error(path, info.filename, descriptor, f"does not hash to {descriptor.digest}") from exc
    if not stream.exhausted:
        for _ in _MemberStream(archive, info, descriptor, path, verify=True):
            pass
    return created
