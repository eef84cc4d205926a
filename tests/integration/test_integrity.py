"""Tampering with a local store's files is detected; loads never write to blobs; a failed save writes nothing.

Blob files are made read-only (0444) by the store, so every test that damages one first makes it writable, which
itself changes the file's ctime: each test therefore loads once *after* the chmod when it needs the verified-state
record to be current, so that what is detected is the damage, not the chmod.
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

import fracstore.blobs
from fracstore import Digest, FormatError, IntegrityError, NotFoundError, Store
from tests.helpers import blob_files

BIG = 300_000  # float32 elements: 1.2 MB, over the 1 MiB pack threshold, so the tensor has a blob of its own


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(BIG, generator=g), "b": torch.randn(5, generator=g)}


def _blob_path(store_path: Path, digest: Digest) -> Path:
    return store_path / "blobs" / "sha256" / digest.hex[:2] / digest.hex


def _tensor_blob(store: Store, ref: str, tensor: str = "w") -> Digest:
    return next(t.blob for t in store.info(ref).manifest.tensors if t.name == tensor)


def _writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(store: Store) -> tuple[Store, Digest]:
    result = store.save(_weights(), name="m")
    return store, _tensor_blob(store, result.ref)


def test_blob_files_are_read_only_and_hash_to_their_names(saved: tuple[Store, Digest], store_path: Path) -> None:
    files = blob_files(store_path)
    assert len(files) == 3  # the big tensor, the packed blob, the manifest
    for path in files:
        assert path.stat().st_mode & 0o222 == 0, path
        assert _sha256(path) == path.name


def test_flipped_byte_in_tensor_blob_is_detected(saved: tuple[Store, Digest], store_path: Path) -> None:
    store, digest = saved
    path = _blob_path(store_path, digest)
    _writable(path)
    _flip_byte(path, path.stat().st_size - 1)
    with pytest.raises(IntegrityError) as info:
        store.load("m")
    error = info.value
    assert digest.hex in str(error)
    assert digest.hex in error.key
    assert error.expected == str(digest)
    assert error.actual not in ("", str(digest))
    # A fresh Store (no in-memory state) sees it too.
    with pytest.raises(IntegrityError):
        Store.open(store.url).load("m")


def test_same_size_edit_with_restored_mtime_is_detected(saved: tuple[Store, Digest], store_path: Path) -> None:
    store, digest = saved
    path = _blob_path(store_path, digest)
    _writable(path)
    assert torch.equal(store.load("m")["w"], _weights()["w"])  # re-hashed after the chmod; record now current
    before = path.stat()
    _flip_byte(path, before.st_size // 2)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(IntegrityError) as info:
        store.load("m")
    assert info.value.expected == str(digest)


def test_unchanged_blob_is_not_rehashed_but_changed_one_is(
    saved: tuple[Store, Digest], store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, digest = saved
    real = fracstore.blobs.hash_file
    hashed: list[Path] = []

    def counting(path: Path) -> Any:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(fracstore.blobs, "hash_file", counting)
    store.load("m")
    store.load("m")
    assert hashed == []  # the save recorded the verified state; a stat match costs no re-hash
    path = _blob_path(store_path, digest)
    _writable(path)  # only the ctime changes: enough to distrust the record
    store.load("m")
    assert path in hashed


def test_truncated_blob_is_detected(saved: tuple[Store, Digest], store_path: Path) -> None:
    store, digest = saved
    path = _blob_path(store_path, digest)
    _writable(path)
    size = path.stat().st_size
    os.truncate(path, size - 100)
    with pytest.raises(IntegrityError) as info:
        store.load("m")
    assert digest.hex in str(info.value)
    assert digest.hex in info.value.key
    assert info.value.expected == str(size)
    assert info.value.actual == str(size - 100)


def test_deleted_blob_is_not_found(saved: tuple[Store, Digest], store_path: Path) -> None:
    store, digest = saved
    _blob_path(store_path, digest).unlink()
    with pytest.raises(NotFoundError) as info:
        store.load("m")
    assert str(digest) in str(info.value)
    assert info.value.what == str(digest)


def test_corrupt_manifest_blob_is_detected(store: Store, store_path: Path) -> None:
    result = store.save(_weights(), name="m")
    path = _blob_path(store_path, result.digest)
    _writable(path)
    _flip_byte(path, 10)
    fresh = Store.open(store.url)  # the writer remembers its manifest; a fresh reader must read the blob
    for action in (lambda: fresh.load("m"), fresh.list, lambda: fresh.info("m")):
        with pytest.raises(IntegrityError) as info:
            action()
        assert result.digest.hex in str(info.value)


def test_truncated_manifest_blob_is_detected(store: Store, store_path: Path) -> None:
    result = store.save(_weights(), name="m")
    path = _blob_path(store_path, result.digest)
    _writable(path)
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(IntegrityError):
        Store.open(store.url).resolve("m")


def test_corrupt_history_and_file_blobs_are_detected(store: Store, store_path: Path) -> None:
    result = store.save(_weights(), name="m", history={"loss": [3.0, 2.0, 1.0]}, files={"a.txt": b"hello world"})
    manifest = store.info(result.ref).manifest
    assert manifest.history is not None
    for digest in (manifest.history, manifest.files[0].blob):
        path = _blob_path(store_path, digest)
        _writable(path)
        _flip_byte(path, 0)
    with pytest.raises(IntegrityError):
        store.history("m")
    with pytest.raises(IntegrityError):
        store.read_file("m", "a.txt")


@pytest.fixture
def memory_url() -> Iterator[str]:
    path = f"/fracstore-test-{uuid.uuid4().hex}"
    yield f"memory://{path}"
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_corrupt_blob_in_memory_store_is_detected(memory_url: str, tmp_path: Path) -> None:
    store = Store.open(memory_url)
    result = store.save(_weights(), name="m")
    digest = _tensor_blob(store, result.ref)
    fs = fsspec.filesystem("memory")
    key = f"{memory_url.removeprefix('memory://')}/blobs/sha256/{digest.hex[:2]}/{digest.hex}"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    # The saving machine's cache holds the good copy it wrote, so its loads are unaffected...
    assert torch.equal(Store.open(memory_url).load("m")["w"], _weights()["w"])
    # ...while a machine without it fetches the store's copy and refuses it.
    with pytest.raises(IntegrityError) as info:
        Store.open(memory_url, cache_dir=tmp_path / "other-machine").load("m")
    assert info.value.expected == str(digest)
    assert memory_url in str(info.value)


def test_loaded_tensors_are_copy_on_write(saved: tuple[Store, Digest], store_path: Path) -> None:
    store, digest = saved
    path = _blob_path(store_path, digest)
    before = _sha256(path)
    assert before == digest.hex
    state = store.load("m")
    state["w"].add_(1.0)
    state["w"][0] = 12345.0
    state["b"].zero_()
    assert state["w"][0].item() == 12345.0
    del state
    assert _sha256(path) == digest.hex
    for blob in blob_files(store_path):
        assert _sha256(blob) == blob.name
    again = Store.open(store.url).load("m")
    expected = _weights()
    assert torch.equal(again["w"], expected["w"])
    assert torch.equal(again["b"], expected["b"])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"model": {"w": torch.ones(2), "step": 3}}, "'step'"),
        ({"model": {"w": torch.ones(2), "opt": {"lr": torch.ones(1)}}}, "'opt'"),
        ({"model": {"w": torch.ones(2), 7: torch.ones(2)}}, "7"),
        ({"model": {"w": torch.ones(2), "c": torch.ones(2, dtype=torch.complex128)}}, "'c'"),
        ({"model": {"w": torch.ones(2), "s": torch.ones(2).to_sparse()}}, "'s'"),
        ({"model": {"w": torch.ones(2), "__metadata__": torch.ones(2)}}, "__metadata__"),
        ({"name": "bad name"}, "bad name"),
        ({"name": "../up"}, "../up"),
        ({"config": {"choices": {1, 2}}}, "choices"),
        ({"config": {"obj": object()}}, "obj"),
        ({"config": {3: "x"}}, "3"),
        ({"metrics": {"val_loss": "low"}}, "val_loss"),
        ({"metrics": {"ok": True}}, "ok"),
        ({"history": {"loss": {1.0, 2.0}}}, "loss"),
        ({"training": {"duration": 3.0}}, "duration"),
        ({"files": {"../escape.txt": b"x"}}, "escape.txt"),
        ({"files": {"a.txt": 42}}, "a.txt"),
        ({"tags": ["ok", " leading-space"]}, "leading-space"),
        ({"tags": ["a,b"]}, "a,b"),
        ({"tags": "single-string"}, "single-string"),
        ({"model_type": "t" * 129}, "model type"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_failed_save_leaves_store_unchanged(
    store: Store, store_path: Path, kwargs: dict[str, Any], needle: str
) -> None:
    g = torch.Generator().manual_seed(1)
    store.save({"x": torch.randn(BIG, generator=g), "y": torch.ones(3)}, name="m")  # a store with content
    store.tag("m@1", "prod")
    before = _snapshot(store_path)
    arguments: dict[str, Any] = {"model": {"w": torch.randn(BIG, generator=g), "v": torch.ones(4)}, "name": "m"}
    arguments.update(kwargs)
    model = arguments.pop("model")
    with pytest.raises(FormatError) as info:
        store.save(model, **arguments)
    assert needle in str(info.value)
    assert _snapshot(store_path) == before
    assert [r.ref for r in Store.open(store.url).list()] == ["m@1"]


def test_failed_save_with_unknown_parent_leaves_store_unchanged(store: Store, store_path: Path) -> None:
    store.save(_weights(), name="m")
    before = _snapshot(store_path)
    with pytest.raises(NotFoundError):
        store.save(_weights(1), name="m", parent="nope@1")
    assert _snapshot(store_path) == before
