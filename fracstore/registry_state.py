"""Registry log entries and their replay, with no I/O.

An *entry* is one immutable record in ``log/<seq>``: a publish, a tag move, an untag, a delete tombstone, or the
start or end of a gc run. Entries form a hash chain: each names the SHA-256 of the previous entry's bytes in
``prev``, so a rewritten or removed entry is detected on replay.

*Replay* folds entries, in sequence order, into a :class:`RegistryState`. It is deterministic and never rejects an
entry for what it says (a tag that points at a deleted version simply has no effect); preconditions are the
writer's business, checked against the state at the tip it is about to extend (DESIGN.md section 4). Version N of
a name is its N-th publish in log order, so versions are derived, never written by racing clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import canonical
from .config import MAX_ENTRY_BYTES
from .digest import Descriptor, Digest
from .errors import FormatError, IntegrityError
from .layout import log_key

ENTRY_FORMAT = 1
OPS = ("publish", "tag", "untag", "delete", "gc-begin", "gc-end")
_NAMED_OPS = frozenset({"publish", "tag", "untag", "delete"})


def _check_types(*fields: tuple[str, object, Any]) -> None:
    for label, value, expected in fields:
        if isinstance(value, bool) or not isinstance(value, expected):
            raise FormatError(f"log entry field {label} has a {type(value).__name__} ({value!r})")


@dataclass(frozen=True, slots=True)
class Writer:
    """Who wrote an entry. ``commit`` is random per logical operation and survives retries, so a writer can
    recognise its own entry after an unknown outcome."""

    host: str
    pid: int
    commit: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One registry log entry. Fields that do not apply to the op are None.

    Attributes:
        seq: position in the log, from 1.
        op: one of :data:`OPS`.
        time: UTC time of writing, manifest time format.
        writer: who wrote it.
        prev: digest of the previous entry's bytes; None only for seq 1.
        name: the model name (publish, tag, untag, delete).
        manifest: the published manifest (publish).
        version: the tag's target (tag) or the deleted version (delete; None deletes the whole name).
        tag: the tag (tag, untag).
        payload: a blob with large data (gc-begin: the candidate set).
        begin: the seq of the gc-begin a gc-end closes.
    """

    seq: int
    op: str
    time: str
    writer: Writer
    prev: Digest | None
    name: str | None = None
    manifest: Digest | None = None
    version: int | None = None
    tag: str | None = None
    payload: Descriptor | None = None
    begin: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise FormatError(f"unknown registry op {self.op!r}")
        if (self.name is None) == (self.op in _NAMED_OPS):
            raise FormatError(f"registry op {self.op!r} {'needs' if self.name is None else 'takes no'} a name")
        if self.op == "publish" and self.manifest is None:
            raise FormatError("a publish entry needs a manifest digest")
        if self.op in ("tag", "untag") and self.tag is None:
            raise FormatError(f"a {self.op} entry needs a tag")
        if self.op == "tag" and self.version is None:
            raise FormatError("a tag entry needs a target version")
        if self.op == "gc-begin" and self.payload is None:
            raise FormatError("a gc-begin entry needs a payload (its candidate set)")
        if self.op == "gc-end" and not isinstance(self.begin, int):
            raise FormatError("a gc-end entry needs the seq of its gc-begin")
        if (self.seq == 1) != (self.prev is None):
            raise FormatError("only the first entry has no prev digest")
        _check_types(
            ("seq", self.seq, int),
            ("time", self.time, str),
            ("writer.host", self.writer.host, str),
            ("writer.pid", self.writer.pid, int),
            ("writer.commit", self.writer.commit, str),
            ("name", self.name, str | None),
            ("version", self.version, int | None),
            ("tag", self.tag, str | None),
            ("begin", self.begin, int | None),
        )
        if self.seq < 1 or (self.version is not None and self.version < 1):
            raise FormatError("seq and version numbers start at 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for canonical encoding; fields that are None are left out."""
        raw: dict[str, Any] = {
            "format": ENTRY_FORMAT,
            "seq": self.seq,
            "op": self.op,
            "time": self.time,
            "writer": {"host": self.writer.host, "pid": self.writer.pid, "commit": self.writer.commit},
            "prev": None if self.prev is None else str(self.prev),
        }
        optional = {
            "name": self.name,
            "manifest": None if self.manifest is None else str(self.manifest),
            "version": self.version,
            "tag": self.tag,
            "payload": None
            if self.payload is None
            else {"digest": str(self.payload.digest), "size": self.payload.size},
            "begin": self.begin,
        }
        raw.update({k: v for k, v in optional.items() if v is not None})
        return raw

    def to_bytes(self) -> bytes:
        """Canonical msgpack bytes.

        Raises:
            FormatError: the entry would exceed the size limit (large data belongs in a payload blob).
        """
        data = canonical.encode(self.to_dict(), where="log entry")
        if len(data) > MAX_ENTRY_BYTES:
            raise FormatError(f"log entry is {len(data)} bytes; entries stay under {MAX_ENTRY_BYTES} bytes")
        return data

    @classmethod
    def from_bytes(cls, data: bytes, *, seq: int) -> Entry:
        """Decode the entry stored under ``log/<seq>``, ignoring unknown fields.

        Raises:
            FormatError: malformed, or its seq differs from its key's.
        """
        raw = canonical.decode(data, what=f"log entry {seq}", max_bytes=MAX_ENTRY_BYTES)
        try:
            if raw["format"] > ENTRY_FORMAT:
                raise FormatError(
                    f"log entry {seq} has format {raw['format']}, newer than this fracstore reads; upgrade fracstore"
                )
            writer = raw["writer"]
            payload = raw.get("payload")
            entry = cls(
                seq=raw["seq"],
                op=raw["op"],
                time=raw["time"],
                writer=Writer(writer["host"], writer["pid"], writer["commit"]),
                prev=None if raw["prev"] is None else Digest.parse(raw["prev"]),
                name=raw.get("name"),
                manifest=None if raw.get("manifest") is None else Digest.parse(raw["manifest"]),
                version=raw.get("version"),
                tag=raw.get("tag"),
                payload=None if payload is None else Descriptor(Digest.parse(payload["digest"]), payload["size"]),
                begin=raw.get("begin"),
            )
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"log entry {seq} is malformed: {type(exc).__name__}: {exc}") from exc
        if entry.seq != seq:
            raise FormatError(f"log entry stored as {seq} says it is entry {entry.seq}")
        return entry


@dataclass(slots=True)
class VersionState:
    """One published version of a name, as replay sees it."""

    version: int
    manifest: Digest
    seq: int
    time: str
    deleted: bool = False


@dataclass(slots=True)
class NameState:
    """Every version and tag of one name. ``publishes`` counts deleted versions too, so numbers are never reused."""

    versions: list[VersionState] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)

    def live(self) -> list[VersionState]:
        """Versions not deleted, oldest first."""
        return [v for v in self.versions if not v.deleted]

    def get(self, version: int) -> VersionState | None:
        """The version with that number, deleted or not."""
        return self.versions[version - 1] if 0 < version <= len(self.versions) else None


@dataclass(slots=True)
class RegistryState:
    """The registry replayed up to entry ``seq``; ``tip`` is the digest of that entry's bytes.

    This is an accumulator: :meth:`apply` changes it in place (replaying thousands of entries by copying would be
    quadratic). Take :meth:`snapshot` before handing it to code that must not see later changes.
    """

    seq: int = 0
    tip: Digest | None = None
    names: dict[str, NameState] = field(default_factory=dict)
    gc_runs: dict[int, Descriptor] = field(default_factory=dict)
    commits: dict[str, int] = field(default_factory=dict)  # recent writer commit ids -> seq (unknown outcomes)

    def snapshot(self) -> RegistryState:
        """An independent copy: later :meth:`apply` calls on either do not show in the other.

        Containers are copied, the VersionState objects in them shared: apply replaces a VersionState instead of
        changing it, so a shallow copy is enough, and costs a pointer per version instead of a deep copy.
        """
        return RegistryState(
            seq=self.seq,
            tip=self.tip,
            names={name: NameState(list(n.versions), dict(n.tags)) for name, n in self.names.items()},
            gc_runs=dict(self.gc_runs),
            commits=dict(self.commits),
        )

    def apply(self, entry: Entry, digest: Digest) -> None:
        """Fold ``entry`` (whose bytes hash to ``digest``) into the state.

        Raises:
            IntegrityError: the entry does not extend this state's chain (wrong seq, or prev differs).
        """
        if entry.seq != self.seq + 1 or entry.prev != self.tip:
            raise IntegrityError(
                f"registry log entry {entry.seq} does not follow entry {self.seq} (its prev is {entry.prev}, the log "
                f"has {self.tip}): the log was rewritten or an entry removed",
                key=log_key(entry.seq),
                expected=str(self.tip),
                actual=str(entry.prev),
            )
        self.seq, self.tip = entry.seq, digest
        self.commits[entry.writer.commit] = entry.seq
        if len(self.commits) > 4096:  # only recent commits matter for resolving an unknown outcome
            for key in list(self.commits)[:2048]:
                del self.commits[key]
        if entry.op == "gc-begin" and entry.payload is not None:
            self.gc_runs[entry.seq] = entry.payload
            return
        if entry.op == "gc-end":
            self.gc_runs.pop(entry.begin or 0, None)
            return
        if entry.name is None:
            return  # unreachable: Entry.__post_init__ requires a name for every other op
        if entry.op == "publish" and entry.manifest is not None:
            state = self.names.setdefault(entry.name, NameState())
            state.versions.append(VersionState(len(state.versions) + 1, entry.manifest, entry.seq, entry.time))
            return
        # Ops on a name that was never published change nothing (and must not create an empty name).
        state = self.names.get(entry.name) or NameState()
        if entry.op == "tag":
            target = state.get(entry.version or 0)
            if target is not None and not target.deleted and entry.tag is not None:
                state.tags[entry.tag] = target.version
        elif entry.op == "untag":
            state.tags.pop(entry.tag or "", None)
        elif entry.op == "delete":
            gone = set()
            for index, version in enumerate(state.versions):
                if entry.version is None or version.version == entry.version:
                    # Replaced, never changed in place: snapshots share VersionState objects (see snapshot()).
                    state.versions[index] = dataclasses.replace(version, deleted=True)
                    gone.add(version.version)
            state.tags = {t: v for t, v in state.tags.items() if v not in gone}

    # -- serialization (checkpoints and the local replay cache) ----------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data for canonical encoding."""
        return {
            "format": ENTRY_FORMAT,
            "seq": self.seq,
            "tip": None if self.tip is None else str(self.tip),
            "names": {
                name: {
                    "versions": [[str(v.manifest), v.seq, v.time, v.deleted] for v in state.versions],
                    "tags": dict(state.tags),
                }
                for name, state in self.names.items()
            },
            "gc_runs": [[seq, str(d.digest), d.size] for seq, d in sorted(self.gc_runs.items())],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RegistryState:
        """Inverse of :meth:`to_dict`.

        Raises:
            FormatError: malformed.
        """
        try:
            if raw["format"] > ENTRY_FORMAT:
                raise FormatError("registry checkpoint written by a newer fracstore")
            names = {}
            for name, data in raw["names"].items():
                versions = [
                    VersionState(i + 1, Digest.parse(digest), int(seq), str(time), bool(deleted))
                    for i, (digest, seq, time, deleted) in enumerate(data["versions"])
                ]
                names[name] = NameState(versions, {str(t): int(v) for t, v in data["tags"].items()})
            seq = int(raw["seq"])
            for name, named in names.items():
                # What replay guarantees, so a forged or damaged checkpoint is refused rather than half believed.
                seqs = [v.seq for v in named.versions]
                if seqs != sorted(set(seqs)) or (seqs and not (seqs[0] > 0 and seqs[-1] <= seq)):
                    raise FormatError(f"registry checkpoint: versions of {name!r} are out of order")
                for tag, version in named.tags.items():
                    target = named.get(version)
                    if target is None or target.deleted:
                        raise FormatError(f"registry checkpoint: tag {name}:{tag} points at no live version")
            return cls(
                seq=seq,
                tip=None if raw["tip"] is None else Digest.parse(raw["tip"]),
                names=names,
                gc_runs={int(s): Descriptor(Digest.parse(d), int(z)) for s, d, z in raw.get("gc_runs", ())},
            )
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"registry checkpoint is malformed: {type(exc).__name__}: {exc}") from exc
