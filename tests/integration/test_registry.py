"""Registry behaviour on a real local store: holes in the log, persistent write failures, damaged inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fracstore import IntegrityError, StorageError, Store
from fracstore.backend import Backend
from fracstore.layout import blob_key, log_key
from tests.faults import FaultyBackend


def _publish(store: Store, count: int) -> None:
    for i in range(count):
        store.save({"w": torch.full((4,), float(i))}, name="m")


def test_a_removed_log_entry_is_detected_by_a_fresh_reader(store_path: Path, isolated_cache: Path) -> None:
    _publish(Store.open(store_path), 4)
    os.unlink(store_path / log_key(3))
    with pytest.raises(IntegrityError, match="entries were removed") as info:
        Store.open(store_path, cache_dir=isolated_cache / "fresh").list()
    assert info.value.key == log_key(3)


def test_a_removed_entry_is_detected_by_a_reader_whose_cache_is_older(store_path: Path) -> None:
    writer = Store.open(store_path)
    _publish(writer, 2)
    reader = Store.open(store_path)
    assert len(reader.list()) == 2  # replayed to 2
    _publish(writer, 2)
    os.unlink(store_path / log_key(3))
    with pytest.raises(IntegrityError):
        reader.list()
    with pytest.raises(IntegrityError):  # and it refuses to write into the hole
        reader.save({"w": torch.ones(1)}, name="m")


def test_a_persistent_storage_error_surfaces_as_itself(store: Store) -> None:
    _publish(store, 1)
    faulty = FaultyBackend(store.backend).install(store)
    calls = faulty.fail("put_if_absent", keys="log/", times=None, error=lambda key: StorageError("disk full", key=key))
    with pytest.raises(StorageError, match="disk full"):
        store.save({"w": torch.ones(2)}, name="m")
    assert 1 < calls.fired <= 3  # retried a little, then gave the real reason, not a "lost race" ConflictError
    faulty.clear()
    assert [r.version for r in Store.open(store.url).list()] == [1]


def test_a_transient_storage_error_is_retried(store: Store) -> None:
    faulty = FaultyBackend(store.backend).install(store)
    faulty.fail("put_if_absent", keys="log/", error=lambda key: StorageError("connection reset", key=key))
    saved = store.save({"w": torch.ones(2)}, name="m")
    assert saved.version == 1


def test_a_write_that_landed_before_the_error_is_not_written_twice(store: Store) -> None:
    faulty = FaultyBackend(store.backend).install(store)
    faulty.fail_after(
        "put_if_absent", keys="log/", error=lambda key: StorageError("timeout after the request was sent", key=key)
    )
    saved = store.save({"w": torch.ones(2)}, name="m")
    assert saved.version == 1
    assert [e.op for e in store.log()] == ["publish"]  # exactly one entry


def test_a_symlinked_blob_is_refused(store: Store, store_path: Path, tmp_path: Path) -> None:
    saved = store.save({"w": torch.randn(512, 512)}, name="m")
    (blob,) = store.info(saved.ref).manifest.tensor_blobs
    path = store_path / blob_key(blob.digest)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(elsewhere)
    with pytest.raises(IntegrityError, match="not a regular file"):
        Store.open(store_path).load(saved.ref)


def test_an_unknown_outcome_names_the_commit_to_look_for(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from fracstore import OutcomeUnknownError

    _publish(store, 1)
    monkeypatch.setattr(store.registry, "_sleep", lambda seconds: None)
    original_put, original_read = Backend.put_if_absent, Backend.read
    state = {"landed": False}

    def lands_then_fails(self: Backend, key: str, data: object, **options: bool) -> bool:
        created = original_put(self, key, data, **options)  # type: ignore[arg-type]
        if key.startswith("log/") and not state["landed"]:
            state["landed"] = True
            raise StorageError("connection reset", key=key)
        return created

    def unreadable(self: Backend, key: str) -> bytes:
        if state["landed"] and key == log_key(2):
            raise StorageError("connection reset", key=key)
        return original_read(self, key)

    monkeypatch.setattr(Backend, "put_if_absent", lands_then_fails)
    monkeypatch.setattr(Backend, "read", unreadable)
    with pytest.raises(OutcomeUnknownError, match=r"check store\.log\(\)") as info:
        store.delete("m")
    assert info.value.seq == 2
    monkeypatch.setattr(Backend, "read", original_read)
    (entry,) = [e for e in Store.open(store.url).log() if e.writer.commit == info.value.commit]
    assert (entry.seq, entry.op, entry.version) == (2, "delete", 1)


def test_save_reports_its_own_version_even_if_deleted_right_after(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = Store.open(store.url)
    original = store.registry._applied

    def delete_in_between(entry: object, data: bytes) -> object:
        other.delete("m")  # another writer deletes the new version before this one reads on
        return original(entry, data)  # type: ignore[arg-type]

    monkeypatch.setattr(store.registry, "_applied", delete_in_between)
    saved = store.save({"w": torch.ones(2)}, name="m")
    assert saved.version == 1
    assert [e.op for e in store.log()] == ["publish", "delete"]


def test_a_tensor_changed_during_its_save_is_refused_not_stored(
    store: Store, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fracstore.codec import MaterializedBlob

    weight = torch.zeros(512, 512)
    original = MaterializedBlob.hash

    def hash_then_train(self: MaterializedBlob) -> object:
        result = original(self)
        weight.add_(1.0)  # an optimizer step lands between hashing and writing
        return result

    monkeypatch.setattr(MaterializedBlob, "hash", hash_then_train)
    with pytest.raises(IntegrityError, match="changed while it was being written"):
        store.save({"w": weight}, name="m")
    assert store.list().records == []
    for path in (store_path / "blobs").rglob("*"):
        if path.is_file():  # nothing under a blob name holds bytes that do not hash to it
            from fracstore.blobs import hash_file

            assert hash_file(path)[0].hex == path.name
