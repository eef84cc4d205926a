"""Store.verify: the log, every live manifest and every referenced blob, with problems reported, not raised."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest
import torch

from fracstore import Store
from fracstore.digest import Digest
from fracstore.layout import blob_key, log_key


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(512, 1024, generator=g), "b": torch.randn(4, generator=g)}


def _tensor_blob(store: Store, ref: str) -> Digest:
    manifest = store.manifest(store.resolve(ref).digest)
    return max(manifest.tensor_blobs, key=lambda d: d.size).digest


def _flip_last_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_healthy_store_has_no_problems(store: Store) -> None:
    store.save(_weights(0), name="m", history={"loss": [1.0, 0.5]})
    store.save(_weights(1), name="m")
    report = store.verify()
    assert report.ok and report.problems == ()
    assert (report.entries_checked, report.versions_checked) == (2, 2)
    # a tensor blob, a packed blob and a manifest per version, plus one history blob
    assert report.blobs_checked == 7
    assert report.unreferenced_blobs == 0


def test_a_changed_local_blob_is_found_without_read_data(store: Store, store_path: Path) -> None:
    store.save(_weights(), name="m")
    digest = _tensor_blob(store, "m")
    _flip_last_byte(store_path / blob_key(digest))
    report = Store.open(store_path).verify()
    assert [(p.kind, p.subject) for p in report.problems] == [("corrupt-blob", str(digest))]
    assert "m@1" in report.problems[0].message


def test_missing_blob_and_unreferenced_blobs_are_reported(store: Store, store_path: Path) -> None:
    store.save(_weights(0), name="m")
    store.save(_weights(1), name="gone")
    store.delete("gone")
    digest = _tensor_blob(store, "m")
    os.unlink(store_path / blob_key(digest))
    report = store.verify()
    assert [(p.kind, p.subject) for p in report.problems] == [("missing-blob", str(digest))]
    assert "push the model again" in report.problems[0].message
    assert report.unreferenced_blobs == 3  # the deleted version's tensor blob, packed blob and manifest


def test_a_corrupt_manifest_is_reported_with_its_version(store: Store, store_path: Path) -> None:
    store.save(_weights(), name="m")
    _flip_last_byte(store_path / blob_key(store.resolve("m").digest))
    report = Store.open(store_path).verify()
    assert [(p.kind, p.subject) for p in report.problems] == [("manifest", "m@1")]


def test_a_rewritten_log_entry_is_reported_and_ends_the_run(store: Store, store_path: Path) -> None:
    store.save(_weights(0), name="m")
    store.save(_weights(1), name="m")
    store.save(_weights(2), name="m")
    _flip_last_byte(store_path / log_key(2))
    report = Store.open(store_path).verify()
    assert [p.kind for p in report.problems] == ["log"]
    assert report.versions_checked == 0


@pytest.mark.parametrize("read_data", [False, True])
def test_read_data_rehashes_the_store_copy_not_the_cache(tmp_path: Path, read_data: bool) -> None:
    url = f"memory://verify-{tmp_path.name}"
    store = Store.open(url)
    store.save(_weights(), name="m")
    digest = _tensor_blob(store, "m")
    fs = fsspec.filesystem("memory")
    key = f"/verify-{tmp_path.name}/{blob_key(digest)}"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0x01
    fs.pipe_file(key, bytes(data))  # same size: only a re-hash can tell
    try:
        report = store.verify(read_data=read_data)
        if read_data:
            assert [(p.kind, p.subject) for p in report.problems] == [("corrupt-blob", str(digest))]
            assert url in report.problems[0].message
        else:
            assert report.ok  # presence and size are fine; the local cache still holds a good copy
    finally:
        fs.rm(f"/verify-{tmp_path.name}", recursive=True)
