"""Dedup measured on disk: the same bytes are stored once, across versions, names and renames, and a tensor's blob
digest depends only on its dtype, shape and bytes."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

from fracstore import Digest, Store
from fracstore.codec import TORCH_TO_ST, single_tensor_bytes
from tests.helpers import blob_bytes_on_disk, blob_files

MIB = 1 << 20
LAYERS = 16
LAYER_ELEMENTS = MIB // 4  # float32: exactly 1 MiB per tensor, at the pack threshold, so each gets its own blob


def _layers(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {f"layers.{i}.weight": torch.randn(LAYER_ELEMENTS, generator=g) for i in range(LAYERS)}
    state.update({f"layers.{i}.bias": torch.randn(16, generator=g) for i in range(LAYERS)})
    return state


def _blob(store_path: Path, digest: Digest) -> Path:
    return store_path / "blobs" / "sha256" / digest.hex[:2] / digest.hex


def test_same_model_twice_adds_only_a_manifest(store: Store, store_path: Path) -> None:
    state = _layers(0)
    first = store.save(state, name="m")
    files_before, bytes_before = blob_files(store_path), blob_bytes_on_disk(store_path)
    assert first.bytes_written == bytes_before
    assert first.blobs_written == len(files_before) == LAYERS + 2  # 16 big, 1 packed, 1 manifest

    second = store.save(state, name="m")
    new_files = blob_files(store_path) - files_before
    assert new_files == {_blob(store_path, second.digest)}
    assert second.blobs_written == 1
    assert (
        second.bytes_written
        == blob_bytes_on_disk(store_path) - bytes_before
        == _blob(store_path, second.digest).stat().st_size
    )
    assert second.bytes_written < 64 * 1024
    assert second.bytes_total == first.bytes_total - _blob(store_path, first.digest).stat().st_size + (
        second.bytes_written
    )
    # The same weights under another name dedup just the same.
    other = store.save(state, name="copy")
    assert blob_files(store_path) - files_before - new_files == {_blob(store_path, other.digest)}


def test_one_changed_tensor_of_sixteen_adds_one_sixteenth(store: Store, store_path: Path) -> None:
    state = _layers(1)
    first = store.save(state, name="m")
    total_before = blob_bytes_on_disk(store_path)
    assert total_before >= LAYERS * MIB

    changed = dict(state)
    changed["layers.7.weight"] = state["layers.7.weight"] + 1.0
    files_before = blob_files(store_path)
    second = store.save(changed, name="m")
    growth = blob_bytes_on_disk(store_path) - total_before

    assert second.bytes_written == growth
    assert second.blobs_written == len(blob_files(store_path) - files_before) == 2  # the new tensor, the manifest
    # One tensor blob (1 MiB + a small header) plus a manifest: about 1/16 of the model.
    assert MIB < growth < MIB + 64 * 1024
    assert growth / total_before == pytest.approx(1 / LAYERS, abs=0.005)
    manifest = store.info(second.ref).manifest
    new_blob = next(t.blob for t in manifest.tensors if t.name == "layers.7.weight")
    assert _blob(store_path, new_blob) in blob_files(store_path) - files_before
    assert second.bytes_total == pytest.approx(first.bytes_total, rel=0.001)
    loaded = store.load("m@2")
    assert all(torch.equal(loaded[k], changed[k]) for k in changed)
    assert torch.equal(store.load("m@1")["layers.7.weight"], state["layers.7.weight"])


def test_renamed_tensor_still_dedups(store: Store, store_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    big = torch.randn(LAYER_ELEMENTS, generator=g)
    first = store.save({"encoder.proj.weight": big}, name="a")
    files_before, bytes_before = blob_files(store_path), blob_bytes_on_disk(store_path)
    second = store.save({"backbone.renamed.weight": big.clone()}, name="b")
    assert blob_files(store_path) - files_before == {_blob(store_path, second.digest)}
    assert blob_bytes_on_disk(store_path) - bytes_before == second.bytes_written < 64 * 1024
    blob_a = store.info(first.ref).manifest.tensors[0].blob
    blob_b = store.info(second.ref).manifest.tensors[0].blob
    assert blob_a == blob_b
    assert torch.equal(store.load("b")["backbone.renamed.weight"], big)


def test_identical_untied_tensors_are_stored_once(store: Store, store_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(LAYER_ELEMENTS, generator=g)
    copy = big.clone()
    assert copy.data_ptr() != big.data_ptr()
    saved = store.save({"a": big, "b": copy}, name="m")
    manifest = store.info(saved.ref).manifest
    entries = {t.name: t for t in manifest.tensors}
    assert entries["a"].alias is None and entries["b"].alias is None  # equal values, but not tied
    assert entries["a"].blob == entries["b"].blob
    assert len(blob_files(store_path)) == 2  # one tensor blob, one manifest
    assert MIB <= blob_bytes_on_disk(store_path) < MIB + 64 * 1024
    assert saved.bytes_written == blob_bytes_on_disk(store_path)
    loaded = store.load("m")
    assert torch.equal(loaded["a"], big)
    assert torch.equal(loaded["b"], big)


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_identical_untied_tensors_load_as_independent_tensors(store: Store, backend: str) -> None:
    if backend == "memory":
        path = f"/fracstore-test-{uuid.uuid4().hex}"
        store = Store.open(f"memory://{path}")
    big = torch.randn(LAYER_ELEMENTS, generator=torch.Generator().manual_seed(4))
    try:
        store.save({"a": big, "b": big.clone()}, name="m")
        loaded = store.load("m")
        loaded["a"].add_(1.0)
        assert torch.equal(loaded["b"], big)
    finally:
        if backend == "memory":
            fsspec.filesystem("memory").rm(path, recursive=True)


def _every_dtype() -> dict[str, torch.Tensor]:
    base = torch.arange(32, dtype=torch.int64).reshape(4, 8)
    return {
        str(dtype).removeprefix("torch."): (base % 3 == 0) if dtype is torch.bool else base.to(dtype)
        for dtype in TORCH_TO_ST
    }


def test_every_dtype_blob_digest_is_stable(tmp_path: Path) -> None:
    tensors = _every_dtype()
    assert {"float32", "bfloat16", "float16", "int64", "bool", "uint8", "float8_e4m3fn"} <= set(tensors)
    expected = {name: Digest.of(single_tensor_bytes(t)) for name, t in tensors.items()}
    assert len(set(expected.values())) == len(expected)  # dtype is part of the identity

    digests = []
    for attempt in range(2):
        path = tmp_path / f"store{attempt}"
        store = Store.open(path, pack_threshold=0)  # every tensor in a blob of its own
        # The second save hands in non-contiguous views with the same values: only dtype, shape and bytes count.
        state = tensors if attempt == 0 else {k: t.T.contiguous().T for k, t in tensors.items()}
        if attempt == 1:
            assert not any(t.is_contiguous() for t in state.values())
        saved = store.save(state, name="dtypes")
        entries = {t.name: t for t in store.info(saved.ref).manifest.tensors}
        digests.append({name: entry.blob for name, entry in entries.items()})
        for name, entry in entries.items():
            assert entry.digest == entry.blob
            blob = path / "blobs" / "sha256" / entry.blob.hex[:2] / entry.blob.hex
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry.blob.hex, name
        loaded = Store.open(path).load("dtypes")
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype, name
            assert tuple(loaded[name].shape) == tuple(tensor.shape), name
            assert torch.equal(loaded[name].contiguous().view(torch.uint8), tensor.view(torch.uint8)), name
    assert digests[0] == digests[1] == expected

    # Packed with the default threshold, each tensor's digest is still that of its own single-tensor blob.
    packed = Store.open(tmp_path / "packed")
    saved = packed.save(tensors, name="dtypes")
    manifest = packed.info(saved.ref).manifest
    assert len(manifest.tensor_blobs) == 1
    assert {t.name: t.digest for t in manifest.tensors} == expected
