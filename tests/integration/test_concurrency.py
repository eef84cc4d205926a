"""Concurrent writers and readers on one local store: threads, spawned processes, tag compare-and-set, checkpoints.

Every writer is a real OS thread or process on a real folder; the assertions are those of DESIGN.md section 4:
versions are derived from log order (1..N, no gap, each publish once), the hash chain stays intact, precondition
checks are linearizable with the append, and checkpoints are only trusted after their tip is checked against the log.

Sizes are bounded by default; ``FRACSTORE_STRESS=1`` enlarges them, and the ``slow`` variants go wider.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from fracstore import ConflictError, Digest, Store, canonical
from fracstore.layout import CHECKPOINT_POINTER_KEY, LOG_PREFIX, checkpoint_key, log_key, seq_from_key
from fracstore.registry_state import RegistryState
from tests.helpers import run_children
from tests.integration._children import publish_models, publisher_state, same_bits

STRESS = os.environ.get("FRACSTORE_STRESS") == "1"
THREAD_K = 60 if STRESS else 20
PROCESS_K = 40 if STRESS else 12
JOIN_TIMEOUT = 180.0  # generous for a noisy 2-core machine; a hang fails the test instead of the run


# -- helpers ----------------------------------------------------------------------------------------------------


def run_threads(targets: Sequence[Callable[[], None]], *, timeout: float = JOIN_TIMEOUT) -> None:
    """Run each target in its own thread; re-raise the first failure; fail if any thread is still running."""
    errors: list[BaseException] = []

    def wrap(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s (deadlock?)"
    if errors:
        raise errors[0]


def fresh_reader(store_path: Path, tmp_path: Path, label: str = "fresh") -> Store:
    """A new Store object with an empty cache folder: it must replay from the store alone."""
    cache = tmp_path / f"cache-{label}"
    assert not cache.exists()
    return Store.open(store_path, create=False, cache_dir=cache)


def assert_published_once(store_path: Path, tmp_path: Path, name: str, published: Sequence[Digest]) -> Store:
    """A fresh reader sees versions 1..len(published) of ``name``, every published digest exactly once, and a
    verified hash chain of exactly that many publish entries whose order defines the version numbers."""
    total = len(published)
    assert len(set(published)) == total, "the writers published duplicate manifests: the test itself is wrong"
    reader = fresh_reader(store_path, tmp_path)
    records = reader.list(name)
    assert [r.version for r in records] == list(range(1, total + 1))
    seen = Counter(r.digest for r in records)
    assert seen == Counter(published), "a published manifest is missing or listed twice"
    entries = reader.registry.entries()  # verifies the hash chain from entry 1
    assert [e.seq for e in entries] == list(range(1, total + 1))
    assert all(e.op == "publish" and e.name == name for e in entries)
    # Version N is the N-th publish in log order.
    assert [e.manifest for e in entries] == [r.digest for r in records]
    return reader


def record_reads(monkeypatch: pytest.MonkeyPatch, store: Store) -> list[str]:
    """Record every key ``store`` reads from its backend, in order."""
    reads: list[str] = []
    original = store.backend.read

    def read(key: str, *args: Any, **kwargs: Any) -> bytes:
        reads.append(key)
        return original(key, *args, **kwargs)

    monkeypatch.setattr(store.backend, "read", read)
    return reads


def log_reads(reads: Sequence[str]) -> list[int]:
    return [seq_from_key(k, LOG_PREFIX) for k in reads if k.startswith(LOG_PREFIX)]


def count_lost_races(monkeypatch: pytest.MonkeyPatch, store: Store, lost: list[str]) -> None:
    """Append the key of every registry create that ``store`` loses (put_if_absent said "exists") to ``lost``."""
    original = store.backend.put_if_absent

    def put_if_absent(key: str, data: Any, *args: Any, **kwargs: Any) -> bool:
        created = original(key, data, *args, **kwargs)
        if key.startswith(LOG_PREFIX) and not created:
            lost.append(key)
        return created

    monkeypatch.setattr(store.backend, "put_if_absent", put_if_absent)


def assert_state_is_log_prefix(state: RegistryState, store_path: Path, name: str) -> None:
    """A cached or checkpointed state is a true prefix of the log: its tip is entry ``seq`` and its versions are the
    first publishes in log order."""
    assert state.seq >= 1
    assert state.tip == Digest.of((store_path / log_key(state.seq)).read_bytes())
    manifests = [v.manifest for v in state.names[name].versions]
    prefix = [
        Digest.parse(raw["manifest"])
        for raw in (
            canonical.decode((store_path / log_key(s)).read_bytes(), what="entry", max_bytes=1 << 20)
            for s in range(1, state.seq + 1)
        )
        if raw["op"] == "publish" and raw["name"] == name
    ]
    assert manifests == prefix


# -- threads ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("writers", "shared"),
    [
        pytest.param(2, False, id="2-own-stores"),
        pytest.param(2, True, id="2-share-one-store"),
        pytest.param(4, False, id="4-own-stores", marks=pytest.mark.slow),
        pytest.param(4, True, id="4-share-one-store", marks=pytest.mark.slow),
    ],
)
def test_threads_publish_same_name_without_gaps(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writers: int, shared: bool
) -> None:
    Store.open(store_path)  # create the store
    k = THREAD_K * (2 if writers > 2 else 1)
    if shared:
        one = Store.open(store_path)
        stores = [one] * writers
    else:
        stores = [Store.open(store_path) for _ in range(writers)]
    lost: list[str] = []
    for store in {id(s): s for s in stores}.values():
        count_lost_races(monkeypatch, store, lost)
    barrier = threading.Barrier(writers)
    results: list[list[Any]] = [[] for _ in range(writers)]

    def writer(t: int) -> Callable[[], None]:
        def run() -> None:
            barrier.wait(timeout=60)
            for i in range(k):
                saved = stores[t].save({"w": torch.full((4,), float(t * 1000 + i))}, name="m", config={"t": t, "i": i})
                results[t].append(saved)

        return run

    run_threads([writer(t) for t in range(writers)])

    published = [s.digest for r in results for s in r]
    reader = assert_published_once(store_path, tmp_path, "m", published)
    by_digest = {r.digest: r for r in reader.list("m")}
    for t, saves in enumerate(results):
        assert len(saves) == k
        # Each save reported the version the log gave it, and a writer's own versions increase.
        assert [by_digest[s.digest].version for s in saves] == [s.version for s in saves]
        assert [s.version for s in saves] == sorted(s.version for s in saves)
        for s in saves:
            assert by_digest[s.digest].config["t"] == t
    if shared:
        assert not lost, "one Store object serialises its own appends: it must never race itself"
    print(f"{writers} writers x {k}: {len(lost)} lost races")


def test_forced_lost_race_retries_at_next_seq(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic interleaving: B publishes after A decided its append but before A creates the entry. A's create
    must fail, and A must retry at the next seq: both publish, with versions in log order."""
    a, b = Store.open(store_path), Store.open(store_path)
    original = a.backend.put_if_absent
    interleaved: list[Any] = []
    lost: list[str] = []

    def put_if_absent(key: str, data: Any, *args: Any, **kwargs: Any) -> bool:
        if key.startswith(LOG_PREFIX) and not interleaved:
            interleaved.append(b.save({"w": torch.full((4,), 2.0)}, name="m"))
        created = original(key, data, *args, **kwargs)
        if key.startswith(LOG_PREFIX) and not created:
            lost.append(key)
        return created

    monkeypatch.setattr(a.backend, "put_if_absent", put_if_absent)
    saved_a = a.save({"w": torch.full((4,), 1.0)}, name="m")
    (saved_b,) = interleaved
    assert lost == [log_key(1)]
    assert (saved_b.version, saved_a.version) == (1, 2)
    assert_published_once(store_path, tmp_path, "m", [saved_b.digest, saved_a.digest])


# -- processes --------------------------------------------------------------------------------------------------


def run_publishers(
    store_path: Path,
    tmp_path: Path,
    *,
    children: int,
    count: int,
    cache_dirs: Sequence[Path],
    checkpoint_interval: int | None = None,
) -> list[dict[str, Any]]:
    """Start ``children`` spawned processes that each publish ``count`` models of name "m"; return their reports."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(children)
    results = [tmp_path / f"result-{c}.json" for c in range(children)]
    procs = [
        ctx.Process(
            target=publish_models,
            args=(str(store_path), "m", c),
            kwargs={
                "count": count,
                "cache_dir": str(cache_dirs[c]),
                "barrier": barrier,
                "result_path": str(results[c]),
                "checkpoint_interval": checkpoint_interval,
            },
            daemon=True,
        )
        for c in range(children)
    ]
    return run_children(procs, results, timeout=JOIN_TIMEOUT)


def check_process_run(store_path: Path, tmp_path: Path, reports: list[dict[str, Any]], count: int) -> Store:
    """Versions 1..N each once; each child's versions are what the log says; every version loads bit-identical."""
    published = [Digest.parse(d) for r in reports for _, d, _ in r["saved"]]
    reader = assert_published_once(store_path, tmp_path, "m", published)
    # Every child opened the store while it was being created: they must all have agreed on one store.
    assert {r["store_id"] for r in reports} == {reader.id}
    by_digest = {r.digest: r for r in reader.list("m")}
    for child, report in enumerate(reports):
        assert [i for i, _, _ in report["saved"]] == list(range(count))
        versions = [v for _, _, v in report["saved"]]
        assert versions == sorted(versions)
        for i, digest, version in report["saved"]:
            record = by_digest[Digest.parse(digest)]
            assert record.version == version
            assert record.config == {"child": child, "i": i}
    for record in by_digest.values():
        loaded = reader.load(record.ref)
        expected = publisher_state(record.config["child"], record.config["i"])
        assert sorted(loaded) == sorted(expected)
        for key, tensor in expected.items():
            assert same_bits(loaded[key], tensor), f"{record.ref} {key} differs from what child saved"
    return reader


@pytest.mark.parametrize(
    ("children", "cache"),
    [
        (2, "own"),
        (2, "shared"),
        pytest.param(4, "own", marks=pytest.mark.slow),
        pytest.param(4, "shared", marks=pytest.mark.slow),
    ],
)
def test_processes_publish_same_name_without_gaps(
    store_path: Path, tmp_path: Path, isolated_cache: Path, children: int, cache: str
) -> None:
    """Spawned processes race from the very first call: creating the store marker, creating the shared blob, and
    appending to the log. With a shared cache folder they also overwrite one replay-state file and one set of
    verified-state records."""
    count = PROCESS_K * (2 if children > 2 else 1)
    if cache == "own":
        cache_dirs = [tmp_path / f"child-cache-{c}" for c in range(children)]
    else:
        cache_dirs = [isolated_cache] * children
    reports = run_publishers(store_path, tmp_path, children=children, count=count, cache_dirs=cache_dirs)
    reader = check_process_run(store_path, tmp_path, reports, count)

    if cache == "shared":
        # The replay state several processes overwrote is a valid prefix of the log (os.replace, never torn) ...
        state_file = isolated_cache / "stores" / reader.id / "registry.msgpack"
        raw = canonical.decode(state_file.read_bytes(), what="replay cache", max_bytes=1 << 26)
        assert_state_is_log_prefix(RegistryState.from_dict(raw), store_path, "m")
        # ... and a reader that starts from it (default cache dir) sees exactly the truth.
        cached = Store.open(store_path, create=False)
        assert [(r.version, r.digest) for r in cached.list("m")] == [(r.version, r.digest) for r in reader.list("m")]
        for record in cached.list("m")[:3]:
            cached.load(record.ref)  # verified-state records written by several processes are still consistent
    else:
        for cache_dir in cache_dirs:  # each child left a replay state that is a prefix of the final log
            (state_file,) = (cache_dir / "stores").glob("*/registry.msgpack")
            raw = canonical.decode(state_file.read_bytes(), what="replay cache", max_bytes=1 << 26)
            assert_state_is_log_prefix(RegistryState.from_dict(raw), store_path, "m")


@pytest.mark.parametrize("children", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_processes_crossing_checkpoint_boundaries(store_path: Path, tmp_path: Path, children: int) -> None:
    """With a small checkpoint interval, whichever process creates a boundary entry writes that checkpoint: every
    boundary gets one, each is the true state at its seq, and a fresh reader that starts from one is right."""
    interval, count = 4, PROCESS_K
    cache_dirs = [tmp_path / f"child-cache-{c}" for c in range(children)]
    reports = run_publishers(
        store_path, tmp_path, children=children, count=count, cache_dirs=cache_dirs, checkpoint_interval=interval
    )
    check_process_run(store_path, tmp_path, reports, count)
    total = children * count
    for seq in range(interval, total + 1, interval):
        path = store_path / checkpoint_key(seq)
        assert path.exists(), f"no checkpoint at boundary {seq}"
        state = RegistryState.from_dict(canonical.decode(path.read_bytes(), what="checkpoint", max_bytes=1 << 26))
        assert state.seq == seq
        assert_state_is_log_prefix(state, store_path, "m")
    pointer = canonical.decode((store_path / CHECKPOINT_POINTER_KEY).read_bytes(), what="pointer", max_bytes=4096)
    assert pointer["seq"] % interval == 0
    assert (store_path / checkpoint_key(pointer["seq"])).exists()


# -- tag compare-and-set ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["own-store", "shared-store"])
def test_tag_create_if_absent_race_has_one_winner(store_path: Path, tmp_path: Path, shared: bool) -> None:
    racers = 8
    Store.open(store_path).save({"w": torch.zeros(4)}, name="m")
    stores = [Store.open(store_path)] * racers if shared else [Store.open(store_path) for _ in range(racers)]
    barrier = threading.Barrier(racers)
    outcomes: list[str] = []
    lock = threading.Lock()

    def racer(t: int) -> Callable[[], None]:
        def run() -> None:
            barrier.wait(timeout=60)
            try:
                record = stores[t].tag("m@1", "prod", expected=None)
            except ConflictError:
                outcome = "conflict"
            else:
                assert (record.version, record.tags) == (1, ("prod",))
                outcome = "won"
            with lock:
                outcomes.append(outcome)

        return run

    run_threads([racer(t) for t in range(racers)])
    assert sorted(outcomes) == ["conflict"] * (racers - 1) + ["won"]
    reader = fresh_reader(store_path, tmp_path)
    assert [(e.op, e.tag, e.version) for e in reader.registry.entries() if e.op != "publish"] == [("tag", "prod", 1)]
    assert reader.resolve("m:prod").version == 1


def test_tag_move_compare_and_set_race_has_one_winner(store_path: Path, tmp_path: Path) -> None:
    """N writers each try to move prod from 1 to their own version: exactly one move lands; the tag points at the
    winner's version."""
    racers = 6
    setup = Store.open(store_path)
    for v in range(racers + 1):
        setup.save({"w": torch.full((4,), float(v))}, name="m")
    setup.tag("m@1", "prod")
    stores = [Store.open(store_path) for _ in range(racers)]
    barrier = threading.Barrier(racers)
    winners: list[int] = []
    conflicts: list[int] = []

    def racer(t: int) -> Callable[[], None]:
        def run() -> None:
            barrier.wait(timeout=60)
            try:
                stores[t].tag(f"m@{t + 2}", "prod", expected=1)
            except ConflictError:
                conflicts.append(t)
            else:
                winners.append(t + 2)

        return run

    run_threads([racer(t) for t in range(racers)])
    assert len(winners) == 1
    assert len(conflicts) == racers - 1
    reader = fresh_reader(store_path, tmp_path)
    assert reader.resolve("m:prod").version == winners[0]
    assert [e.version for e in reader.registry.entries() if e.op == "tag"] == [1, winners[0]]


def test_tag_precondition_rechecked_after_lost_race(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic interleaving: A checks "prod does not exist" (true), then B creates prod, then A's create fails.
    A must re-check against the new tip and refuse, not create the tag over B's."""
    setup = Store.open(store_path)
    setup.save({"w": torch.zeros(4)}, name="m")
    setup.save({"w": torch.ones(4)}, name="m")
    a, b = Store.open(store_path), Store.open(store_path)
    original = a.backend.put_if_absent
    done: list[bool] = []

    def put_if_absent(key: str, data: Any, *args: Any, **kwargs: Any) -> bool:
        if key.startswith(LOG_PREFIX) and not done:
            done.append(True)
            b.tag("m@2", "prod", expected=None)
        return original(key, data, *args, **kwargs)

    monkeypatch.setattr(a.backend, "put_if_absent", put_if_absent)
    with pytest.raises(ConflictError, match="prod"):
        a.tag("m@1", "prod", expected=None)
    assert done
    assert Store.open(store_path).resolve("m:prod").version == 2
    assert [e.op for e in Store.open(store_path).registry.entries()] == ["publish", "publish", "tag"]


# -- checkpoints ------------------------------------------------------------------------------------------------


def _publish_twelve(store_path: Path) -> tuple[Store, list[Digest]]:
    writer = Store.open(store_path, checkpoint_interval=5)
    digests = [writer.save({"w": torch.full((4,), float(i))}, name="m").digest for i in range(12)]
    return writer, digests


def test_checkpoints_written_at_interval(store_path: Path) -> None:
    _publish_twelve(store_path)
    names = sorted(p.name for p in (store_path / "checkpoints").iterdir())
    assert names == ["00000000000000000005.msgpack", "00000000000000000010.msgpack", "_last"]
    pointer = canonical.decode((store_path / CHECKPOINT_POINTER_KEY).read_bytes(), what="pointer", max_bytes=4096)
    assert pointer == {"seq": 10}
    for seq in (5, 10):
        raw = canonical.decode((store_path / checkpoint_key(seq)).read_bytes(), what="checkpoint", max_bytes=1 << 20)
        assert_state_is_log_prefix(RegistryState.from_dict(raw), store_path, "m")


def test_reader_with_empty_cache_starts_from_checkpoint(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, digests = _publish_twelve(store_path)
    reader = fresh_reader(store_path, tmp_path)
    reads = record_reads(monkeypatch, reader)
    state = reader.registry.refresh()
    # The checkpoint at 10 is trusted only after entry 10 is read back (tip check); then 11, 12, and 13 (missing).
    assert log_reads(reads) == [10, 11, 12, 13]
    assert checkpoint_key(10) in reads
    assert [v.manifest for v in state.names["m"].versions] == digests
    assert [r.digest for r in reader.list("m")] == digests

    # A reader that has replayed to 12 pays only for what is new.
    more = [writer.save({"w": torch.full((4,), 100.0 + i)}, name="m").digest for i in range(3)]
    reads.clear()
    state = reader.registry.refresh()
    assert log_reads(reads) == [13, 14, 15, 16]
    assert not [k for k in reads if k.startswith("checkpoints/")]
    assert [v.manifest for v in state.names["m"].versions] == digests + more

    # Nothing new: one read (the missing next entry).
    reads.clear()
    reader.registry.refresh()
    assert log_reads(reads) == [16]

    # A new Store object over the same cache folder starts from the cached replay state: tip check, then forward.
    again = Store.open(store_path, create=False, cache_dir=tmp_path / "cache-fresh")
    reads_again = record_reads(monkeypatch, again)
    assert [v.manifest for v in again.registry.refresh().names["m"].versions] == digests + more
    assert log_reads(reads_again) == [15, 16]


def _tamper_checkpoint_tip(store_path: Path) -> None:
    """Rewrite checkpoint 10 as a decodable state that claims other manifests and a tip that is not entry 10."""
    path = store_path / checkpoint_key(10)
    raw = canonical.decode(path.read_bytes(), what="checkpoint", max_bytes=1 << 20)
    forged = Digest.of(b"not a manifest in this store")
    raw["names"]["m"]["versions"] = [[str(forged), *v[1:]] for v in raw["names"]["m"]["versions"]]
    raw["tip"] = str(Digest.of(b"not entry 10"))
    path.chmod(0o644)
    path.write_bytes(canonical.encode(raw))
    # Still a well-formed checkpoint at seq 10: only the tip check can tell it from the real one.
    state = RegistryState.from_dict(canonical.decode(path.read_bytes(), what="checkpoint", max_bytes=1 << 20))
    assert state.seq == 10
    assert {v.manifest for v in state.names["m"].versions} == {forged}


def _break_pointer(store_path: Path) -> None:
    (store_path / CHECKPOINT_POINTER_KEY).write_bytes(b"\xc1 not msgpack")


def _remove_pointer(store_path: Path) -> None:
    (store_path / CHECKPOINT_POINTER_KEY).unlink()


def _garble_checkpoint(store_path: Path) -> None:
    path = store_path / checkpoint_key(10)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:40])


def _pointer_to_missing(store_path: Path) -> None:
    (store_path / CHECKPOINT_POINTER_KEY).write_bytes(canonical.encode({"seq": 999}))


@pytest.mark.parametrize(
    ("damage", "expected_log_reads"),
    [
        (_tamper_checkpoint_tip, [10, *range(1, 14)]),  # tip check fails: full replay
        (_garble_checkpoint, [*range(1, 14)]),  # undecodable: full replay
        (_pointer_to_missing, [*range(1, 14)]),
        (_break_pointer, [10, 11, 12, 13]),  # the pointer is advisory: the newest listed checkpoint is used
        (_remove_pointer, [10, 11, 12, 13]),
    ],
    ids=["tampered-tip", "garbled-checkpoint", "pointer-to-missing", "garbled-pointer", "no-pointer"],
)
def test_damaged_checkpoint_never_changes_the_state(
    store_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: Callable[[Path], None],
    expected_log_reads: list[int],
) -> None:
    _, digests = _publish_twelve(store_path)
    damage(store_path)
    reader = fresh_reader(store_path, tmp_path)
    reads = record_reads(monkeypatch, reader)
    state = reader.registry.refresh()
    assert log_reads(reads) == expected_log_reads
    assert [v.manifest for v in state.names["m"].versions] == digests
    assert state.tip == Digest.of((store_path / log_key(12)).read_bytes())
    assert [r.digest for r in reader.list("m")] == digests
    assert len(reader.registry.entries()) == 12


def test_forged_replay_cache_is_ignored(store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local replay cache gets the same tip check as a checkpoint: one that does not end at a real entry is
    dropped and the reader replays from the store."""
    _, digests = _publish_twelve(store_path)
    cache = tmp_path / "cache-forged"
    reader = Store.open(store_path, create=False, cache_dir=cache)
    reader.list()
    (state_file,) = (cache / "stores").glob("*/registry.msgpack")
    raw = canonical.decode(state_file.read_bytes(), what="replay cache", max_bytes=1 << 20)
    raw["names"]["m"]["versions"] = raw["names"]["m"]["versions"][:3]  # "only 3 versions" ...
    raw["tip"] = str(Digest.of(b"not entry 12"))  # ... at a tip that is not the log's
    state_file.write_bytes(canonical.encode(raw))
    again = Store.open(store_path, create=False, cache_dir=cache)
    reads = record_reads(monkeypatch, again)
    assert [r.digest for r in again.list("m")] == digests
    # The forged tip is checked against entry 12 and fails; then checkpoint 10 is checked and used.
    assert log_reads(reads) == [12, 10, 11, 12, 13]
