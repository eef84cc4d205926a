"""The registry: reading and appending the store's log (DESIGN.md section 4).

*Append* creates ``log/<tip+1>`` with put-if-absent; that create is both the lock and the commit. A writer that
loses the race re-reads the new entries, re-checks its operation's preconditions against them and tries again at the
new tip with jittered backoff, a bounded number of times. An append whose outcome is unknown (a timeout, a 5xx, a
retried request that had landed) is resolved by reading the entry back and comparing the writer's commit id, so a
write that landed is never reported as failed nor written twice.

*Reading* starts from the best known state: this object's memory, the replay state cached in the local cache folder,
or the newest checkpoint in the store. A starting state is trusted only after the log entry it ends at is read back
and hashes to the state's tip. Then ``log/<n+1>``, ``log/<n+2>``, ... are read until one is missing, so a reader
that has replayed to n pays only for the entries after n.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from . import canonical
from .backend import Backend
from .config import StoreOptions
from .digest import Descriptor, Digest
from .errors import (
    ConflictError,
    FormatError,
    IntegrityError,
    NotFoundError,
    OfflineError,
    OutcomeUnknownError,
    StorageError,
)
from .layout import CHECKPOINT_POINTER_KEY, CHECKPOINTS_PREFIX, checkpoint_key, log_key, seq_from_key
from .localfiles import read_cached, write_cached
from .manifest import now
from .registry_state import Entry, RegistryState, Writer

_MAX_STATE_BYTES = 256 * 1024 * 1024
_READ_BACK_ATTEMPTS = 4  # reads of an entry whose write outcome is unknown (0.2 + 0.4 + 0.8 s of waits)
_CACHE_EVERY = 64  # own appends between rewrites of the replay cache
_MAX_FAILED_CREATES = 3  # storage errors with nothing landed, per append, before the error is raised


@dataclass(frozen=True, slots=True)
class Change:
    """What an operation wants to append, as decided against the state at the tip (see :meth:`Registry.append`):
    the fields of an :class:`~fracstore.registry_state.Entry` other than where, when and by whom."""

    op: str
    name: str | None = None
    manifest: Digest | None = None
    version: int | None = None
    tag: str | None = None
    payload: Descriptor | None = None
    begin: int | None = None


# Decide the change to append given the state at the tip, or None when the operation has already taken effect
# (an idempotent retry). Raise to refuse (a failed precondition).
Decide = Callable[[RegistryState], Change | None]


class Registry:
    """The registry log of one store.

    Args:
        backend: the store's backend.
        options: the store's options (checkpoint interval, append attempts).
        state_cache: file for the replayed state in the local cache, or None.
        sleep: how to wait between attempts (tests pass a fake).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        options: StoreOptions,
        state_cache: Path | None,
        sleep: Callable[[float], None] = time.sleep,
        offline: bool = False,
    ) -> None:
        self.backend = backend
        self.offline = offline
        self.options = options
        self._state_cache = state_cache
        self._sleep = sleep
        self._state: RegistryState | None = None
        self._snapshot: RegistryState | None = None
        self._cached_seq = 0
        self._lock = threading.RLock()
        self._host = socket.gethostname()
        self._failed_creates = 0

    # -- reading ----------------------------------------------------------------------------------------------

    def refresh(self) -> RegistryState:
        """Replay the log up to its current tip and return the state.

        The returned state is a snapshot shared by every caller until the log moves on: treat it as read-only.

        Raises:
            IntegrityError: the hash chain is broken.
            FormatError: an entry cannot be decoded.
            StorageError: the backend failed.
        """
        with self._lock:
            if self.offline:
                return self._offline_state()
            state = self._state if self._state is not None else self._starting_state()
            start = state.seq
            self._read_forward(state)
            self._state = state
            if state.seq != start:
                self._save_state_cache(state)
            return self._snapshot_of(state)

    def _offline_state(self) -> RegistryState:
        # Offline, the state replayed when the store was last read online is all there is (DESIGN.md section 6).
        state = self._state if self._state is not None else self._load_state_cache()
        if state is None:
            raise OfflineError(
                f"{self.backend.url} is opened offline, but its registry was never read on this machine (nothing is "
                "cached for it). Open it online once",
                store=self.backend.url,
            )
        self._state = state
        return self._snapshot_of(state)

    def _snapshot_of(self, state: RegistryState) -> RegistryState:
        # Copying is O(state); most refreshes find nothing new, so one copy per log position is shared.
        if self._snapshot is None or self._snapshot.seq != state.seq:
            self._snapshot = state.snapshot()
        return self._snapshot

    def _read_forward(self, state: RegistryState) -> None:
        for entry, digest in self._log_after(state.seq, state.tip):
            state.apply(entry, digest)

    def _log_after(self, seq: int, tip: Digest | None) -> Iterator[tuple[Entry, Digest]]:
        """Entries ``seq + 1``, ``seq + 2``, ... with the digests of their bytes, until the first missing one,
        checking that each chains to the one before (``tip`` is the digest of entry ``seq``) and that the end of
        the log is not a hole.

        Raises:
            IntegrityError: a broken chain or a hole.
            FormatError: an entry cannot be decoded.
        """
        while True:
            seq += 1
            try:
                data = self.backend.read(log_key(seq))
            except NotFoundError:
                self._check_end(seq)
                return
            entry = Entry.from_bytes(data, seq=seq)
            if entry.prev != tip:
                raise IntegrityError(
                    f"registry log entry {seq} of {self.backend.url} does not chain to entry {seq - 1} (its prev is "
                    f"{entry.prev}, entry {seq - 1} hashes to {tip}): the log was rewritten or an entry removed",
                    key=log_key(seq),
                    expected=str(tip),
                    actual=str(entry.prev),
                    store=self.backend.url,
                )
            tip = Digest.of(data)
            yield entry, tip

    def _check_end(self, missing: int) -> None:
        """Refuse a log whose end is a hole: an entry after the first missing one means entries were removed.

        One extra read catches the removal of a single entry (the common damage: a sync tool or a hand-deleted
        file); a full listing would catch every removal but costs O(history) on every refresh.
        """
        # Re-read the missing entry after seeing its successor: writers may have created both in between.
        if self.backend.exists(log_key(missing + 1)) and not self.backend.exists(log_key(missing)):
            raise IntegrityError(
                f"registry log of {self.backend.url} has entry {missing + 1} but no entry {missing}: entries were "
                "removed. Restore the missing log entry from a copy of the store; do not write to this store meanwhile",
                key=log_key(missing),
                store=self.backend.url,
            )

    def _starting_state(self) -> RegistryState:
        for candidate in (self._load_state_cache, self._load_checkpoint):
            state = candidate()
            if state is not None and self._tip_matches(state):
                self._cached_seq = state.seq if candidate == self._load_state_cache else 0
                return state
        return RegistryState()

    def _tip_matches(self, state: RegistryState) -> bool:
        if state.seq == 0:
            return True
        try:
            return Digest.of(self.backend.read(log_key(state.seq))) == state.tip
        except NotFoundError:
            return False

    def _load_checkpoint(self) -> RegistryState | None:
        try:
            pointer = canonical.decode(
                self.backend.read(CHECKPOINT_POINTER_KEY), what="checkpoint pointer", max_bytes=4096
            )
            seq = int(pointer["seq"])
        except (NotFoundError, FormatError, KeyError, TypeError, ValueError):
            # The pointer is advisory; without it, the newest checkpoint listed is as good.
            keys = self.backend.list(CHECKPOINTS_PREFIX)
            seqs = [s for s in (_try_seq(k) for k in keys) if s is not None]
            if not seqs:
                return None
            seq = max(seqs)
        try:
            raw = canonical.decode(
                self.backend.read(checkpoint_key(seq)), what="checkpoint", max_bytes=_MAX_STATE_BYTES
            )
            state = RegistryState.from_dict(raw)
        except (NotFoundError, FormatError):
            return None
        return state if state.seq == seq else None

    def _load_state_cache(self) -> RegistryState | None:
        data = None if self._state_cache is None else read_cached(self._state_cache)
        if data is None:
            return None
        try:
            return RegistryState.from_dict(canonical.decode(data, what="replay cache", max_bytes=_MAX_STATE_BYTES))
        except FormatError:
            return None  # the cache is only an optimisation

    def _save_state_cache(self, state: RegistryState, *, lazily: bool = False) -> None:
        # After this process's own appends, rewrite the cache (O(state)) only every so often: the next reader
        # replays the few entries since from the log, which is what the cache saves it from for long histories.
        if lazily and state.seq - self._cached_seq < _CACHE_EVERY:
            return
        self._cached_seq = state.seq
        if self._state_cache is not None:
            with contextlib.suppress(OSError):
                write_cached(self._state_cache, canonical.encode(state.to_dict()))

    # -- appending --------------------------------------------------------------------------------------------

    def append(self, decide: Decide) -> tuple[Entry | None, RegistryState]:
        """Append the entry ``decide`` asks for at the tip, retrying after lost races.

        ``decide`` runs against the state at the tip before every attempt, so its precondition checks are
        linearizable with the append. It returns None when the operation has already taken effect.

        Returns:
            the appended entry (None when nothing was appended) and the state including it.

        Raises:
            ConflictError: lost the race ``append_attempts`` times.
            UnsupportedBackendError: the backend cannot create atomically.
            whatever ``decide`` raises.
        """
        self.backend.probe_atomic_create()
        commit = secrets.token_hex(8)
        writer = Writer(self._host, os.getpid(), commit)
        with self._lock:
            self._failed_creates = 0
            for attempt in range(self.options.append_attempts):
                state = self.refresh()
                if commit in state.commits:  # an earlier attempt landed after all (unknown outcome)
                    return self._entry_at(state.commits[commit]), state
                change = decide(state)
                if change is None:
                    return None, state
                what = {f.name: getattr(change, f.name) for f in fields(change)}
                entry = Entry(seq=state.seq + 1, time=now(), writer=writer, prev=state.tip, **what)
                data = entry.to_bytes()
                if self._create(entry, data):
                    return entry, self._applied(entry, data)
                self._sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))
        raise ConflictError(
            f"gave up appending to the registry of {self.backend.url} after {self.options.append_attempts} attempts: "
            "other writers kept winning the race. Try again; raise append_attempts if this store is very busy."
        )

    def _create(self, entry: Entry, data: bytes) -> bool:
        """Put-if-absent ``entry`` (encoded as ``data``); True when it is in the log now. Resolves unknown outcomes
        by reading back."""
        key = log_key(entry.seq)
        try:
            if self.backend.put_if_absent(key, data):
                return True
        except StorageError:
            landed = self._read_back(entry)
            if landed is None:
                # Nothing landed. A transient error is worth the loop's retry; the same error every time is not a
                # lost race, so it surfaces as itself rather than as a ConflictError after every attempt.
                self._failed_creates += 1
                if self._failed_creates >= _MAX_FAILED_CREATES:
                    raise
                return False
            return landed == data
        # "Exists" may be our own write landing twice (a client that retried a request that had succeeded).
        return self._read_back(entry) == data

    def _read_back(self, entry: Entry) -> bytes | None:
        """The bytes now at ``entry``'s key, or None. Retried a few times: giving up here leaves the outcome of a
        write unknown, which costs the caller far more than a short wait."""
        key = log_key(entry.seq)
        for attempt in range(_READ_BACK_ATTEMPTS):
            try:
                return self.backend.read(key)
            except NotFoundError:
                return None
            except StorageError as exc:
                if attempt + 1 == _READ_BACK_ATTEMPTS:
                    raise OutcomeUnknownError(
                        f"writing registry entry {entry.seq} ({entry.op} {entry.name or ''}) to {self.backend.url} "
                        f"failed, and reading it back failed too ({exc}), so whether it was applied is unknown. Once "
                        f"the store is reachable, check store.log() for an entry with commit {entry.writer.commit} "
                        "at that position before running the operation again",
                        key=key,
                        store=self.backend.url,
                        seq=entry.seq,
                        commit=entry.writer.commit,
                    ) from exc
                self._sleep(0.2 * 2**attempt)
        return None  # unreachable: the loop returns or raises

    def _applied(self, entry: Entry, data: bytes) -> RegistryState:
        state = self._state if self._state is not None else RegistryState()
        if state.seq == entry.seq - 1:
            state.apply(entry, Digest.of(data))
            if entry.seq % self.options.checkpoint_interval == 0:
                self._write_checkpoint(state)
        self._state = state
        self._read_forward(state)
        # A remote store opened offline later has only this cache to go by, so it must include this process's own
        # appends; a local store is always at hand, and rewriting the cache only now and then keeps appends O(1).
        self._save_state_cache(state, lazily=self.backend.is_local)
        return self._snapshot_of(state)

    def _entry_at(self, seq: int) -> Entry:
        return Entry.from_bytes(self.backend.read(log_key(seq)), seq=seq)

    def _write_checkpoint(self, state: RegistryState) -> None:
        """Record ``state`` (which ends exactly at the boundary entry this writer created) as a checkpoint."""
        with contextlib.suppress(StorageError, FormatError):
            # Advisory: a failure costs readers a longer replay, never correctness.
            self.backend.put_if_absent(checkpoint_key(state.seq), canonical.encode(state.to_dict()))
            self.backend.put_overwrite(CHECKPOINT_POINTER_KEY, canonical.encode({"seq": state.seq}))

    def replay_from_start(self) -> RegistryState:
        """The state replayed from the first log entry, trusting no checkpoint and no cache (what a destructive
        operation such as gc marks from: a decodable but wrong cached state must not make live blobs look
        unreferenced). Costs O(history).

        Raises:
            IntegrityError, FormatError: the log is damaged.
        """
        state = RegistryState()
        for entry, digest in self._log_after(0, None):
            state.apply(entry, digest)
        return state

    # -- reading entries for humans ---------------------------------------------------------------------------

    def entries(self, *, since: int = 0) -> list[Entry]:
        """Every log entry after ``since``, in order, verifying the chain from there.

        Raises:
            IntegrityError: the chain is broken.
        """
        tip = Digest.of(self.backend.read(log_key(since))) if since > 0 else None
        return [entry for entry, _ in self._log_after(since, tip)]


def _try_seq(key: str) -> int | None:
    try:
        return seq_from_key(key, CHECKPOINTS_PREFIX)
    except FormatError:
        return None
