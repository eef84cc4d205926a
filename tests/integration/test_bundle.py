"""Bundles on real files: export, import into another store, determinism, and every kind of tampering."""

from __future__ import annotations

import shutil
import struct
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fracstore
from fracstore import Store, canonical
from fracstore.bundle import (
    INDEX_MEMBER,
    MAX_INDEX_BYTES,
    BundleIndex,
    export_bundle,
    import_bundle,
    member_name,
    read_bundle_index,
)
from fracstore.compat import ModelPersistenceManager
from fracstore.digest import Digest
from fracstore.errors import ConfigError, FormatError, IntegrityError, NotFoundError
from fracstore.layout import blob_key
from fracstore.model_types import unregister_model_type
from tests.helpers import blob_files
from tests.unit.test_golden_bundle import golden_state_dict, write_golden_bundle

HISTORY = {"loss": [1.0, 0.5, 0.25], "val_loss": [1.1, 0.6, 0.3]}


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Several tensors of different dtypes, and a tied weight (head.weight is emb.weight)."""
    generator = torch.Generator().manual_seed(seed)
    emb = torch.randn(6, 4, generator=generator)
    return {
        "emb.weight": emb,
        "head.weight": emb,
        "head.bias": torch.randn(6, generator=generator),
        "norm.weight": torch.ones(4, dtype=torch.float64),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def save(store: Store, seed: int, *, name: str = "pinn", **kwargs: object) -> str:
    saved = store.save(
        state_dict(seed),
        name=name,
        model_type="pinn",
        config={"width": 4, "seed": seed},
        metrics={"val_loss": 0.1 * seed},
        history=HISTORY,
        files={"README.md": f"model {seed}\n".encode()},
        description=f"seed {seed}",
        **kwargs,  # type: ignore[arg-type]
    )
    return saved.ref


@pytest.fixture
def source(tmp_path: Path) -> Store:
    # pack_threshold=0: every tensor its own blob, so blobs are shared between versions and dedup is visible.
    return Store.open(tmp_path / "source", pack_threshold=0)


@pytest.fixture
def dest(tmp_path: Path) -> Store:
    """Another machine's store, already holding an unrelated model (so its log is not empty)."""
    store = Store.open(tmp_path / "elsewhere" / "store")
    store.save({"x": torch.zeros(3)}, name="unrelated")
    return store


def assert_same_weights(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(expected)
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor), key


# -- round trip ---------------------------------------------------------------------------------------------------


def test_round_trip_into_a_fresh_store_in_another_folder(source: Store, dest: Store, tmp_path: Path) -> None:
    ref = save(source, 1, tags=["demo"])
    source.tag(ref, "prod")
    path = tmp_path / "out" / "pinn.zip"
    path.parent.mkdir()

    summary = export_bundle(source, ["pinn"], path)
    assert summary.path == path and summary.file_size == path.stat().st_size
    (model,) = summary.models
    assert (model.name, model.version, model.tags) == ("pinn", 1, ("prod",))
    assert model.digest == source.resolve(ref).digest
    # emb, bias, norm, steps (head.weight is tied: no bytes), history, README, manifest
    assert summary.blob_count == 7
    assert [e.op for e in model.entries()] == ["publish", "tag"]
    assert [p.name for p in path.parent.iterdir()] == ["pinn.zip"]  # no temp file left behind

    result = import_bundle(dest, path)
    (record,) = result.models
    assert (record.name, record.version, record.digest, record.tags) == ("pinn", 1, model.digest, ("prod",))
    assert result.published == ("pinn@1",)
    assert (result.blobs_written, result.blobs_present) == (7, 0)
    assert result.bytes_written == result.bytes_total == summary.total_bytes

    loaded = dest.load("pinn:prod")
    assert_same_weights(loaded, state_dict(1))
    assert loaded["head.weight"] is loaded["emb.weight"]  # the tie survives
    assert dest.history("pinn@1") == HISTORY
    assert dest.read_file("pinn@1", "README.md") == b"model 1\n"
    info = dest.info("pinn@1")
    assert info.manifest == source.info(ref).manifest
    assert info.record.labels == ("demo",) and info.record.metrics == {"val_loss": 0.1}


def test_memory_stores_round_trip(tmp_path: Path) -> None:
    # Not local: export reads blobs with get(), import writes them without a local file.
    first = Store.open(f"memory://bundle-{uuid.uuid4().hex}")
    second = Store.open(f"memory://bundle-{uuid.uuid4().hex}")
    save(first, 3)
    export_bundle(first, ["pinn@1"], tmp_path / "m.zip")
    (record,) = import_bundle(second, tmp_path / "m.zip").models
    assert record.digest == first.resolve("pinn@1").digest
    assert_same_weights(second.load("pinn"), state_dict(3))


def test_the_golden_bundle_imports_and_loads(dest: Store, tmp_path: Path) -> None:
    index = write_golden_bundle(tmp_path / "golden.zip")
    assert read_bundle_index(tmp_path / "golden.zip") == index
    (record,) = import_bundle(dest, tmp_path / "golden.zip").models
    assert (record.ref, record.tags, record.created_at) == ("pinn@1", ("prod",), "2026-01-02T03:04:05.000006Z")
    loaded = dest.load("pinn:prod")
    assert_same_weights(loaded, golden_state_dict())
    assert loaded["w_tied"] is loaded["w"]


# -- choosing what goes in ----------------------------------------------------------------------------------------


def test_all_versions_takes_every_live_version(source: Store, dest: Store, tmp_path: Path) -> None:
    for seed in (1, 2, 3, 4):
        save(source, seed)
    source.delete("pinn@2")
    source.tag("pinn@3", "prod")
    save(source, 5, name="other")

    summary = export_bundle(source, ["pinn:prod"], tmp_path / "all.zip", all_versions=True)
    assert [m.ref for m in summary.models] == ["pinn@1", "pinn@3", "pinn@4"]
    assert [m.tags for m in summary.models] == [(), ("prod",), ()]

    result = import_bundle(dest, tmp_path / "all.zip")
    # The destination numbers its own versions, in the bundle's order.
    assert [(r.ref, r.digest) for r in result.models] == [
        ("pinn@1", source.resolve("pinn@1").digest),
        ("pinn@2", source.resolve("pinn@3").digest),
        ("pinn@3", source.resolve("pinn@4").digest),
    ]
    assert dest.resolve("pinn:prod").version == 2
    assert_same_weights(dest.load("pinn:prod"), state_dict(3))
    with pytest.raises(NotFoundError):
        dest.resolve("other")


def test_one_version_per_ref_and_duplicates_once(source: Store, tmp_path: Path) -> None:
    for seed in (1, 2, 3):
        save(source, seed)
    digest = source.resolve("pinn@2").digest
    summary = export_bundle(source, ["pinn@3", digest.hex[:12], "pinn@2", "pinn"], tmp_path / "b.zip")
    assert [m.ref for m in summary.models] == ["pinn@2", "pinn@3"]


def test_refs_are_checked(source: Store, tmp_path: Path) -> None:
    save(source, 1)
    with pytest.raises(FormatError, match="list of refs"):
        export_bundle(source, "pinn", tmp_path / "x.zip")
    with pytest.raises(FormatError, match="at least one ref"):
        export_bundle(source, [], tmp_path / "x.zip")
    with pytest.raises(NotFoundError):
        export_bundle(source, ["nope"], tmp_path / "x.zip")
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.parametrize("carry", [True, False])
def test_tags_carried_or_not(source: Store, dest: Store, tmp_path: Path, carry: bool) -> None:
    save(source, 1)
    save(source, 2)
    source.tag("pinn@1", "prod")
    source.tag("pinn@1", "stable")
    source.tag("pinn@2", "prod")  # moved away from 1 ...
    source.tag("pinn@1", "prod")  # ... and back: the entry carried is the last one
    save(dest, 9)
    dest.tag("pinn@1", "prod")  # the destination's own prod, which an import with tags moves
    summary = export_bundle(source, ["pinn@1"], tmp_path / "t.zip")
    (model,) = summary.models
    assert model.tags == ("prod", "stable")
    # The publish entry, and for each tag the entry that set it (prod: the last of its three moves).
    assert [(e.op, e.tag, e.seq) for e in model.entries()] == [
        ("publish", None, 1),
        ("tag", "stable", 4),
        ("tag", "prod", 6),
    ]

    result = import_bundle(dest, tmp_path / "t.zip", tags=carry)
    (record,) = result.models
    assert record.version == 2
    if carry:
        assert record.tags == ("prod", "stable")
        assert dest.resolve("pinn:prod").version == 2
    else:
        assert record.tags == ()
        assert dest.resolve("pinn:prod").version == 1
        with pytest.raises(NotFoundError):
            dest.resolve("pinn:stable")


# -- determinism --------------------------------------------------------------------------------------------------


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def test_export_is_deterministic(source: Store, tmp_path: Path) -> None:
    save(source, 1)
    save(source, 2)
    source.tag("pinn@1", "prod")
    first = export_bundle(source, ["pinn@1", "pinn@2"], tmp_path / "a.zip")
    second = export_bundle(source, ["pinn", source.resolve("pinn@1").digest.hex[:10]], tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert (first.models, first.blob_count, first.file_size) == (second.models, second.blob_count, second.file_size)
    # Re-exporting over an existing file replaces it with the same bytes.
    export_bundle(source, ["pinn@2", "pinn@1"], tmp_path / "a.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def test_a_copy_of_the_store_exports_the_same_bytes(source: Store, tmp_path: Path) -> None:
    save(source, 1)
    source.tag("pinn@1", "prod")
    export_bundle(source, ["pinn"], tmp_path / "a.zip")
    # Another store holding the same models with the same registry log (a copied folder, at another path).
    copy = Store.open(shutil.copytree(tmp_path / "source", tmp_path / "moved" / "copy"))
    export_bundle(copy, ["pinn"], tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def test_a_store_with_its_own_log_differs_only_in_provenance(source: Store, dest: Store, tmp_path: Path) -> None:
    save(source, 1)
    source.tag("pinn@1", "prod")
    export_bundle(source, ["pinn"], tmp_path / "a.zip")
    import_bundle(dest, tmp_path / "a.zip")
    export_bundle(dest, ["pinn"], tmp_path / "b.zip")
    a, b = members(tmp_path / "a.zip"), members(tmp_path / "b.zip")
    # The same blobs, byte for byte and in the same order; the index differs in the log entries only (the
    # destination wrote its own publish and tag entries, at other times, by another writer).
    assert list(a) == list(b)
    assert {k: v for k, v in a.items() if k != INDEX_MEMBER} == {k: v for k, v in b.items() if k != INDEX_MEMBER}
    index_a, index_b = BundleIndex.from_bytes(a[INDEX_MEMBER]), BundleIndex.from_bytes(b[INDEX_MEMBER])
    assert index_a.models[0].log != index_b.models[0].log
    strip = [(m.name, m.version, m.digest, m.tags) for m in index_a.models]
    assert strip == [(m.name, m.version, m.digest, m.tags) for m in index_b.models]
    assert index_a.blobs == index_b.blobs


# -- import bookkeeping -------------------------------------------------------------------------------------------


def test_importing_twice_publishes_nothing_new(source: Store, dest: Store, tmp_path: Path) -> None:
    save(source, 1)
    source.tag("pinn@1", "prod")
    export_bundle(source, ["pinn"], tmp_path / "a.zip")
    first = import_bundle(dest, tmp_path / "a.zip")
    log = dest.log()
    files = blob_files(tmp_path / "elsewhere" / "store")
    second = import_bundle(dest, tmp_path / "a.zip")
    assert dest.log() == log
    assert second.published == ()
    assert (second.blobs_written, second.bytes_written, second.blobs_present) == (0, 0, first.blobs_written)
    assert [r.ref for r in second.models] == [r.ref for r in first.models] == ["pinn@1"]
    assert second.models[0].tags == ("prod",)
    assert blob_files(tmp_path / "elsewhere" / "store") == files


def test_a_store_holding_some_blobs_gets_only_the_rest(source: Store, tmp_path: Path) -> None:
    save(source, 1)
    # Version 2 shares emb.weight / head.weight with version 1; the rest is new.
    changed = {**state_dict(1), "head.bias": torch.full((6,), 7.0), "steps": torch.tensor(99)}
    source.save(changed, name="pinn", model_type="pinn", history=HISTORY)
    export_bundle(source, ["pinn@1"], tmp_path / "v1.zip")
    export_bundle(source, ["pinn"], tmp_path / "both.zip", all_versions=True)
    target = Store.open(tmp_path / "target")
    import_bundle(target, tmp_path / "v1.zip")
    root = tmp_path / "target"
    before = blob_files(root)

    result = import_bundle(target, tmp_path / "both.zip")
    new = blob_files(root) - before
    # v2: head.bias, steps and the manifest are new; emb, norm and the history are v1's.
    assert result.blobs_written == len(new) == 3
    assert result.blobs_present == 7  # each blob is in the bundle once, so the shared ones count once
    assert result.bytes_written == sum(p.stat().st_size for p in new)
    assert result.published == ("pinn@2",)
    assert_same_weights(target.load("pinn@2"), changed)


# -- tampering ----------------------------------------------------------------------------------------------------


@pytest.fixture
def bundle(source: Store, tmp_path: Path) -> Path:
    save(source, 1)
    source.tag("pinn@1", "prod")
    path = tmp_path / "tamper" / "pinn.zip"
    path.parent.mkdir()
    export_bundle(source, ["pinn"], path)
    return path


def _roles(path: Path) -> tuple[str, str, str]:
    """Member names of (a tensor blob, the manifest, the history blob)."""
    index = read_bundle_index(path)
    manifest = fracstore.Manifest.from_bytes(members(path)[member_name(index.models[0].digest)])
    tensor = member_name(manifest.tensor_blobs[0].digest)
    assert manifest.history is not None
    return tensor, member_name(index.models[0].digest), member_name(manifest.history)


def data_offset(path: Path, name: str) -> int:
    """Where a member's data starts in the file (after its local header)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite(path: Path, change: Callable[[list[tuple[zipfile.ZipInfo, bytes]]], None]) -> None:
    """Rebuild the zip after ``change`` edits its (info, data) list; zipfile computes fresh CRCs, so only the
    fracstore checks stand between a changed member and the store."""
    with zipfile.ZipFile(path) as archive:
        items = [(info, archive.read(info)) for info in archive.infolist()]
    change(items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some cases write on purpose
        with zipfile.ZipFile(path, "w") as archive:
            for info, data in items:
                archive.writestr(info, data)


def replace_member(name: str, edit: Callable[[bytes], bytes]) -> Callable[[list[tuple[zipfile.ZipInfo, bytes]]], None]:
    def change(items: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
        for i, (info, data) in enumerate(items):
            if info.filename == name:
                items[i] = (info, edit(data))

    return change


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def edit_index(edit: Callable[[dict[str, object]], None]) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        raw = canonical.decode(data, what="index", max_bytes=MAX_INDEX_BYTES)
        edit(raw)
        return canonical.encode(raw)

    return change


def _wrong_size(raw: dict[str, object]) -> None:
    blobs = raw["blobs"]
    assert isinstance(blobs, list)
    blobs[-1]["size"] += 1  # the last member: a reader that did not check sizes first would write the others


def _other_tag(raw: dict[str, object]) -> None:
    models = raw["models"]
    assert isinstance(models, list)
    models[0]["tags"] = ["hijacked"]


def _drop_history_everywhere(path: Path) -> Callable[[list[tuple[zipfile.ZipInfo, bytes]]], None]:
    _, _, history = _roles(path)

    def change(items: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
        def edit(raw: dict[str, object]) -> None:
            blobs = raw["blobs"]
            assert isinstance(blobs, list)
            raw["blobs"] = [b for b in blobs if b["digest"] != f"sha256:{history}"]

        items[:] = [(i, edit_index(edit)(d) if i.filename == INDEX_MEMBER else d) for i, d in items]
        items[:] = [(i, d) for i, d in items if i.filename != history]

    return change


def _add(
    name: str, data: bytes, *, list_in_index: bool = False
) -> Callable[[list[tuple[zipfile.ZipInfo, bytes]]], None]:
    def change(items: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
        if list_in_index:

            def edit(raw: dict[str, object]) -> None:
                blobs = raw["blobs"]
                assert isinstance(blobs, list)
                blobs.append({"digest": f"sha256:{name}", "size": len(data)})

            items[0] = (items[0][0], edit_index(edit)(items[0][1]))
        items.append((zipfile.ZipInfo(name), data))

    return change


def _drop(pick: Callable[[Path], str], path: Path) -> Callable[[list[tuple[zipfile.ZipInfo, bytes]]], None]:
    name = pick(path)

    def change(items: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
        items[:] = [(i, d) for i, d in items if i.filename != name]

    return change


def _duplicate(items: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
    items.append(items[-1])


def _deflate(items: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
    info, data = items[-1]
    info.compress_type = zipfile.ZIP_DEFLATED
    items[-1] = (info, data)


EXTRA = b"not part of the model"

# (case id, how to tamper given the bundle path, the error, a fragment of its message)
TAMPER_CASES: list[tuple[str, Callable[[Path], None], type[Exception], str]] = [
    ("flip-tensor", lambda p: flip(p, data_offset(p, _roles(p)[0]) + 100), IntegrityError, "corrupt"),
    ("flip-manifest", lambda p: flip(p, data_offset(p, _roles(p)[1]) + 10), IntegrityError, "corrupt"),
    ("flip-index", lambda p: flip(p, data_offset(p, INDEX_MEMBER) + 20), IntegrityError, "corrupt"),
    (
        "tensor-rehashed-crc",
        lambda p: rewrite(p, replace_member(_roles(p)[0], flip_last_byte)),
        IntegrityError,
        "does not hash",
    ),
    (
        "manifest-rehashed-crc",
        lambda p: rewrite(p, replace_member(_roles(p)[1], flip_last_byte)),
        IntegrityError,
        "does not hash",
    ),
    ("history-shorter", lambda p: rewrite(p, replace_member(_roles(p)[2], lambda d: d[:-1])), IntegrityError, "bytes"),
    (
        "index-wrong-size",
        lambda p: rewrite(p, replace_member(INDEX_MEMBER, edit_index(_wrong_size))),
        IntegrityError,
        "the index says",
    ),
    (
        "index-other-tag",
        lambda p: rewrite(p, replace_member(INDEX_MEMBER, edit_index(_other_tag))),
        FormatError,
        "tag entries",
    ),
    (
        "index-garbage",
        lambda p: rewrite(p, replace_member(INDEX_MEMBER, lambda d: b"\xc1" + d)),
        FormatError,
        "msgpack",
    ),
    ("truncated-end", lambda p: p.write_bytes(p.read_bytes()[:-10]), FormatError, "truncated"),
    ("truncated-half", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), FormatError, "truncated"),
    ("not-a-zip", lambda p: p.write_bytes(b"this is a text file\n" * 50), FormatError, "not a zip"),
    ("empty-file", lambda p: p.write_bytes(b""), FormatError, "not a zip"),
    ("extra-member", lambda p: rewrite(p, _add(Digest.of(EXTRA).hex, EXTRA)), FormatError, "does not list"),
    (
        "extra-listed-blob",
        lambda p: rewrite(p, _add(Digest.of(EXTRA).hex, EXTRA, list_in_index=True)),
        FormatError,
        "no model in it references",
    ),
    ("dotdot-member", lambda p: rewrite(p, _add("../../evil", EXTRA)), FormatError, "digest only"),
    ("absolute-member", lambda p: rewrite(p, _add("/etc/evil", EXTRA)), FormatError, "digest only"),
    ("folder-member", lambda p: rewrite(p, _add(f"blobs/{Digest.of(EXTRA).hex}", EXTRA)), FormatError, "digest only"),
    ("missing-member", lambda p: rewrite(p, _drop(lambda q: _roles(q)[0], p)), FormatError, "lacks"),
    ("missing-manifest", lambda p: rewrite(p, _drop(lambda q: _roles(q)[1], p)), FormatError, "lacks"),
    ("missing-index", lambda p: rewrite(p, _drop(lambda q: INDEX_MEMBER, p)), FormatError, "no index.msgpack"),
    ("incomplete", lambda p: rewrite(p, _drop_history_everywhere(p)), FormatError, "incomplete"),
    ("duplicate-member", lambda p: rewrite(p, _duplicate), FormatError, "twice"),
    ("deflated-member", lambda p: rewrite(p, _deflate), FormatError, "compressed"),
]

# Cases found only while streaming the blob members: the blobs before the bad one are stored (unreferenced).
WRITE_BEFORE_FAILING = {c[1] for c in TAMPER_CASES if c[0] in ("flip-tensor", "tensor-rehashed-crc")}


def assert_nothing_published(store: Store, log: list[Any]) -> None:
    assert store.log() == log
    assert [r.ref for r in store.list()] == ["unrelated@1"]
    with pytest.raises(NotFoundError):
        store.load("pinn")


@pytest.mark.parametrize("case", TAMPER_CASES, ids=[c[0] for c in TAMPER_CASES])
def test_a_tampered_bundle_publishes_nothing(
    bundle: Path, dest: Store, tmp_path: Path, case: tuple[str, Callable[[Path], None], type[Exception], str]
) -> None:
    _, tamper, error, match = case
    tamper(bundle)
    log = dest.log()
    files = blob_files(tmp_path / "elsewhere" / "store")
    with pytest.raises(error, match=match):
        import_bundle(dest, bundle)
    assert_nothing_published(dest, log)
    if tamper not in WRITE_BEFORE_FAILING:
        # Structure, sizes and manifests are checked before the first blob is written.
        assert blob_files(tmp_path / "elsewhere" / "store") == files


@pytest.mark.parametrize("role", [0, 2], ids=["tensor", "history"])
def test_a_tampered_member_is_refused_even_when_the_store_has_that_blob(
    source: Store, bundle: Path, tmp_path: Path, role: int
) -> None:
    # The destination already holds every blob of the model (under another name), so put() never reads the
    # members; they are verified all the same.
    target = Store.open(tmp_path / "holder")
    target.save({"x": torch.zeros(3)}, name="unrelated")
    holder = tmp_path / "holder.zip"
    export_bundle(source, ["pinn"], holder)
    rewrite(holder, replace_member(INDEX_MEMBER, edit_index(lambda raw: _rename(raw, "copy"))))
    import_bundle(target, holder)
    rewrite(bundle, replace_member(_roles(bundle)[role], flip_last_byte))
    log = target.log()
    with pytest.raises(IntegrityError, match="does not hash"):
        import_bundle(target, bundle)
    assert target.log() == log
    with pytest.raises(NotFoundError):
        target.load("pinn")


def _rename(raw: dict[str, object], name: str) -> None:
    # A hand-made bundle of the same blobs under another name, its provenance made to match.
    models = raw["models"]
    assert isinstance(models, list)
    model = models[0]
    entries = []
    for data in model["log"]:
        entry = canonical.decode(data, what="entry", max_bytes=1 << 16)
        entry["name"] = name
        entries.append(canonical.encode(entry))
    model["name"], model["log"] = name, entries


def test_an_oversized_index_is_refused_before_it_is_read(bundle: Path, dest: Store) -> None:
    rewrite(bundle, replace_member(INDEX_MEMBER, lambda d: d + b"\x00" * MAX_INDEX_BYTES))
    log = dest.log()
    with pytest.raises(FormatError, match="over the"):
        import_bundle(dest, bundle)
    with pytest.raises(FormatError, match="over the"):
        read_bundle_index(bundle)
    assert_nothing_published(dest, log)


def test_a_missing_bundle_is_not_found(dest: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no bundle"):
        import_bundle(dest, tmp_path / "nowhere.zip")


def test_a_failed_export_leaves_nothing_at_path(source: Store, tmp_path: Path) -> None:
    ref = save(source, 1)
    path = tmp_path / "out.zip"
    path.write_bytes(b"previous file")
    # Corrupt one tensor blob in the source store (same size, so only the hash shows it).
    blob = source.info(ref).manifest.tensor_blobs[0]
    blob_file = source.backend.local_path(blob_key(blob.digest))
    assert blob_file is not None
    blob_file.chmod(0o644)
    blob_file.write_bytes(flip_last_byte(blob_file.read_bytes()))
    with pytest.raises(IntegrityError):
        export_bundle(source, [ref], path)
    assert path.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.zip", "source"])
    with pytest.raises(IntegrityError):
        export_bundle(source, [ref], tmp_path / "new.zip")
    assert not (tmp_path / "new.zip").exists()


# -- the seed's calls ---------------------------------------------------------------------------------------------


class TinyPinn(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture
def pinn_type() -> Iterator[None]:
    fracstore.register_model_type("pinn")(TinyPinn)
    yield
    unregister_model_type("pinn")


def test_the_seed_export_and_import_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pinn_type: None) -> None:
    monkeypatch.chdir(tmp_path)
    manager = ModelPersistenceManager("saved_models")
    torch.manual_seed(0)
    model_id = manager.save_model(
        TinyPinn(width=8),
        "pinn",
        config={"width": 8},
        training_history={"loss": [1.0, 0.5]},
        description="PINN model for fractional time series analysis",
        tags=["pinn", "fractional"],
        training_duration=12.0,
        best_val_loss=0.3,
    )
    manager.export_model(model_id, "exported_model.zip")
    shutil.copy("exported_model.zip", "imported_model.zip")  # carried to the other machine

    other_machine = tmp_path / "other_machine"
    other_machine.mkdir()
    shutil.move(tmp_path / "imported_model.zip", other_machine / "imported_model.zip")
    monkeypatch.chdir(other_machine)
    manager = ModelPersistenceManager("saved_models")
    new_model_id = manager.import_model("imported_model.zip")

    assert new_model_id in list(manager.list_models()["model_id"].values)
    model, config, metadata = manager.load_model(new_model_id)
    model.eval()
    torch.manual_seed(0)
    reference = TinyPinn(width=8)
    x = torch.linspace(0, 1, 5).reshape(-1, 1)
    assert torch.equal(model(x), reference(x)) and config == {"width": 8}
    assert metadata["description"] == "PINN model for fractional time series analysis"
    info = manager.get_model_info(new_model_id)
    assert info["metadata"]["training_duration"] == 12.0 and info["metadata"]["best_val_loss"] == 0.3
    assert manager.get_training_history(new_model_id) == {"loss": [1.0, 0.5]}
    assert manager.get_best_model("pinn", metric="best_val_loss") == new_model_id
    assert manager.import_model("imported_model.zip") == new_model_id  # again: nothing new
    assert len(manager.list_models()) == 1
    assert manager.delete_model(new_model_id) is True


def test_import_model_refuses_a_bundle_of_several_models(source: Store, tmp_path: Path) -> None:
    save(source, 1)
    save(source, 2)
    export_bundle(source, ["pinn"], tmp_path / "two.zip", all_versions=True)
    manager = ModelPersistenceManager(tmp_path / "saved_models")
    with pytest.raises(ConfigError, match="2 models"):
        manager.import_model(tmp_path / "two.zip")
    assert len(manager.list_models()) == 0
