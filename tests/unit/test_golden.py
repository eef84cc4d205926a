"""Golden bytes: an accidental change of the manifest or log-entry encoding must fail here.

Changing these constants is a format change: bump the schema / entry format and document it in docs/format.md.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fracstore.codec import plan_state_dict
from fracstore.digest import Digest
from fracstore.errors import FormatError
from fracstore.manifest import SCHEMA, FileEntry, Manifest, TrainingSummary
from fracstore.registry_state import Entry, Writer

GOLDEN_MANIFEST_DIGEST = "sha256:d80fd26d86985060926599f115a1e1bc35c7f2abb4e2129f4bce19b037ffa796"
GOLDEN_ENTRY_HEX = (
    "88a6666f726d617401a86d616e6966657374d9477368613235363a63646364636463646364636463646364636463646364636463"
    "646364636463646364636463646364636463646364636463646364636463646364636463646364a46e616d65a470696e6ea26f70"
    "a77075626c697368a470726576d9477368613235363a616261626162616261626162616261626162616261626162616261626162"
    "61626162616261626162616261626162616261626162616261626162616261626162a373657102a474696d65bb323032362d3031"
    "2d30325430333a30343a30352e3030303030365aa677726974657283a6636f6d6d6974b030303131323233336161626263636464"
    "a4686f7374a4686f7374a37069642a"
)


def golden_manifest() -> Manifest:
    plan = plan_state_dict(
        {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)}, pack_threshold=16
    )
    hashed = {i: p.materialize().hash() for i, p in enumerate(plan.blobs)}
    return Manifest(
        name="pinn",
        model_type="pinn",
        created_at="2026-01-02T03:04:05.000006Z",
        tensors=plan.entries(hashed),
        description="d",
        labels=("demo",),
        config={"width": 8, "act": "tanh", "layers": [1, 2]},
        metrics={"val_loss": 0.25},
        training=TrainingSummary(duration_s=1.5, epochs=3, converged=True),
        environment={"python": "3.11.7", "torch": "2.13.0"},
        files=(FileEntry("a.json", Digest.of(b"{}"), 2, "application/json"),),
        tensor_blobs=tuple(hashed[i][0] for i in range(len(plan.blobs))),
        history=Digest.of(b"h"),
        history_size=1,
    )


def golden_entry() -> Entry:
    return Entry(
        seq=2,
        op="publish",
        time="2026-01-02T03:04:05.000006Z",
        writer=Writer("host", 42, "00112233aabbccdd"),
        prev=Digest("ab" * 32),
        name="pinn",
        manifest=Digest("cd" * 32),
    )


def test_manifest_bytes_are_pinned() -> None:
    data = golden_manifest().to_bytes()
    assert str(Digest.of(data)) == GOLDEN_MANIFEST_DIGEST
    assert Manifest.from_bytes(data) == golden_manifest()


def test_manifest_encoding_ignores_config_insertion_order() -> None:
    first = golden_manifest()
    second = dataclasses.replace(first, config={"layers": [1, 2], "act": "tanh", "width": 8})
    assert first.to_bytes() == second.to_bytes()


def test_log_entry_bytes_are_pinned() -> None:
    assert golden_entry().to_bytes().hex() == GOLDEN_ENTRY_HEX
    assert Entry.from_bytes(bytes.fromhex(GOLDEN_ENTRY_HEX), seq=2) == golden_entry()


def test_readers_ignore_unknown_fields() -> None:
    from fracstore import canonical

    raw = golden_manifest().to_dict()
    raw["future_field"] = {"anything": [1, 2, 3]}
    raw["tensors"][0]["future"] = True
    assert Manifest.from_bytes(canonical.encode(raw)) == golden_manifest()
    entry = golden_entry().to_dict()
    entry["future"] = "x"
    assert Entry.from_bytes(canonical.encode(entry), seq=2) == golden_entry()


def test_newer_schema_and_mismatched_seq_are_refused() -> None:
    from fracstore import canonical

    raw = golden_manifest().to_dict()
    raw["schema"] = SCHEMA + 1
    with pytest.raises(FormatError, match="newer"):
        Manifest.from_bytes(canonical.encode(raw))
    with pytest.raises(FormatError, match="says it is entry 2"):
        Entry.from_bytes(golden_entry().to_bytes(), seq=3)
    with pytest.raises(FormatError, match="malformed"):
        Manifest.from_bytes(canonical.encode({"schema": 1}))


def test_aliases_must_name_a_stored_tensor() -> None:
    manifest = golden_manifest()
    bad = dataclasses.replace(manifest.tensors[0], name="tied", alias="nowhere")
    with pytest.raises(FormatError, match="alias"):
        dataclasses.replace(manifest, tensors=(*manifest.tensors, bad))
