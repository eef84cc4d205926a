"""Garbage collection with a grace period, the publisher side of its protocol, and retention policies.

Terms (DESIGN.md section 8, docs/format.md section 13):

* **marked**: a blob the replayed registry needs: the manifest of every live version, every blob such a manifest
  references (:meth:`~fracstore.manifest.Manifest.references`), and the payload blob of every open gc run. Registry
  tags only point at live versions (checked: a tag that does not is a damaged state and stops gc).
* **candidate**: a blob present in the store, not marked, and at least ``grace`` old by its modification time.
  Unmarked blobs younger than that are *kept young*: a save writes its blobs before its log entry, so a fresh
  unreferenced blob may be one a publisher is about to reference.
* **run**: one sweep, recorded as ``gc-begin`` (whose payload blob holds the candidate set: the canonical msgpack
  array of the digests, sorted) and ``gc-end`` (whose ``begin`` is the gc-begin's seq). A run is *open* from its
  gc-begin until a gc-end names it. Its sweeper deletes candidates only between the two, and only for
  :data:`SWEEP_LEASE` after its gc-begin; a run open longer than the lease plus :data:`CLOCK_SKEW` (by its entry's
  time) is *expired*: its sweeper has stopped deleting or died, and any gc closes it.

Why no blob a publish commits to can be deleted (the argument of docs/format.md section 13.4):

1. The only unsafe case is a publisher that *dedups* onto an old unreferenced blob (re-saving weights of a deleted
   version, pushing a model whose blobs were orphaned): it skips the write, confirms the blob is there, and a
   sweeper could delete it before the publish entry lands. New blobs are young, so no run lists them.
2. A sweeper marks from the state at some tip, lists candidates, and appends gc-begin at the tip it extends, with a
   decide that re-marks any version published since the mark: if one references a candidate, the candidate set is
   rebuilt and the append retried. Since the create at tip+1 fails when anyone extended the log meanwhile, every
   publish entry is either before the gc-begin (and then marked, so none of its blobs is a candidate) or after it.
3. Deletes happen only after gc-begin is in the log. A publisher records the registry seq ``n0`` *before* its
   confirm step; its decide (run at the tip before every append attempt) looks at every run that could have deleted
   a blob after that confirm: runs open at ``n0``, runs open at the tip, and runs whose gc-begin lies in
   ``(n0, tip]`` (read from the log, ended or not). If one's candidate set holds the manifest or a blob it
   references, the publish does not commit: the publisher waits until that run is over (ended or expired), puts
   the blobs again (a save has the data; a push or import re-confirms and asks for a retry if a blob is gone),
   confirms them, and only then retries. A run that is over deletes nothing more, so a confirm after it is final.
4. A run that dies (SIGKILL) between gc-begin and gc-end only leaves unreferenced blobs missing and the run open;
   publishers that need its candidates wait at most :data:`PUBLISH_WAIT_SECONDS` before a clear ConflictError, and
   the run expires after the lease, after which they re-put and commit, and the next gc closes it.

Clocks: the grace period compares object modification times (the storage service's clock) with this machine's
clock, and run expiry compares a gc-begin's time with the reader's clock; both assume clocks that agree to within
:data:`CLOCK_SKEW`, far below the default grace of 7 days.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from . import canonical
from .blobs import BlobStore
from .digest import Descriptor, Digest
from .errors import ConfigError, ConflictError, FormatError, IntegrityError, NotFoundError, StorageError
from .layout import blob_key, log_key
from .manifest import check_name, parse_time
from .registry import Change, Decide
from .registry_state import Entry, RegistryState

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_GRACE",
    "PUBLISH_WAIT_SECONDS",
    "SWEEP_LEASE",
    "GcCandidate",
    "GcReport",
    "RetentionPolicy",
    "RetentionReport",
    "SweepConflictError",
    "apply_retention",
    "collect",
    "decode_candidate_set",
    "encode_candidate_set",
    "guarded_publish",
]

DEFAULT_GRACE = timedelta(days=7)
SWEEP_LEASE = timedelta(hours=1)  # a sweeper deletes only this long after its gc-begin
CLOCK_SKEW = timedelta(hours=1)  # margin between machines' clocks before another machine calls a run expired
PUBLISH_WAIT_SECONDS = 60.0  # how long a publish waits for a run that holds its blobs before giving up
_POLL_SECONDS = 0.1
_MAX_CANDIDATE_SET_BYTES = 1 << 28  # ~3.6 million digests
_GC_BEGIN_ATTEMPTS = 8
_cache_lock = threading.Lock()
_candidate_sets: dict[Digest, frozenset[Digest] | None] = {}  # payload digest -> set (None: unreadable)
_run_times: dict[tuple[str, int], datetime] = {}  # (store id, gc-begin seq) -> its entry's time


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- reports and policies ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcCandidate:
    """A blob a gc run deletes (or, in a dry run, would delete).

    Attributes:
        digest: the blob.
        size: its stored size in bytes.
        age: how long before the run's clock reading it was last written.
    """

    digest: Digest
    size: int
    age: timedelta


@dataclass(frozen=True, slots=True)
class GcReport:
    """What :func:`collect` found and did.

    Attributes:
        store: the store URL (without credentials).
        dry_run: True when nothing was written or deleted.
        candidates: unreferenced blobs older than the grace period, sorted by digest: deleted by this run (those
            another sweeper removed first included), or with ``dry_run`` exactly those a real run would delete.
        bytes_freed: bytes of the candidates this run deleted (with ``dry_run``: would delete).
        blobs_deleted: candidates this run deleted (with ``dry_run``: would delete); fewer than ``candidates``
            when another sweeper deleted some first or the sweep lease ran out.
        kept_young: unreferenced blobs kept because they are younger than the grace period.
        referenced: blobs in the store the registry references (kept).
        begin, end: the seqs of this run's gc-begin and gc-end; None in a dry run or when there was nothing to
            delete (then nothing is written).
        runs_closed: seqs of expired runs of other sweepers this run closed with a gc-end.
    """

    store: str
    dry_run: bool
    candidates: tuple[GcCandidate, ...]
    bytes_freed: int
    blobs_deleted: int
    kept_young: int
    referenced: int
    begin: int | None
    end: int | None
    runs_closed: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Which versions :func:`apply_retention` deletes. A live version is deleted when every rule that is set
    selects it:

    * ``keep_last=N``: it is not one of the N newest live versions of its name;
    * ``delete_untagged_older_than=D``: no registry tag points at it and it was published more than D ago;
    * ``keep_tagged`` (default True): no registry tag points at it.

    At least one of ``keep_last`` and ``delete_untagged_older_than`` must be set.

    Attributes:
        names: the names the policy applies to; empty means every name.
    """

    keep_last: int | None = None
    keep_tagged: bool = True
    delete_untagged_older_than: timedelta | None = None
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.keep_last is not None and (
            isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0
        ):
            raise ConfigError(f"keep_last must be an int >= 0 or None, not {self.keep_last!r}")
        if not isinstance(self.keep_tagged, bool):
            raise ConfigError(f"keep_tagged must be True or False, not {self.keep_tagged!r}")
        older = self.delete_untagged_older_than
        if older is not None and (not isinstance(older, timedelta) or older < timedelta(0)):
            raise ConfigError(f"delete_untagged_older_than must be a timedelta >= 0 or None, not {older!r}")
        if self.keep_last is None and older is None:
            raise ConfigError(
                "a retention policy needs keep_last= or delete_untagged_older_than= (otherwise it deletes nothing)"
            )
        if not isinstance(self.names, tuple):
            raise ConfigError(f"names must be a tuple of model names, e.g. ({self.names!r},)")
        for name in self.names:
            check_name(name)


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What :func:`apply_retention` deleted (or, with ``dry_run``, would delete).

    Attributes:
        store: the store URL (without credentials).
        dry_run: True when nothing was written.
        deleted: the versions deleted, ``name@version``, in log order.
        kept: the live versions the policy keeps among the names it applies to, ``name@version``.
    """

    store: str
    dry_run: bool
    deleted: tuple[str, ...]
    kept: tuple[str, ...]


class SweepConflictError(ConflictError):
    """A publish would commit to blobs an open (or recently ended) gc run may have deleted. Raised from the
    publish's decide and handled by :func:`guarded_publish`; it reaches a caller only as a ConflictError.

    Attributes:
        runs: the gc-begin seqs of the runs whose candidate sets hold the blobs.
        blobs: those blobs.
    """

    def __init__(self, message: str, *, runs: tuple[int, ...], blobs: frozenset[Digest]) -> None:
        super().__init__(message)
        self.runs = runs
        self.blobs = blobs


# -- marking -------------------------------------------------------------------------------------------------


def _references(store: Store, digest: Digest, ref: str) -> set[Digest]:
    """The manifest ``digest`` and every blob it references.

    Raises:
        IntegrityError: the manifest cannot be read (gc must stop, never treat its blobs as unreferenced).
        StorageError: the backend failed.
    """
    try:
        manifest = store.manifest(digest)
    except (NotFoundError, IntegrityError, FormatError) as exc:
        raise IntegrityError(
            f"gc stopped before deleting anything: the manifest of {ref} ({digest}) in {store.url} cannot be read "
            f"({exc}). Restore it (push that version again from a store that has it) or delete {ref}, then run gc "
            "again",
            key=blob_key(digest),
            store=store.url,
        ) from exc
    return {digest, *(d.digest for d in manifest.references())}


def _live_manifests(state: RegistryState, store: Store) -> dict[Digest, str]:
    """``{manifest digest: a ref naming it}`` for every live version.

    Raises:
        IntegrityError: a registry tag points at a version that is not live (a damaged state).
    """
    live: dict[Digest, str] = {}
    for name, named in state.names.items():
        for tag, number in named.tags.items():
            target = named.get(number)
            if target is None or target.deleted:
                raise IntegrityError(
                    f"gc stopped before deleting anything: tag {name}:{tag} of {store.url} points at version "
                    f"{number}, which is not live, so the replayed registry state is damaged. Delete this store's "
                    "entry under the local cache folder's stores/ and run gc again",
                    store=store.url,
                )
        for version in named.live():
            live.setdefault(version.manifest, f"{name}@{version.version}")
    return live


def _mark(store: Store, state: RegistryState) -> tuple[set[Digest], dict[Digest, str]]:
    live = _live_manifests(state, store)
    marked: set[Digest] = set()
    for digest, ref in live.items():
        marked |= _references(store, digest, ref)
    # An open run's payload is what publishers read to know whether they must re-check: keep it while it is open.
    marked.update(payload.digest for payload in state.gc_runs.values())
    return marked, live


# -- gc --------------------------------------------------------------------------------------------------------


def collect(
    store: Store,
    *,
    grace: timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    now: Callable[[], datetime] | None = None,
) -> GcReport:
    """Delete the blobs no live version references that are older than ``grace`` (docs/format.md section 13).

    Args:
        store: the store.
        grace: minimum age (since the blob's last write) of a blob that may be deleted.
        dry_run: report exactly what a real run would delete, with sizes, and write nothing.
        now: the clock (tests pass a fake one); default: this machine's UTC clock.

    Returns:
        what was (or would be) deleted and kept.

    Raises:
        ConfigError: ``grace`` is negative or not a timedelta.
        IntegrityError, FormatError: the log, a live version's manifest or the registry state cannot be read;
            nothing is deleted.
        StorageError: the backend failed (a sweep stopped part-way leaves its run open; it expires, see
            :data:`SWEEP_LEASE`, and deletes nothing referenced).
        ConflictError: publishers kept landing versions that reference candidates (run gc again).
    """
    if not isinstance(grace, timedelta) or grace < timedelta(0):
        raise ConfigError(f"grace must be a timedelta >= 0, not {grace!r}")
    clock = now or _utcnow
    # Marked from a full replay, not from a checkpoint or the local replay cache: a wrong but decodable starting
    # state could otherwise make live blobs look unreferenced (docs/format.md section 13).
    state = store.registry.replay_from_start()
    marked, live = _mark(store, state)
    moment = clock()
    candidates, kept_young, referenced = _find_candidates(store, marked, moment, grace)
    expired = tuple(seq for seq in sorted(state.gc_runs) if _expired(store, seq, moment))
    if dry_run:
        return GcReport(
            store=store.url,
            dry_run=True,
            candidates=candidates,
            bytes_freed=sum(c.size for c in candidates),
            blobs_deleted=len(candidates),
            kept_young=kept_young,
            referenced=referenced,
            begin=None,
            end=None,
        )
    begin = end = None
    deleted = freed = 0
    if candidates:
        begin, candidates = _begin(store, candidates, marked, live)
    if begin is not None:
        # DESIGN.md section 8: deletes happen only while the run is open and within its lease (module docstring).
        deadline = time.monotonic() + SWEEP_LEASE.total_seconds()
        # Also by the wall clock publishers judge expiry with: the monotonic clock stops while a machine is
        # suspended, and a laptop that slept through its lease must not wake up and delete.
        lease_end = _run_started(store, begin) + SWEEP_LEASE
        for candidate in candidates:
            if time.monotonic() > deadline or _utcnow() > lease_end:
                break  # the rest waits for the next run; publishers may treat this run as expired from now on
            if store.backend.delete(blob_key(candidate.digest)):
                deleted += 1
                freed += candidate.size
            if isinstance(store.blobs, BlobStore):
                store.blobs.forget(candidate.digest)  # its verified-state record describes a file that is gone
        end = _end(store, begin)
    closed = tuple(seq for seq in expired if _end(store, seq) is not None)
    return GcReport(
        store=store.url,
        dry_run=False,
        candidates=candidates,
        bytes_freed=freed,
        blobs_deleted=deleted,
        kept_young=kept_young,
        referenced=referenced,
        begin=begin,
        end=end,
        runs_closed=closed,
    )


def _find_candidates(
    store: Store, marked: set[Digest], moment: datetime, grace: timedelta
) -> tuple[tuple[GcCandidate, ...], int, int]:
    """The unmarked blobs at least ``grace`` old, and the counts of young unmarked and of marked blobs present."""
    found = []
    young = referenced = 0
    for digest in store.blobs.digests():
        if digest in marked:
            referenced += 1
            continue
        key = blob_key(digest)
        try:
            size = store.backend.size(key)
            age = moment - store.backend.modified(key)
        except NotFoundError:
            continue  # another sweeper removed it since the listing
        if age >= grace:
            found.append(GcCandidate(digest, size, age))
        else:
            young += 1  # a clock ahead of ours gives a negative age: young, which is the safe side
    found.sort(key=lambda c: c.digest.hex)
    return tuple(found), young, referenced


class _RemarkError(Exception):
    """Versions published since the mark reference these candidates (raised from gc-begin's decide)."""

    def __init__(self, hit: set[Digest]) -> None:
        super().__init__(f"{len(hit)} candidate(s) were referenced meanwhile")
        self.hit = hit


def _begin(
    store: Store, candidates: tuple[GcCandidate, ...], marked: set[Digest], live: dict[Digest, str]
) -> tuple[int | None, tuple[GcCandidate, ...]]:
    """Store the candidate set and append gc-begin, re-marking versions published since the mark (module
    docstring, point 2). Returns the gc-begin seq (None when no candidate is left) and the final candidates."""
    for _ in range(_GC_BEGIN_ATTEMPTS):
        digests = {c.digest for c in candidates}
        payload, _created = store.blobs.put_bytes(encode_candidate_set(digests))

        def decide(state: RegistryState, digests: set[Digest] = digests, payload: Descriptor = payload) -> Change:
            hit: set[Digest] = set()
            for digest, ref in _live_manifests(state, store).items():
                if digest not in live:
                    extra = _references(store, digest, ref)
                    marked.update(extra)
                    live[digest] = ref
                    hit |= extra & digests
            if hit:
                raise _RemarkError(hit)
            return Change("gc-begin", payload=payload)

        try:
            entry, _state = store.registry.append(decide)
        except _RemarkError as remark:
            candidates = tuple(c for c in candidates if c.digest not in remark.hit)
            if not candidates:
                return None, ()
            continue
        if entry is None:  # unreachable: decide never returns None
            break
        return entry.seq, candidates
    raise ConflictError(
        f"gc of {store.url} gave up: versions referencing its candidate blobs kept being published while it "
        "prepared its run. Run gc again (nothing was deleted)"
    )


def _end(store: Store, begin: int) -> int | None:
    """Append gc-end for the run opened at ``begin``, unless it is closed already; the gc-end's seq or None."""

    def decide(state: RegistryState) -> Change | None:
        return Change("gc-end", begin=begin) if begin in state.gc_runs else None

    entry, _ = store.registry.append(decide)
    return None if entry is None else entry.seq


def encode_candidate_set(digests: Iterable[Digest]) -> bytes:
    """The payload of a gc-begin: the canonical msgpack array of the digest strings, sorted."""
    return canonical.encode(sorted(str(d) for d in digests), where="gc candidate set")


def decode_candidate_set(data: bytes) -> frozenset[Digest]:
    """Inverse of :func:`encode_candidate_set`.

    Raises:
        FormatError: not an array of digest strings.
    """
    raw = canonical.decode(data, what="gc candidate set", max_bytes=_MAX_CANDIDATE_SET_BYTES)
    if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
        raise FormatError("a gc candidate set must be an array of digest strings")
    return frozenset(Digest.parse(d) for d in raw)


def _candidate_set(store: Store, payload: Descriptor) -> frozenset[Digest] | None:
    """The candidate set of a run, or None when its payload cannot be read (callers then assume the worst)."""
    with _cache_lock:
        if payload.digest in _candidate_sets:
            return _candidate_sets[payload.digest]
    try:
        found: frozenset[Digest] | None = decode_candidate_set(store.blobs.get(payload))
    except (NotFoundError, IntegrityError, FormatError):
        found = None
    with _cache_lock:
        if len(_candidate_sets) > 256:
            _candidate_sets.clear()
        _candidate_sets[payload.digest] = found
    return found


def _run_started(store: Store, seq: int) -> datetime:
    """The time written in the gc-begin entry at ``seq`` (entries are immutable, so remembered)."""
    key = (store.id, seq)
    with _cache_lock:
        if key in _run_times:
            return _run_times[key]
    started = parse_time(Entry.from_bytes(store.backend.read(log_key(seq)), seq=seq).time)
    with _cache_lock:
        _run_times[key] = started
    return started


def _expired(store: Store, seq: int, moment: datetime) -> bool:
    return moment >= _run_started(store, seq) + SWEEP_LEASE + CLOCK_SKEW


# -- the publisher side ----------------------------------------------------------------------------------------


class _PublishGuard:
    """Checks, against the state at the tip, that no gc run may have deleted a blob of the manifest since the
    confirm step (module docstring, point 3)."""

    def __init__(self, store: Store, manifest: Digest, before: RegistryState) -> None:
        self.store = store
        self.manifest = manifest
        self.before = before
        self.settled: set[int] = set()  # runs over whose blobs were confirmed afterwards, or that hold none of ours
        self._wanted: frozenset[Digest] | None = None

    def wanted(self) -> frozenset[Digest]:
        if self._wanted is None:
            manifest = self.store.manifest(self.manifest)
            self._wanted = frozenset({self.manifest, *(d.digest for d in manifest.references())})
        return self._wanted

    def check(self, state: RegistryState) -> None:
        runs = {**self.before.gc_runs, **state.gc_runs}
        if state.seq - self.before.seq >= 2:
            # A run that began and ended after the confirm is in neither state: find its gc-begin in the log.
            for entry in self.store.registry.entries(since=self.before.seq):
                if entry.op == "gc-begin" and entry.payload is not None:
                    runs[entry.seq] = entry.payload
        hits: dict[int, frozenset[Digest]] = {}
        for seq, payload in sorted(runs.items()):
            if seq in self.settled:
                continue
            candidates = _candidate_set(self.store, payload)
            hit = self.wanted() if candidates is None else self.wanted() & candidates
            if hit:
                hits[seq] = hit
            else:
                self.settled.add(seq)  # a run deletes only its candidates: it can never touch ours
        if hits:
            runs_text = ", ".join(str(s) for s in hits)
            raise SweepConflictError(
                f"gc run(s) {runs_text} of {self.store.url} may delete blobs this publish references",
                runs=tuple(hits),
                blobs=frozenset().union(*hits.values()),
            )


def guarded_publish(
    store: Store,
    decide: Decide,
    *,
    manifest: Digest,
    confirm: Callable[[], None],
    rewrite: Callable[[frozenset[Digest]], None] | None,
) -> tuple[Entry | None, RegistryState]:
    """Confirm a manifest's blobs, then append its publish entry so that no gc run can have deleted one of them
    (the publisher side of docs/format.md section 13.4).

    Args:
        store: the store.
        decide: the publish's decide; it runs at the tip before every attempt, followed by the gc check.
        manifest: the manifest being published.
        confirm: the confirm step (raises StorageError when a blob is missing).
        rewrite: puts the given blobs again from data in hand (a save); None when the caller has no data (push,
            pull, import): then the blobs must still be present once the runs are over.

    Raises:
        ConflictError: a gc run holding the blobs did not end within :data:`PUBLISH_WAIT_SECONDS`.
        StorageError: without ``rewrite``, a gc run deleted a blob the manifest needs (copy the model again).
        as ``decide`` and :meth:`~fracstore.registry.Registry.append`.
    """
    before = store.registry.refresh()  # n0: taken before the confirm, see the module docstring
    guard = _PublishGuard(store, manifest, before)
    _confirm_or_restore(store, guard, confirm, rewrite, frozenset())

    def checked(state: RegistryState) -> Change | None:
        change = decide(state)
        if change is not None:
            guard.check(state)
        return change

    while True:
        try:
            return store.registry.append(checked)
        except SweepConflictError as conflict:
            _wait_until_over(store, conflict)
            # The runs are over and delete nothing more: blobs confirmed from now on stay.
            _confirm_or_restore(store, guard, confirm, rewrite, conflict.blobs)
            guard.settled.update(conflict.runs)


def _confirm_or_restore(
    store: Store,
    guard: _PublishGuard,
    confirm: Callable[[], None],
    rewrite: Callable[[frozenset[Digest]], None] | None,
    blobs: frozenset[Digest],
) -> None:
    if rewrite is not None and blobs:
        missing = frozenset(d for d in blobs if not store.backend.exists(blob_key(d)))
        if missing:
            rewrite(missing)
    try:
        confirm()
    except (StorageError, NotFoundError) as exc:  # NotFoundError: the manifest itself is gone
        if rewrite is not None:
            # A sweep between this save's dedup and its confirm: the data is in hand, so write what is gone.
            rewrite(guard.wanted())
            confirm()
            return
        why = "a gc run deleted them while it was being published" if blobs else "a concurrent gc, or a damaged store"
        raise StorageError(
            f"blobs this model needs are missing from {store.url} ({why}: {exc}); nothing was published. Copy (push, "
            "pull or import) the model again: only the missing blobs are sent",
            store=store.url,
        ) from exc


def _wait_until_over(store: Store, conflict: SweepConflictError) -> None:
    deadline = time.monotonic() + PUBLISH_WAIT_SECONDS
    while True:
        state = store.registry.refresh()
        moment = _utcnow()
        open_runs = [s for s in conflict.runs if s in state.gc_runs and not _expired(store, s, moment)]
        if not open_runs:
            return
        if time.monotonic() > deadline:
            started = _run_started(store, open_runs[0])
            raise ConflictError(
                f"gc run {open_runs[0]} of {store.url} (started {started:%Y-%m-%d %H:%M:%S} UTC) may delete blobs "
                f"this model shares with deleted versions, and is still open after {PUBLISH_WAIT_SECONDS:.0f} s; "
                "nothing was published. Try again once it ends (a run whose process died expires "
                f"{SWEEP_LEASE + CLOCK_SKEW} after it started)"
            ) from conflict
        time.sleep(_POLL_SECONDS)


# -- retention -------------------------------------------------------------------------------------------------


def _selected(policy: RetentionPolicy, state: RegistryState, name: str, number: int, moment: datetime) -> bool:
    """Whether the policy deletes live version ``number`` of ``name`` in ``state``."""
    named = state.names.get(name)
    version = None if named is None else named.get(number)
    if named is None or version is None or version.deleted:
        return False
    tagged = number in named.tags.values()
    if policy.keep_tagged and tagged:
        return False
    if policy.keep_last is not None:
        newest = [v.version for v in named.live()][-policy.keep_last :] if policy.keep_last else []
        if number in newest:
            return False
    older = policy.delete_untagged_older_than
    return older is None or (not tagged and moment - parse_time(version.time) > older)


def apply_retention(
    store: Store,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    now: Callable[[], datetime] | None = None,
) -> RetentionReport:
    """Delete (tombstone) every live version the policy does not keep; a later :func:`collect` reclaims blobs.

    Each delete re-checks the policy against the state at the tip it extends, so a version tagged, or moved into
    the newest ``keep_last`` by another delete, in the meantime is kept.

    Args:
        store: the store.
        policy: what to keep.
        dry_run: report what would be deleted and write nothing.
        now: the clock for ``delete_untagged_older_than`` (tests pass a fake one).

    Raises:
        NotFoundError: a name in ``policy.names`` has never been published.
        ConflictError: other writers kept winning the race for the log.
    """
    moment = (now or _utcnow)()
    state = store.registry.refresh()
    names = policy.names or tuple(state.names)
    for name in names:
        if name not in state.names:
            raise NotFoundError(f"no model named {name!r} in {store.url}", what=name, store=store.url)
    planned = [
        (name, v.version)
        for name in names
        for v in state.names[name].live()
        if _selected(policy, state, name, v.version, moment)
    ]
    planned.sort(key=lambda p: state.names[p[0]].versions[p[1] - 1].seq)
    deleted: list[str] = []
    if dry_run:
        deleted = [f"{n}@{v}" for n, v in planned]
    else:
        for name, number in planned:

            def decide(tip: RegistryState, name: str = name, number: int = number) -> Change | None:
                if not _selected(policy, tip, name, number, moment):
                    return None
                return Change("delete", name=name, version=number)

            entry, state = store.registry.append(decide)
            if entry is not None:
                deleted.append(f"{name}@{number}")
    gone = set(deleted)
    kept = tuple(
        f"{name}@{v.version}" for name in names for v in state.names[name].live() if f"{name}@{v.version}" not in gone
    )
    return RetentionReport(store=store.url, dry_run=dry_run, deleted=tuple(deleted), kept=kept)
