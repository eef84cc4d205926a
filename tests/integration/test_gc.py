"""Garbage collection and retention on real local and memory:// stores (docs/format.md section 13).

Ages come from a fake clock (``now=``) that runs days ahead of the blobs' modification times; nothing sleeps for the
grace period. The publisher races are staged deterministically: a gc run is opened (or a whole sweep runs) at the
exact moment between a publish's confirm step and its log entry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from fracstore import FormatError, IntegrityError, StorageError, Store
from fracstore.digest import Digest
from fracstore.gc import RetentionPolicy, decode_candidate_set, encode_candidate_set
from fracstore.layout import blob_key, log_key
from fracstore.registry import Change
from tests.servers import StoreLocation

REPO = Path(__file__).resolve().parents[2]
BIG = 300_000  # float32 elements: 1.2 MB, above the 1 MiB pack threshold, so each such tensor is its own blob


def days_ahead(days: float) -> Callable[[], datetime]:
    """A clock ``days`` ahead of the real one: every blob written by the test looks that old."""
    return lambda: datetime.now(UTC) + timedelta(days=days)


def weights(seed: int) -> dict[str, torch.Tensor]:
    return {"big": torch.arange(BIG, dtype=torch.float32) + seed, "bias": torch.full((4,), float(seed))}


def blobs_of(store: Store) -> set[Digest]:
    return set(store.blobs.digests())


def referenced(store: Store, ref: str) -> set[Digest]:
    record = store.resolve(ref)
    return {record.digest, *(d.digest for d in store.manifest(record.digest).references())}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["local", "memory"])
def gc_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh store on a local disk, then in memory://."""
    if request.param == "local":
        yield Store.open(tmp_path / "store")
    else:
        location: StoreLocation = request.getfixturevalue("memory_location")
        yield Store.open(location.url)


# -- what is kept and what is deleted ----------------------------------------------------------------------------


def test_young_unreferenced_blobs_survive(gc_store: Store) -> None:
    gc_store.save(weights(1), name="m")
    gc_store.delete("m@1")
    before = blobs_of(gc_store)
    report = gc_store.gc(now=days_ahead(6))  # younger than the default 7 days
    assert report.candidates == () and report.blobs_deleted == 0 and report.bytes_freed == 0
    assert report.kept_young == len(before) and report.referenced == 0
    assert report.begin is None and report.end is None  # nothing to delete: nothing written
    assert blobs_of(gc_store) == before
    assert [e.op for e in gc_store.log()] == ["publish", "delete"]


def test_deleted_versions_are_reclaimed_and_shared_blobs_kept(gc_store: Store) -> None:
    shared = torch.arange(BIG, dtype=torch.float32) * 3
    old = {"shared": shared, "own": torch.arange(BIG, dtype=torch.float32) - 7, "bias": torch.zeros(4)}
    new = {"shared": shared, "own": torch.arange(BIG, dtype=torch.float32) + 7, "bias": torch.ones(4)}
    gc_store.save(old, name="m", history={"loss": [1.0, 0.5]}, files={"notes.txt": b"old notes"})
    gc_store.save(new, name="m")
    gc_store.save(weights(9), name="other")
    gc_store.tag("other@1", "prod")
    keep = referenced(gc_store, "m@2") | referenced(gc_store, "other:prod")
    gone = referenced(gc_store, "m@1") - keep
    gc_store.delete("m@1")
    assert len(gone) == 5  # manifest, own tensor, packed blob, history, file; not the shared tensor

    report = gc_store.gc(now=days_ahead(8))

    assert {c.digest for c in report.candidates} == gone
    assert report.blobs_deleted == len(gone) and report.kept_young == 0
    assert report.referenced == len(keep)
    assert report.bytes_freed == sum(c.size for c in report.candidates) > BIG * 4
    assert all(c.age >= timedelta(days=8) - timedelta(minutes=5) for c in report.candidates)
    assert blobs_of(gc_store) == keep | {report_payload(gc_store, report.begin)}
    assert same(gc_store.load("m@2"), new) and same(gc_store.load("other:prod"), weights(9))
    assert gc_store.verify().problems == ()


def report_payload(store: Store, begin: int | None) -> Digest:
    assert begin is not None
    entry = store.log()[begin - 1]
    assert entry.op == "gc-begin" and entry.payload is not None
    return entry.payload.digest


def test_referenced_blobs_are_never_candidates(gc_store: Store) -> None:
    for seed in range(3):
        gc_store.save(weights(seed), name="m")
    before = blobs_of(gc_store)
    report = gc_store.gc(grace=timedelta(0), now=days_ahead(365))
    assert report.candidates == () and report.referenced == len(before)
    assert blobs_of(gc_store) == before


def test_an_old_orphan_among_young_ones(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    store.save(weights(1), name="m")
    store.save(weights(2), name="m")
    store.delete("m@1", all_versions=True)
    orphans = sorted(blobs_of(store), key=lambda d: d.hex)
    aged = orphans[0]
    path = store.backend.local_path(blob_key(aged))
    assert path is not None
    ten_days_ago = time.time() - 10 * 86400
    os.utime(path, (ten_days_ago, ten_days_ago), follow_symlinks=False)
    report = store.gc()  # the real clock
    assert [c.digest for c in report.candidates] == [aged]
    assert report.kept_young == len(orphans) - 1
    assert blobs_of(store) == (set(orphans) - {aged}) | {report_payload(store, report.begin)}


# -- dry run and the log -------------------------------------------------------------------------------------------


def test_dry_run_lists_exactly_what_a_real_run_deletes_and_writes_nothing(gc_store: Store) -> None:
    gc_store.save(weights(1), name="m")
    gc_store.save(weights(2), name="m")
    gc_store.save(weights(3), name="n")
    gc_store.delete("m@1")
    clock = days_ahead(30)
    log_before = [e.to_bytes() for e in gc_store.log()]
    blobs_before = {d: gc_store.backend.size(blob_key(d)) for d in blobs_of(gc_store)}

    dry = gc_store.gc(dry_run=True, now=clock)

    assert dry.dry_run and dry.begin is None and dry.end is None and dry.candidates
    assert [e.to_bytes() for e in gc_store.log()] == log_before
    assert {d: gc_store.backend.size(blob_key(d)) for d in blobs_of(gc_store)} == blobs_before
    assert dry.bytes_freed == sum(c.size for c in dry.candidates)
    assert all(c.size == blobs_before[c.digest] for c in dry.candidates)

    real = gc_store.gc(now=clock)

    assert [(c.digest, c.size) for c in real.candidates] == [(c.digest, c.size) for c in dry.candidates]
    assert real.bytes_freed == dry.bytes_freed and real.blobs_deleted == dry.blobs_deleted
    assert real.referenced == dry.referenced and real.kept_young == dry.kept_young
    assert set(blobs_before) - blobs_of(gc_store) == {c.digest for c in dry.candidates}


def test_the_log_records_the_run_with_a_readable_candidate_set(gc_store: Store) -> None:
    gc_store.save(weights(1), name="m")
    gc_store.save(weights(2), name="m")
    gc_store.delete("m@1")
    report = gc_store.gc(now=days_ahead(8))
    assert report.begin == 4 and report.end == 5
    begin, end = gc_store.log()[3:]
    assert begin.op == "gc-begin" and begin.name is None and begin.payload is not None
    assert end.op == "gc-end" and end.begin == begin.seq
    payload = gc_store.blobs.get(begin.payload)
    assert payload == encode_candidate_set(c.digest for c in report.candidates)
    assert decode_candidate_set(payload) == {c.digest for c in report.candidates}
    assert gc_store.registry.refresh().gc_runs == {}
    # The payload outlives its run until a later gc (after the grace period) reclaims it.
    again = gc_store.gc(now=days_ahead(8))
    assert [c.digest for c in again.candidates] == [begin.payload.digest]


# -- gc stops on what it cannot read ----------------------------------------------------------------------------------


def test_a_corrupt_manifest_stops_gc_and_deletes_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    store.save(weights(1), name="m")
    store.save(weights(2), name="n")
    store.delete("n@1")
    path = store.backend.local_path(blob_key(store.resolve("m").digest))
    assert path is not None
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    before = blobs_of(store)
    fresh = Store.open(tmp_path / "store")  # no manifest remembered in memory
    with pytest.raises(IntegrityError, match="gc stopped before deleting anything"):
        fresh.gc(now=days_ahead(30))
    with pytest.raises(IntegrityError):
        fresh.gc(dry_run=True, now=days_ahead(30))
    assert blobs_of(fresh) == before
    assert [e.op for e in fresh.log()] == ["publish", "publish", "delete"]


def test_a_missing_manifest_stops_gc(tmp_path: Path) -> None:
    # Local only: a remote store's manifest may still be readable from the local cache, which is as good for
    # marking (its references are known, so nothing it references looks unreferenced).
    store = Store.open(tmp_path / "store")
    store.save(weights(1), name="m")
    store.backend.delete(blob_key(store.resolve("m").digest))
    fresh = Store.open(tmp_path / "store")
    with pytest.raises(IntegrityError, match="cannot be read"):
        fresh.gc(now=days_ahead(30))
    assert len(blobs_of(store)) == 2


def test_an_unreadable_log_stops_gc_and_deletes_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    store.save(weights(1), name="m")
    store.save(weights(2), name="m")
    store.delete("m@1")
    path = store.backend.local_path(log_key(2))
    assert path is not None
    path.chmod(0o644)
    path.write_bytes(b"\xc1 not msgpack")
    before = blobs_of(store)
    fresh = Store.open(tmp_path / "store")
    with pytest.raises((IntegrityError, FormatError)):
        fresh.gc(now=days_ahead(30))
    assert blobs_of(fresh) == before


# -- the publisher side ----------------------------------------------------------------------------------------------


def open_run(store: Store, digests: set[Digest]) -> int:
    """Append a gc-begin for ``digests`` (as a sweeper does) and delete them; returns its seq."""
    payload, _ = store.blobs.put_bytes(encode_candidate_set(digests))
    entry, _ = store.registry.append(lambda _state: Change("gc-begin", payload=payload))
    assert entry is not None
    for digest in digests:
        store.backend.delete(blob_key(digest))
    return entry.seq


def test_a_save_onto_a_candidate_of_an_open_run_waits_and_reuploads(gc_store: Store) -> None:
    gc_store.save(weights(1), name="m")
    gc_store.delete("m@1")
    candidates = {c.digest for c in gc_store.gc(dry_run=True, now=days_ahead(8)).candidates}
    # The big tensor blob and the packed blob; the manifest differs (created_at), so it is not shared.
    begin = open_run(gc_store, candidates)
    saved: list[Any] = []
    saver = threading.Thread(target=lambda: saved.append(gc_store.save(weights(1), name="m")))
    saver.start()
    time.sleep(0.5)
    assert saver.is_alive(), "the save committed while the run could still delete its blobs"
    assert [e.op for e in gc_store.log()][-1] == "gc-begin"
    gc_store.registry.append(lambda _state: Change("gc-end", begin=begin))
    saver.join(timeout=30)
    assert not saver.is_alive() and saved
    assert saved[0].version == 2
    assert same(gc_store.load("m@2"), weights(1))
    assert referenced(gc_store, "m@2") <= blobs_of(gc_store)
    assert gc_store.verify().problems == ()


def test_a_sweep_between_confirm_and_publish_is_repaired_by_the_save(
    gc_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc_store.save(weights(1), name="m")
    gc_store.delete("m@1")
    confirm = gc_store._confirm
    swept: list[Any] = []

    def confirm_then_sweep(*args: Any) -> None:
        confirm(*args)
        if not swept:
            # A whole gc run, from gc-begin to gc-end, lands right after the save confirmed its blobs: with the
            # clock 8 days ahead it sweeps the blobs this save deduplicated onto, and even its new manifest.
            swept.append(gc_store.gc(now=days_ahead(8)))

    monkeypatch.setattr(gc_store, "_confirm", confirm_then_sweep)
    saved = gc_store.save(weights(1), name="m")
    assert swept and swept[0].blobs_deleted >= 3
    assert swept[0].candidates and {c.digest for c in swept[0].candidates} & referenced(gc_store, saved.ref)
    assert [e.op for e in gc_store.log()] == ["publish", "delete", "gc-begin", "gc-end", "publish"]
    assert referenced(gc_store, saved.ref) <= blobs_of(gc_store)
    fresh = Store(gc_store.backend, store_id=gc_store.id, options=gc_store.options)
    assert same(fresh.load(saved.ref), weights(1))
    assert fresh.verify().problems == ()


def test_a_push_onto_swept_blobs_commits_nothing_and_a_retry_succeeds(
    tmp_path: Path, memory_location: StoreLocation, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Store.open(tmp_path / "source")
    destination = Store.open(memory_location.url)
    source.save(weights(5), name="m")
    source.push(destination, "m")
    destination.delete("m@1")  # the blobs stay in the destination, unreferenced
    confirm = destination._confirm
    swept: list[Any] = []

    def confirm_then_sweep(*args: Any) -> None:
        confirm(*args)
        if not swept:
            swept.append(destination.gc(now=days_ahead(8)))

    monkeypatch.setattr(destination, "_confirm", confirm_then_sweep)
    with pytest.raises(StorageError, match="blobs this model needs are missing"):
        source.push(destination, "m")
    assert swept and swept[0].blobs_deleted >= 3
    assert [e.op for e in destination.log()] == ["publish", "delete", "gc-begin", "gc-end"]
    source.push(destination, "m")  # only the missing blobs are sent again
    assert same(destination.load("m"), weights(5))
    assert destination.verify().problems == ()


def test_a_push_onto_a_candidate_of_an_open_run_waits_for_its_end(
    tmp_path: Path, memory_location: StoreLocation
) -> None:
    source = Store.open(tmp_path / "source")
    destination = Store.open(memory_location.url)
    source.save(weights(5), name="m")
    source.push(destination, "m")
    destination.delete("m@1")
    candidates = {c.digest for c in destination.gc(dry_run=True, now=days_ahead(8)).candidates}
    begin = open_run(destination, candidates)
    errors: list[BaseException] = []

    def push() -> None:
        try:
            source.push(destination, "m")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    pusher = threading.Thread(target=push)
    pusher.start()
    time.sleep(0.5)
    assert pusher.is_alive()
    destination.registry.append(lambda _state: Change("gc-end", begin=begin))
    pusher.join(timeout=30)
    assert not pusher.is_alive() and errors == []
    assert same(destination.load("m"), weights(5))
    assert destination.verify().problems == ()


# -- retention ---------------------------------------------------------------------------------------------------------


def five_versions(store: Store) -> None:
    for seed in range(1, 6):
        store.save(weights(seed), name="m")
    store.save(weights(10), name="n")
    store.tag("m@2", "prod")


def test_retention_keep_last_spares_tagged_versions(gc_store: Store) -> None:
    five_versions(gc_store)
    policy = RetentionPolicy(keep_last=2, names=("m",))
    dry = gc_store.apply_retention(policy, dry_run=True)
    assert dry.deleted == ("m@1", "m@3") and dry.kept == ("m@2", "m@4", "m@5")
    assert [e.op for e in gc_store.log()].count("delete") == 0
    real = gc_store.apply_retention(policy)
    assert real.deleted == dry.deleted and real.kept == dry.kept
    assert [r.ref for r in gc_store.list()] == ["m@2", "m@4", "m@5", "n@1"]
    # Then gc reclaims the deleted versions' blobs.
    report = gc_store.gc(now=days_ahead(8))
    assert report.blobs_deleted == 2 * 3  # manifest, big tensor, packed blob of each
    assert same(gc_store.load("m:prod"), weights(2))


def test_retention_without_keep_tagged_and_across_names(gc_store: Store) -> None:
    five_versions(gc_store)
    report = gc_store.apply_retention(RetentionPolicy(keep_last=1, keep_tagged=False))
    assert report.deleted == ("m@1", "m@2", "m@3", "m@4")
    assert [r.ref for r in gc_store.list()] == ["m@5", "n@1"]
    assert gc_store.registry.refresh().names["m"].tags == {}


def test_retention_deletes_untagged_versions_older_than(gc_store: Store) -> None:
    five_versions(gc_store)
    policy = RetentionPolicy(delete_untagged_older_than=timedelta(days=7))
    assert gc_store.apply_retention(policy).deleted == ()  # everything is young
    report = gc_store.apply_retention(policy, now=days_ahead(10))
    assert report.deleted == ("m@1", "m@3", "m@4", "m@5", "n@1")
    assert [r.ref for r in gc_store.list()] == ["m@2"]
    combined = RetentionPolicy(keep_last=3, delete_untagged_older_than=timedelta(days=7))
    gc_store.save(weights(6), name="m")
    assert gc_store.apply_retention(combined, now=days_ahead(10)).deleted == ()  # m@6 is among the last 3


def test_retention_policies_are_validated(gc_store: Store) -> None:
    with pytest.raises(ValueError, match="needs keep_last"):
        RetentionPolicy()
    with pytest.raises(ValueError, match="keep_last"):
        RetentionPolicy(keep_last=-1)
    with pytest.raises(ValueError, match="tuple"):
        RetentionPolicy(keep_last=1, names="m")  # type: ignore[arg-type]
    with pytest.raises(LookupError, match="no model named"):
        gc_store.apply_retention(RetentionPolicy(keep_last=1, names=("nope",)))


# -- a killed sweeper --------------------------------------------------------------------------------------------------

_KILLED_SWEEPER = """
import sys, time
from datetime import UTC, datetime, timedelta
from fracstore import Store
from fracstore.backend import Backend

real_delete = Backend.delete

def slow_delete(self, key):
    result = real_delete(self, key)
    if key.startswith("blobs/"):  # not the capability probe's clean-up
        print("deleting", flush=True)
        time.sleep(600)
    return result

Backend.delete = slow_delete
Store.open(sys.argv[1]).gc(now=lambda: datetime.now(UTC) + timedelta(days=8))
"""


def test_a_killed_sweeper_leaves_a_loadable_store_and_a_later_gc_completes(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    store.save(weights(1), name="m")
    store.save(weights(2), name="m")
    store.save(weights(3), name="n")
    store.delete("m@1")
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SWEEPER, str(tmp_path / "store")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # bounded: the child deletes once, then sleeps until killed
        assert line.strip() == "deleting", child.stderr.read() if child.stderr else ""
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL

    fresh = Store.open(tmp_path / "store")
    state = fresh.registry.refresh()
    (stale,) = state.gc_runs
    assert [e.op for e in fresh.log()][-1] == "gc-begin"
    assert same(fresh.load("m@2"), weights(2)) and same(fresh.load("n"), weights(3))
    assert fresh.verify().problems == ()

    # A later gc (past the stale run's lease) sweeps what is left and closes the stale run.
    late = days_ahead(8)
    report = fresh.gc(now=late)
    assert report.begin is not None and report.end is not None
    assert report.runs_closed == (stale,)
    assert fresh.registry.refresh().gc_runs == {}
    assert [r.ref for r in fresh.list()] == ["m@2", "n@1"]
    assert same(fresh.load("m@2"), weights(2)) and same(fresh.load("n"), weights(3))
    assert fresh.verify().problems == ()


def test_gc_marks_from_the_log_not_from_a_forged_replay_cache(store_path: Path, isolated_cache: Path) -> None:
    from fracstore import canonical

    store = Store.open(store_path)
    store.save(weights(1), name="kept")
    store.save(weights(2), name="other")
    needed = referenced(store, "kept")
    # A replay cache whose tip digest is right but whose content lost a live model (a damaged or forged file).
    cache_file = isolated_cache / "stores" / store.id / "registry.msgpack"
    state = Store.open(store_path).registry.refresh().to_dict()  # a reader that replayed writes the cache
    assert cache_file.is_file()
    raw = canonical.decode(cache_file.read_bytes(), what="replay cache", max_bytes=1 << 24)
    assert raw["seq"] == state["seq"]
    raw["names"] = {k: v for k, v in raw["names"].items() if k != "kept"}
    cache_file.write_bytes(canonical.encode(raw))
    fresh = Store.open(store_path)
    report = fresh.gc(grace=timedelta(days=1), now=days_ahead(30))
    assert not needed & {c.digest for c in report.candidates}
    # The log itself still says "kept" is live, and its data survived the sweep.
    assert same(Store.open(store_path, cache_dir=store_path.parent / "other-cache").load("kept"), weights(1))
