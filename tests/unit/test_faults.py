"""The fault-injecting backend wrapper (tests/faults.py) does exactly the damage it is asked for, and no other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fracstore import Store
from fracstore.backend import Backend
from fracstore.errors import NotFoundError, StorageError, UnsupportedBackendError
from tests.faults import FaultyBackend, chunks

DATA = bytes(range(256)) * 4


@pytest.fixture
def inner(tmp_path: Path) -> Backend:
    return Backend.from_url(str(tmp_path / "b"))


@pytest.fixture
def faulty(inner: Backend) -> FaultyBackend:
    return FaultyBackend(inner)


def _differing_bits(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))


def test_without_faults_it_is_the_backend(faulty: FaultyBackend, inner: Backend) -> None:
    assert faulty.put_if_absent("k", chunks(DATA, 100))
    assert not faulty.put_if_absent("k", b"other")
    assert faulty.read("k") == DATA and faulty.read_range("k", 10, 20) == DATA[10:20]
    with faulty.open_read("k") as handle:
        assert handle.read() == DATA
    assert faulty.exists("k") and faulty.size("k") == len(DATA)
    assert faulty.url == inner.url and faulty.is_local and faulty.atomic_create
    faulty.probe_atomic_create()
    assert faulty.calls["put_if_absent"] == 4  # two here, two from the probe: internal calls meet the wrapper too
    assert faulty.delete("k") and not inner.exists("k")


def test_fail_hits_the_kth_matching_call_only(faulty: FaultyBackend) -> None:
    faulty.put_if_absent("k", DATA)
    fault = faulty.fail("read", on_call=2)
    assert faulty.read("k") == DATA
    with pytest.raises(StorageError, match="injected fault: read k") as info:
        faulty.read("k")
    assert info.value.key == "k" and info.value.store == faulty.url
    assert faulty.read("k") == DATA
    assert (fault.matched, fault.fired) == (3, 1)


def test_fail_filters_by_key_and_raises_the_chosen_error(faulty: FaultyBackend) -> None:
    logs = faulty.fail("put_if_absent", keys="log/", times=None, error=TimeoutError("slow"))
    other = faulty.fail("put_if_absent", keys=lambda key: key.endswith("!"), error=KeyError)  # called with the key
    assert faulty.put_if_absent("blobs/a", b"a")
    for _ in range(3):
        with pytest.raises(TimeoutError, match="slow"):
            faulty.put_if_absent("log/1", b"entry")
    with pytest.raises(KeyError, match="x!"):
        faulty.put_if_absent("x!", b"x")
    assert faulty.put_if_absent("y!", b"y")  # times=1: only the first match
    assert (logs.fired, other.fired, other.matched) == (3, 1, 2)
    assert not faulty.inner.exists("log/1")


def test_exists_meets_a_size_fault(faulty: FaultyBackend) -> None:
    faulty.fail("size")
    with pytest.raises(StorageError):
        faulty.exists("anything")


def test_fail_after_lands_the_write_then_raises(faulty: FaultyBackend, inner: Backend) -> None:
    fault = faulty.fail_after("put_if_absent", keys="log/")
    with pytest.raises(StorageError):
        faulty.put_if_absent("log/1", b"entry")
    assert inner.read("log/1") == b"entry"  # the outcome the caller could not see
    assert not faulty.put_if_absent("log/1", b"again")
    assert fault.fired == 1


def test_truncated_reads(faulty: FaultyBackend, inner: Backend) -> None:
    inner.put_if_absent("k", DATA)
    faulty.truncate("read", to=-1)
    faulty.truncate("read_range", to=100)
    faulty.truncate("open_read", to=500)
    assert faulty.read("k") == DATA[:-1]
    assert faulty.read_range("k", 90, 110) == DATA[90:100]
    assert faulty.read_range("k", 200, 210) == b""
    with faulty.open_read("k") as handle:
        assert handle.read(300) + handle.read() == DATA[:500]
    assert inner.read("k") == DATA  # reads only: the stored object is intact


def test_truncated_and_flipped_writes(faulty: FaultyBackend, inner: Backend) -> None:
    faulty.truncate("put_if_absent", to=10, keys="short")
    faulty.flip_bit("put_overwrite", offset=-1, bit=7)
    assert faulty.put_if_absent("short", chunks(DATA, 7))
    assert inner.read("short") == DATA[:10]
    faulty.put_overwrite("flipped", DATA)
    stored = inner.read("flipped")
    assert _differing_bits(stored, DATA) == 1 and stored[-1] == DATA[-1] ^ 0x80


def test_flipped_reads_change_one_bit_wherever_it_is_read(faulty: FaultyBackend, inner: Backend) -> None:
    inner.put_if_absent("k", DATA)
    for method in ("read", "read_range", "open_read"):
        faulty.flip_bit(method, offset=600)
    assert _differing_bits(faulty.read("k"), DATA) == 1
    assert faulty.read_range("k", 0, 100) == DATA[:100]  # the flipped byte is outside the range
    assert faulty.read_range("k", 600, 601) == bytes([DATA[600] ^ 1])
    with faulty.open_read("k") as handle:
        assert _differing_bits(b"".join(iter(lambda: handle.read(64), b"")), DATA) == 1


def test_on_call_and_times_bound_a_corruption(faulty: FaultyBackend, inner: Backend) -> None:
    inner.put_if_absent("k", DATA)
    faulty.truncate("read", to=0, on_call=2, times=2)
    assert [len(faulty.read("k")) for _ in range(4)] == [len(DATA), 0, 0, len(DATA)]


def test_overwrite_on_create_replaces_and_says_created(faulty: FaultyBackend, inner: Backend) -> None:
    inner.put_if_absent("k", b"first")
    faulty.overwrite_on_create()
    assert faulty.put_if_absent("k", b"second") is True
    assert inner.read("k") == b"second"
    with pytest.raises(UnsupportedBackendError, match="silently overwrote"):
        faulty.probe_atomic_create()
    faulty.clear()
    faulty.probe_atomic_create()  # transparent again


def test_missing_keys_still_raise_not_found_through_the_wrapper(faulty: FaultyBackend) -> None:
    with pytest.raises(NotFoundError):
        faulty.read("nope")


def test_bad_fault_specifications_are_refused(faulty: FaultyBackend) -> None:
    with pytest.raises(ValueError, match="no method"):
        faulty.fail("raed")
    with pytest.raises(ValueError, match="cannot corrupt"):
        faulty.truncate("delete")
    with pytest.raises(ValueError, match="count from 1"):
        faulty.fail("read", on_call=0)


def test_install_makes_a_store_use_the_wrapper(store: Store, tmp_path: Path) -> None:
    faulty = FaultyBackend(store.backend).install(store)
    assert store.backend is faulty and store.registry.backend is faulty and store.blobs.backend is faulty
    faulty.fail("put_if_absent", keys="log/", times=None, error=StorageError("disk full"))
    with pytest.raises(StorageError, match="disk full"):
        store.save({"w": torch.ones(2)}, name="m")
    assert faulty.calls["put_if_absent"] > 1
    other = Store.open(tmp_path / "other")
    with pytest.raises(ValueError, match="does not use"):
        faulty.install(other)
