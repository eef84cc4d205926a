"""The local blob cache shared by every remote store (DESIGN.md section 6): a cached model loads with no blob
request, two stores holding the same blobs share one copy, concurrent fills (threads and processes) end with one
verified file, a damaged cached copy is discarded and fetched again, and pruning is least-recently-used first,
bounded by size, with a grace period for blobs in use.

Requests are counted by :class:`~tests.integration._remote_children.RequestLog`; the pruning tests set last-use
times with ``os.utime`` on the blob files and their verified-state records (the record's mtime is the last use).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import fracstore.cache
from fracstore import ConfigError, Descriptor, Digest, Store
from fracstore.backend import Backend
from fracstore.cache import PRUNE_GRACE_SECONDS, BlobCache, parse_size
from fracstore.layout import BLOBS_PREFIX, blob_key
from tests.integration._remote_children import RequestLog, assert_same_state, fill_cache
from tests.servers import StoreLocation

# gcsfs hands aiohttp each upload chunk as raw bytes, and aiohttp warns about bodies over 1 MiB; the pytest config
# makes warnings errors, and this one is the storage client's own business, not fracstore's.
pytestmark = pytest.mark.filterwarnings("ignore:Sending a large body directly with raw bytes:ResourceWarning")

JOIN_TIMEOUT = 120.0
ELEMENTS = 1 << 19  # 2 MiB of float32: its own blob


def open_store(location: StoreLocation, **kwargs: Any) -> Store:
    return Store.open(location.url, storage_options=location.storage_options, **kwargs)


def model_state(seed: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "big": torch.arange(ELEMENTS, dtype=torch.float32) + seed,
        "other": torch.arange(ELEMENTS, dtype=torch.float32) * 2 + seed,
        "bias": torch.tensor([seed, -0.0, 1.0]),
    }


def blob_requests(requests: RequestLog, url: str | None = None) -> list[Any]:
    return requests.matching(url=url, prefix=BLOBS_PREFIX)


def cached_file(cache_dir: Path, digest: Digest) -> Path:
    return cache_dir / blob_key(digest)


def files_in_blob_folder(cache_dir: Path, digest: Digest) -> list[str]:
    return sorted(p.name for p in (cache_dir / blob_key(digest)).parent.iterdir())


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def big_blob(store: Store, ref: str, tensor: str = "big") -> Descriptor:
    manifest = store.manifest(store.resolve(ref).digest)
    entry = next(t for t in manifest.tensors if t.name == tensor)
    return Descriptor(entry.blob, manifest.tensor_blob_sizes()[entry.blob])


# -- zero requests, one pool for every store ---------------------------------------------------------------------


@pytest.mark.s3
def test_a_cached_model_loads_with_zero_blob_requests(
    s3_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    writer.save(model_state(), name="m", metrics={"loss": 1.0})
    cache = tmp_path / "reader-cache"
    requests = RequestLog().install(monkeypatch)

    first = open_store(s3_location, cache_dir=cache)
    assert_same_state(first.load("m"), model_state())
    fetched = {r.key for r in blob_requests(requests) if r.method in ("download", "read_capped", "read")}
    assert len(fetched) == 4, "the counter must see the first load's fetches (3 blobs and the manifest)"

    requests.clear()
    second = open_store(s3_location, cache_dir=cache)  # a new object: nothing in memory, only the cache folder
    assert_same_state(second.load("m"), model_state())
    assert [r.ref for r in second.list()] == ["m@1"]
    best = second.best("loss")
    assert best is not None and best.ref == "m@1"
    assert blob_requests(requests) == []
    assert requests.requests, "the registry is still read from the store (only blobs come from the cache)"


@pytest.mark.s3
@pytest.mark.gcs
def test_two_remote_stores_holding_the_same_blobs_share_the_cache(
    s3_location: StoreLocation, gcs_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    s3.save(model_state(), name="m")
    gcs = open_store(gcs_location, cache_dir=tmp_path / "writer-cache")
    gcs.pull(s3, "m")

    cache = tmp_path / "reader-cache"
    requests = RequestLog().install(monkeypatch)
    assert_same_state(open_store(s3_location, cache_dir=cache).load("m"), model_state())
    assert blob_requests(requests, s3_location.url), "the first load downloads from S3"
    entries_before = BlobCache(cache).entries()
    assert len(entries_before) == 4  # two tensor blobs, the packed blob holding the bias, the manifest

    requests.clear()
    from_gcs = open_store(gcs_location, cache_dir=cache)
    assert_same_state(from_gcs.load("m"), model_state())
    assert blob_requests(requests, gcs_location.url) == []
    assert blob_requests(requests) == []
    assert {e.digest for e in BlobCache(cache).entries()} == {e.digest for e in entries_before}


# -- concurrent fills --------------------------------------------------------------------------------------------


def _assert_one_verified_file(cache_dir: Path, descriptor: Descriptor, paths: list[str]) -> None:
    path = cached_file(cache_dir, descriptor.digest)
    assert set(paths) == {str(path)}
    assert files_in_blob_folder(cache_dir, descriptor.digest) == [descriptor.digest.hex], "temp files were left"
    assert sha256_of(path) == descriptor.digest.hex
    assert path.stat().st_size == descriptor.size
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    cache = BlobCache(cache_dir)
    assert [(e.digest, e.size) for e in cache.entries()] == [(descriptor.digest, descriptor.size)]
    found = cache.lookup(descriptor)
    assert found is not None and found.path == path


@pytest.mark.s3
def test_many_threads_filling_one_blob_end_with_one_verified_file(s3_location: StoreLocation, tmp_path: Path) -> None:
    store = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    store.save(model_state(), name="m")
    descriptor = big_blob(store, "m")
    source = Backend.from_url(s3_location.url, storage_options=s3_location.storage_options)
    cache_dir = tmp_path / "shared-cache"
    cache = BlobCache(cache_dir)
    fillers = 8
    barrier = threading.Barrier(fillers)
    paths: list[str] = []
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            barrier.wait(timeout=30)
            paths.append(str(cache.fill(descriptor, source).path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fill, daemon=True) for _ in range(fillers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a filler hung"
    assert not errors, errors
    assert len(paths) == fillers
    _assert_one_verified_file(cache_dir, descriptor, paths)


@pytest.mark.s3
def test_two_processes_filling_one_blob_end_with_one_verified_file(s3_location: StoreLocation, tmp_path: Path) -> None:
    store = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    store.save(model_state(), name="m")
    descriptor = big_blob(store, "m")
    cache_dir = tmp_path / "shared-cache"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = [tmp_path / f"fill-{c}.json" for c in range(2)]
    procs = [
        ctx.Process(
            target=fill_cache,
            args=(s3_location.url, s3_location.storage_options, str(descriptor.digest), descriptor.size),
            kwargs={"cache_dir": str(cache_dir), "threads": 4, "barrier": barrier, "result_path": str(results[c])},
            daemon=True,
        )
        for c in range(2)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        assert not any(p.is_alive() for p in procs), f"a filler process did not finish within {JOIN_TIMEOUT} s"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    paths: list[str] = []
    for c, (proc, path) in enumerate(zip(procs, results, strict=True)):
        report = json.loads(path.read_text()) if path.exists() else {"error": "no report"}
        assert "error" not in report, f"filler {c} failed (exit {proc.exitcode}):\n{report['error']}"
        assert proc.exitcode == 0
        paths.extend(report["paths"])
    assert len(paths) == 8
    _assert_one_verified_file(cache_dir, descriptor, paths)


# -- a damaged cached copy ----------------------------------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("keep_mtime", [False, True], ids=["edited", "edited-mtime-restored"])
def test_a_corrupt_cache_entry_is_discarded_and_fetched_again(
    s3_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_mtime: bool
) -> None:
    writer = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    writer.save(model_state(), name="m")
    cache = tmp_path / "reader-cache"
    reader = open_store(s3_location, cache_dir=cache)
    assert_same_state(reader.load("m"), model_state())  # fills the cache
    descriptor = big_blob(reader, "m")
    path = cached_file(cache, descriptor.digest)
    assert sha256_of(path) == descriptor.digest.hex

    before = path.stat()
    path.chmod(before.st_mode | stat.S_IWUSR)
    with open(path, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:  # only the change time (which no user can set) still tells
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert sha256_of(path) != descriptor.digest.hex

    requests = RequestLog().install(monkeypatch)
    again = open_store(s3_location, cache_dir=cache)
    assert_same_state(again.load("m"), model_state())
    assert sha256_of(path) == descriptor.digest.hex, "the cached copy is good again"
    assert not path.stat().st_mode & stat.S_IWUSR
    refetched = [r.key for r in blob_requests(requests) if r.method in ("download", "read_capped")]
    assert refetched == [blob_key(descriptor.digest)], "only the damaged blob is fetched again"
    # and the next load trusts it again without a request
    requests.clear()
    assert_same_state(open_store(s3_location, cache_dir=cache).load("m"), model_state())
    assert blob_requests(requests) == []


# -- pruning ------------------------------------------------------------------------------------------------------


def make_cache(cache_dir: Path, sizes: list[int], ages: list[float], now: float) -> tuple[BlobCache, list[Descriptor]]:
    """A cache holding one blob of each size, last used ``age`` seconds before ``now``."""
    cache = BlobCache(cache_dir)
    descriptors = []
    for i, (size, age) in enumerate(zip(sizes, ages, strict=True)):
        data = bytes([i + 1]) * size
        descriptor = Descriptor(Digest.of(data), size)
        assert cache.pool.put(descriptor, data)
        set_last_use(cache_dir, descriptor.digest, now - age)
        descriptors.append(descriptor)
    return cache, descriptors


def set_last_use(cache_dir: Path, digest: Digest, when: float) -> None:
    record = cache_dir / "verified" / digest.hex[:2] / digest.hex
    assert record.exists(), "every cached blob has a verified-state record"
    for path in (cached_file(cache_dir, digest), record):
        os.utime(path, (when, when))


def present(cache_dir: Path, descriptors: list[Descriptor]) -> list[bool]:
    return [cached_file(cache_dir, d.digest).exists() for d in descriptors]


def test_prune_removes_least_recently_used_first_down_to_max_bytes(tmp_path: Path) -> None:
    now = time.time()
    # Listed out of order on purpose: the order of removal is by last use, not by name, size or insertion.
    cache, blobs = make_cache(tmp_path / "cache", [3000, 1000, 4000, 2000], [200, 400, 100, 300], now)
    oldest_first = [blobs[1], blobs[3], blobs[0], blobs[2]]
    assert [e.digest for e in cache.entries()] == [d.digest for d in oldest_first]
    assert cache.total_bytes() == 10_000

    planned = cache.prune(7000, dry_run=True)
    assert present(tmp_path / "cache", blobs) == [True] * 4, "a dry run removes nothing"
    assert cache.total_bytes() == 10_000
    result = cache.prune(7000)
    assert result == planned, "a dry run reports exactly what the real run does"
    assert [e.digest for e in result.removed] == [blobs[1].digest, blobs[3].digest]
    assert (result.bytes_freed, result.bytes_kept) == (3000, 7000)
    assert present(tmp_path / "cache", blobs) == [True, False, True, False]
    assert cache.total_bytes() == 7000
    assert cache.lookup(blobs[1]) is None
    assert not (tmp_path / "cache" / "verified" / blobs[1].digest.hex[:2] / blobs[1].digest.hex).exists()

    assert cache.prune(7000).removed == (), "already within the bound"
    result = cache.prune(0)
    assert [e.digest for e in result.removed] == [blobs[0].digest, blobs[2].digest]
    assert (cache.total_bytes(), cache.entries()) == (0, [])


def test_a_use_moves_a_blob_to_the_back_of_the_queue(tmp_path: Path) -> None:
    now = time.time()
    cache, blobs = make_cache(tmp_path / "cache", [1000, 1000, 1000], [500, 400, 300], now)
    assert cache.lookup(blobs[0]) is not None  # a verified use touches its record
    assert cache.entries()[-1].digest == blobs[0].digest
    result = cache.prune(1000)
    assert [e.digest for e in result.removed] == [blobs[1].digest, blobs[2].digest]
    assert present(tmp_path / "cache", blobs) == [True, False, False]


def test_prune_never_removes_a_blob_used_within_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = 2_000_000_000.0
    monkeypatch.setattr(fracstore.cache, "time", types.SimpleNamespace(time=lambda: clock))
    grace = PRUNE_GRACE_SECONDS
    # The oldest-used blob (first in LRU order) is still inside the grace period only for the two youngest.
    ages = [grace + 100, grace + 1, grace - 1, 5]
    cache, blobs = make_cache(tmp_path / "cache", [1000, 2000, 3000, 4000], ages, clock)
    planned = cache.prune(0, dry_run=True)
    result = cache.prune(0)
    assert result == planned
    assert [e.digest for e in result.removed] == [blobs[0].digest, blobs[1].digest]
    assert (result.bytes_freed, result.bytes_kept) == (3000, 7000), "kept above the bound rather than remove in use"
    assert present(tmp_path / "cache", blobs) == [False, False, True, True]

    clock += 2  # time passes: the blob used grace - 1 seconds ago is now out of the grace period
    result = cache.prune(0)
    assert [e.digest for e in result.removed] == [blobs[2].digest]
    assert present(tmp_path / "cache", blobs) == [False, False, False, True]


@pytest.mark.s3
def test_blobs_a_load_used_are_kept_and_pruned_ones_are_fetched_again(
    s3_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_store(s3_location, cache_dir=tmp_path / "writer-cache").save(model_state(), name="m")
    cache_dir = tmp_path / "reader-cache"
    assert_same_state(open_store(s3_location, cache_dir=cache_dir).load("m"), model_state())
    cache = BlobCache(cache_dir)
    total = cache.total_bytes()
    assert total > 4 * ELEMENTS
    assert cache.prune(0).removed == (), "just used: inside the grace period"
    assert cache.total_bytes() == total

    old = time.time() - PRUNE_GRACE_SECONDS - 60
    for entry in cache.entries():
        set_last_use(cache_dir, entry.digest, old)
    result = cache.prune(0)
    assert result.bytes_freed == total and result.bytes_kept == 0
    assert cache.entries() == []

    requests = RequestLog().install(monkeypatch)
    assert_same_state(open_store(s3_location, cache_dir=cache_dir).load("m"), model_state())
    assert {r.method for r in blob_requests(requests)} & {"download", "read_capped"}, "a pruned cache is filled again"
    assert cache.total_bytes() == total


def test_entries_and_total_bytes_skip_temp_files_and_strays(tmp_path: Path) -> None:
    now = time.time()
    cache, blobs = make_cache(tmp_path / "cache", [10, 20], [20, 10], now)
    folder = cached_file(tmp_path / "cache", blobs[0].digest).parent
    (folder / ".tmp-partial").write_bytes(b"x" * 1000)  # a fill in progress
    (folder / "not-a-digest").write_bytes(b"x" * 1000)
    entries = cache.entries()
    assert [(e.digest, e.size) for e in entries] == [(blobs[0].digest, 10), (blobs[1].digest, 20)]
    assert entries[0].last_used < entries[1].last_used
    assert abs(entries[0].last_used.timestamp() - (now - 20)) < 1
    assert cache.total_bytes() == 30
    assert BlobCache(tmp_path / "empty").entries() == []
    assert BlobCache(tmp_path / "empty").total_bytes() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "10"])
def test_prune_refuses_a_bad_bound(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError):
        BlobCache(tmp_path / "cache").prune(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("123", 123),
        ("7b", 7),
        ("10GiB", 10 << 30),
        ("10 gib", 10 << 30),
        ("500 MB", 500_000_000),
        ("500MiB", 500 << 20),
        ("1.5K", 1536),
        ("2kb", 2000),
        ("2KiB", 2048),
        ("3m", 3 << 20),
        ("1T", 1 << 40),
        ("2tb", 2 * 10**12),
        ("  4 G ", 4 << 30),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "-5MB", "10XB", "1.2.3M", "GiB", "nan", "inf", "ten MB"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


# -- a fill whose transfer goes wrong ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["in-memory", "streamed"])
@pytest.mark.parametrize("persistent", [False, True])
def test_a_fill_that_arrives_corrupt_is_fetched_once_more(
    memory_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, persistent: bool
) -> None:
    from fracstore.errors import IntegrityError
    from tests.faults import FaultyBackend

    if path == "streamed":  # blobs this small normally go through one in-memory GET; force the temp-file route
        monkeypatch.setattr(fracstore.cache, "IN_MEMORY_BLOB_BYTES", 0)
    weights = {"w": torch.arange(300_000, dtype=torch.float32)}
    Store.open(memory_location.url).save(weights, name="m")
    reader = Store.open(memory_location.url, cache_dir=tmp_path / "other-machine")
    digest = reader.manifest(reader.resolve("m").digest).tensor_blobs[0].digest
    faulty = FaultyBackend(reader.backend).install(reader)
    method = "download" if path == "streamed" else "read_capped"
    fault = faulty.flip_bit(method, offset=100, keys=blob_key(digest), times=None if persistent else 1)
    if persistent:
        with pytest.raises(IntegrityError) as info:
            reader.load("m")
        assert str(digest) in str(info.value) and memory_location.url in str(info.value)
        assert fault.fired == 2  # fetched twice, then refused
        assert not (tmp_path / "other-machine" / blob_key(digest)).exists()
    else:
        assert torch.equal(reader.load("m")["w"], weights["w"])
        assert fault.fired == 1
        assert (tmp_path / "other-machine" / blob_key(digest)).is_file()


def test_prune_keeps_a_blob_used_after_its_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BlobCache(tmp_path / "cache")
    source = Backend.from_url(str(tmp_path / "source"))
    data = os.urandom(1000)
    descriptor = Descriptor(Digest.of(data), len(data))
    source.put_if_absent(blob_key(descriptor.digest), data)
    cache.fill(descriptor, source)
    old = time.time() - 10 * PRUNE_GRACE_SECONDS
    record = tmp_path / "cache" / "verified" / descriptor.digest.hex[:2] / descriptor.digest.hex
    os.utime(record, (old, old))
    os.utime(tmp_path / "cache" / blob_key(descriptor.digest), (old, old), follow_symlinks=False)
    stale = cache.entries()  # the scan sees it unused for ten grace periods...
    assert stale[0].last_used.timestamp() < time.time() - PRUNE_GRACE_SECONDS
    assert cache.lookup(descriptor) is not None  # ...then another process uses it
    monkeypatch.setattr(cache, "entries", lambda: stale)
    result = cache.prune(0)
    assert result.removed == ()
    assert cache.lookup(descriptor) is not None
