"""Golden bytes of a bundle: an accidental change of the bundle format (index encoding, member order, zip header
fields) must fail here.

Changing these constants is a format change: bump the bundle format and document it in docs/format.md, "Bundles".
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from fracstore import canonical
from fracstore.bundle import (
    INDEX_MEMBER,
    ZIP_DATE_TIME,
    ZIP_MEMBER_MODE,
    BundleIndex,
    BundleModel,
    member_name,
    write_bundle,
)
from fracstore.codec import plan_state_dict
from fracstore.digest import Descriptor, Digest
from fracstore.errors import FormatError
from fracstore.manifest import FileEntry, Manifest, TrainingSummary
from fracstore.registry_state import Entry, Writer

GOLDEN_BUNDLE_SHA256 = "b836fdeb3728ba07150aab9aeb38c00e720de1aaec80ba41153c6e4ec60fde8e"
GOLDEN_INDEX_SHA256 = "3ee9443e9307f26991f03bf4d6252f960ce5c0c8970c3f5913033a859c283dd1"
GOLDEN_FILE_SIZE = 4318

WRITER = Writer("host", 42, "00112233aabbccdd")
TIME = "2026-01-02T03:04:05.000006Z"


def golden_state_dict() -> dict[str, torch.Tensor]:
    """Two tensors of their own (pack_threshold 16), one packed, and a tied alias of ``w``."""
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {"w": w, "v": torch.full((2, 2), 0.5, dtype=torch.float64), "b": torch.zeros(2), "w_tied": w}


def golden_blobs() -> tuple[Manifest, dict[Digest, bytes]]:
    """The manifest (fixed time and environment, as in test_golden.py) and every blob's bytes, manifest included."""
    plan = plan_state_dict(golden_state_dict(), pack_threshold=16)
    blobs: dict[Digest, bytes] = {}
    hashed = {}
    for i, pending in enumerate(plan.blobs):
        materialized = pending.materialize()
        hashed[i] = materialized.hash()
        blobs[hashed[i][0].digest] = b"".join(bytes(c) for c in materialized.chunks)
    history = canonical.encode({"loss": [1.0, 0.5, 0.25]})
    readme = b"# golden\n"
    blobs[Digest.of(history)] = history
    blobs[Digest.of(readme)] = readme
    manifest = Manifest(
        name="pinn",
        model_type="pinn",
        created_at=TIME,
        tensors=plan.entries(hashed),
        description="golden bundle",
        labels=("demo",),
        config={"width": 3},
        metrics={"val_loss": 0.25},
        training=TrainingSummary(duration_s=1.5, epochs=3, converged=True),
        environment={"python": "3.11.7", "torch": "2.13.0"},
        files=(FileEntry("README.md", Digest.of(readme), len(readme), "text/markdown"),),
        tensor_blobs=tuple(hashed[i][0] for i in range(len(plan.blobs))),
        history=Digest.of(history),
        history_size=len(history),
    )
    data = manifest.to_bytes()
    blobs[Digest.of(data)] = data
    return manifest, blobs


def golden_index() -> tuple[BundleIndex, dict[Digest, bytes]]:
    manifest, blobs = golden_blobs()
    digest = Digest.of(manifest.to_bytes())
    publish = Entry(seq=1, op="publish", time=TIME, writer=WRITER, prev=None, name="pinn", manifest=digest)
    chained = Digest.of(publish.to_bytes())
    tag = Entry(seq=2, op="tag", time=TIME, writer=WRITER, prev=chained, name="pinn", tag="prod", version=1)
    model = BundleModel("pinn", 1, digest, ("prod",), (publish.to_bytes(), tag.to_bytes()))
    descriptors = tuple(Descriptor(d, len(blobs[d])) for d in sorted(blobs, key=lambda d: d.hex))
    return BundleIndex(models=(model,), blobs=descriptors), blobs


def write_golden_bundle(path: Path) -> BundleIndex:
    """Write the golden bundle to ``path`` (also used by the integration tests, which import it into a store)."""
    index, blobs = golden_index()
    write_bundle(path, index, lambda descriptor: [blobs[descriptor.digest]])
    return index


def test_bundle_bytes_are_pinned(tmp_path: Path) -> None:
    path = tmp_path / "golden.zip"
    write_golden_bundle(path)
    data = path.read_bytes()
    assert len(data) == GOLDEN_FILE_SIZE
    assert hashlib.sha256(data).hexdigest() == GOLDEN_BUNDLE_SHA256


def test_index_bytes_are_pinned_and_decode_to_the_same_index() -> None:
    index, _ = golden_index()
    data = index.to_bytes()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_INDEX_SHA256
    assert BundleIndex.from_bytes(data) == index
    raw = canonical.decode(data, what="index", max_bytes=1 << 20)
    assert sorted(raw) == ["blobs", "format", "models"]
    assert raw["format"] == 1
    assert sorted(raw["models"][0]) == ["log", "manifest", "name", "tags", "version"]


def test_zip_structure_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "golden.zip"
    index = write_golden_bundle(path)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == [INDEX_MEMBER, *(member_name(d.digest) for d in index.blobs)]
        assert [i.filename for i in infos[1:]] == sorted(i.filename for i in infos[1:])
        for info in infos:
            assert info.date_time == ZIP_DATE_TIME
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.external_attr == ZIP_MEMBER_MODE << 16
            assert info.create_system == 3
            assert info.extra == b""
        assert archive.comment == b""
    # Written twice: the same bytes (nothing from the clock or the file system goes in).
    again = tmp_path / "again.zip"
    write_golden_bundle(again)
    assert again.read_bytes() == path.read_bytes()


def test_readers_ignore_unknown_index_fields() -> None:
    index, _ = golden_index()
    raw = canonical.decode(index.to_bytes(), what="index", max_bytes=1 << 20)
    raw["future"] = [1, 2]
    raw["models"][0]["future"] = {"x": True}
    raw["blobs"][0]["media_type"] = "x"
    assert BundleIndex.from_bytes(canonical.encode(raw)) == index


def test_newer_format_and_inconsistent_provenance_are_refused() -> None:
    index, _ = golden_index()
    raw = canonical.decode(index.to_bytes(), what="index", max_bytes=1 << 20)
    with pytest.raises(FormatError, match="newer"):
        BundleIndex.from_bytes(canonical.encode({**raw, "format": 2}))
    with pytest.raises(FormatError, match="format version"):
        BundleIndex.from_bytes(canonical.encode({**raw, "format": True}))
    model = raw["models"][0]
    with pytest.raises(FormatError, match="tag entries"):
        BundleIndex.from_bytes(canonical.encode({**raw, "models": [{**model, "tags": ["other"]}]}))
    with pytest.raises(FormatError, match="publish"):
        BundleIndex.from_bytes(canonical.encode({**raw, "models": [{**model, "log": model["log"][1:]}]}))
    with pytest.raises(FormatError, match="not a tag of this version"):
        BundleIndex.from_bytes(canonical.encode({**raw, "models": [{**model, "version": 2}]}))
    with pytest.raises(FormatError, match="no manifest blob"):
        BundleIndex.from_bytes(canonical.encode({**raw, "blobs": []}))
    with pytest.raises(FormatError, match="at least one model"):
        BundleIndex.from_bytes(canonical.encode({**raw, "models": []}))
    with pytest.raises(FormatError, match="malformed"):
        BundleIndex.from_bytes(canonical.encode({"format": 1}))
