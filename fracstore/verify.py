"""Checking a store's health: the registry log, every live version's manifest, and every blob they reference.

``verify`` reads the whole log (the hash chain and the end-of-log check of the registry reader), then the manifest
of every live version, then confirms each referenced blob: present with its size (on a local disk also re-hashed
when its file changed since it was last hashed), or with ``read_data`` re-hashed from the store's own copy (never
from the local cache). Problems are collected, not raised, so one run
reports everything that is wrong; an unreadable log is reported and ends the run (nothing after it can be trusted).
Blobs no live version references are counted (a crash or a delete leaves them; gc reclaims them), not reported.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .digest import Descriptor, Digest
from .errors import FormatError, IntegrityError, NotFoundError

if TYPE_CHECKING:
    from .store import Store

_CHECK_THREADS = 16


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing ``verify`` found wrong.

    Attributes:
        kind: ``"log"``, ``"manifest"``, ``"missing-blob"`` or ``"corrupt-blob"``.
        subject: what is wrong (a log position, ``name@version``, a digest).
        message: what was found and what to do.
    """

    kind: str
    subject: str
    message: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify`` checked and found.

    Attributes:
        store: the store URL (without credentials).
        entries_checked: log entries read, hash chain checked.
        versions_checked: live versions whose manifest was read.
        blobs_checked: distinct blobs referenced by them, confirmed (or re-hashed with ``read_data``).
        bytes_checked: their total size.
        unreferenced_blobs: blobs in the store no live version references (listed only when it is cheap to ask:
            -1 when not counted).
        read_data: whether blob contents were re-hashed.
        problems: everything found wrong; empty means healthy.
    """

    store: str
    entries_checked: int
    versions_checked: int
    blobs_checked: int
    bytes_checked: int
    unreferenced_blobs: int
    read_data: bool
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def verify_store(store: Store, *, read_data: bool = False, count_unreferenced: bool = True) -> VerifyReport:
    """Check ``store`` (see the module docstring).

    Args:
        read_data: re-hash every referenced blob (reads all the data; on a remote store, downloads it).
        count_unreferenced: list the store's blobs to count those no live version references.

    Raises:
        StorageError: the store cannot be read at all (problems with single objects are reported instead).
    """
    problems: list[Problem] = []
    try:
        entries = store.registry.entries()
    except (IntegrityError, FormatError, NotFoundError) as exc:
        problems.append(Problem("log", "registry log", f"{exc}"))
        return VerifyReport(store.url, 0, 0, 0, 0, -1, read_data, tuple(problems))
    state = store.registry.refresh()
    wanted: dict[Digest, Descriptor] = {}
    users: dict[Digest, str] = {}
    versions = 0
    for name, named in sorted(state.names.items()):
        for version in named.live():
            versions += 1
            ref = f"{name}@{version.version}"
            try:
                manifest = store.manifest(version.manifest)
                size = store.blobs.size_of(version.manifest)
            except (IntegrityError, FormatError, NotFoundError) as exc:
                problems.append(Problem("manifest", ref, f"{exc}"))
                continue
            for descriptor in (*manifest.references(), Descriptor(version.manifest, size)):
                wanted.setdefault(descriptor.digest, descriptor)
                users.setdefault(descriptor.digest, ref)
    check: Callable[[Descriptor], Problem | None] = _rehash(store) if read_data else _confirm(store)
    blobs = sorted(wanted.values(), key=lambda d: d.digest.hex)
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS, thread_name_prefix="fracstore-verify") as pool:
        for descriptor, problem in zip(blobs, pool.map(check, blobs), strict=True):
            if problem is not None:
                used_by = f"{problem.message} (used by {users[descriptor.digest]})"
                problems.append(Problem(problem.kind, problem.subject, used_by))
    unreferenced = -1
    if count_unreferenced:
        unreferenced = sum(1 for digest in store.blobs.digests() if digest not in wanted)
    return VerifyReport(
        store=store.url,
        entries_checked=len(entries),
        versions_checked=versions,
        blobs_checked=len(blobs),
        bytes_checked=sum(d.size for d in blobs),
        unreferenced_blobs=unreferenced,
        read_data=read_data,
        problems=tuple(problems),
    )


def _confirm(store: Store) -> Callable[[Descriptor], Problem | None]:
    def check(descriptor: Descriptor) -> Problem | None:
        if store.backend.is_local:
            # On a local disk the verified-state record makes this cheap and exact: a file whose stat changed since
            # it was last hashed is re-hashed now.
            try:
                store.blobs.verified_file(descriptor)
            except IntegrityError as exc:
                return Problem("corrupt-blob", str(descriptor.digest), f"{exc}")
            except NotFoundError:
                pass  # reported below
            else:
                return None
        try:
            size = store.blobs.size_of(descriptor.digest)
        except NotFoundError:
            return Problem(
                "missing-blob",
                str(descriptor.digest),
                f"blob {descriptor.digest} is missing from {store.url}; push the model again from a store that has it",
            )
        if size != descriptor.size:
            return Problem(
                "corrupt-blob",
                str(descriptor.digest),
                f"blob {descriptor.digest} has {size} bytes in {store.url}, expected {descriptor.size}",
            )
        return None

    return check


def _rehash(store: Store) -> Callable[[Descriptor], Problem | None]:
    def check(descriptor: Descriptor) -> Problem | None:
        try:
            store.blobs.verify(descriptor)
        except NotFoundError:
            return _confirm(store)(descriptor)
        except IntegrityError as exc:
            return Problem("corrupt-blob", str(descriptor.digest), f"{exc}")
        return None

    return check
