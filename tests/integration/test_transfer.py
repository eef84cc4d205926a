"""push / pull between local disk, S3 and GCS: only the blobs the destination lacks travel (DESIGN.md section 6).

Each byte count a :class:`~fracstore.transfer.TransferSummary` reports is checked twice: against the blob sizes
the manifests promise, and against what was measured independently, the bytes the Backend calls really moved
(:class:`~tests.integration._remote_children.RequestLog`), the objects that appeared in the bucket, or the bytes
that appeared on the local disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from fracstore import Descriptor, Store
from fracstore.layout import BLOBS_PREFIX, LOG_PREFIX, blob_key
from tests.helpers import blob_bytes_on_disk
from tests.integration._remote_children import RequestLog, assert_same_state
from tests.servers import StoreLocation

# gcsfs hands aiohttp each upload chunk as raw bytes, and aiohttp warns about bodies over 1 MiB; the pytest config
# makes warnings errors, and this one is the storage client's own business, not fracstore's.
pytestmark = pytest.mark.filterwarnings("ignore:Sending a large body directly with raw bytes:ResourceWarning")

ELEMENTS = 1 << 19  # 2 MiB of float32 per tensor: each above the 1 MiB pack threshold, so each its own blob
WRITES = ("upload", "put_if_absent", "put_overwrite")


def big_state(changed: bool = False) -> dict[str, torch.Tensor]:
    """Four 2 MiB tensors; ``changed`` alters ``layer2`` only."""
    state = {f"layer{j}": torch.arange(ELEMENTS, dtype=torch.float32) * (j + 1) for j in range(4)}
    if changed:
        state["layer2"] = state["layer2"] + 0.5
    return state


def open_store(location: StoreLocation, **kwargs: Any) -> Store:
    return Store.open(location.url, storage_options=location.storage_options, **kwargs)


def new_blobs(store: Store, old: str, new: str) -> list[Descriptor]:
    """The blobs version ``new`` references that ``old`` does not (the manifest itself excluded)."""
    before = {d.digest for d in store.manifest(store.resolve(old).digest).references()}
    return [d for d in store.manifest(store.resolve(new).digest).references() if d.digest not in before]


def bucket_blob_keys(location: StoreLocation) -> set[str]:
    """The blob keys in the bucket, listed by the storage client itself."""
    fs, root = fsspec.core.url_to_fs(location.url, **location.storage_options)
    fs.invalidate_cache()
    try:
        found = fs.find(f"{root}/{BLOBS_PREFIX.rstrip('/')}")
    except FileNotFoundError:
        return set()
    return {path.split(f"{root}/", 1)[1] for path in found}


def moved(requests: RequestLog, url: str, methods: tuple[str, ...], prefix: str = BLOBS_PREFIX) -> dict[str, int]:
    """``{key: bytes}`` of the calls by ``methods`` to the store at ``url`` on keys under ``prefix``."""
    out: dict[str, int] = {}
    for request in requests.matching(url=url, prefix=prefix, methods=methods):
        out[request.key] = out.get(request.key, 0) + request.nbytes
    return out


@pytest.mark.s3
def test_push_of_v2_sends_only_the_changed_blob_and_the_manifest(
    s3_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = Store.open(tmp_path / "local")
    remote = open_store(s3_location)
    requests = RequestLog().install(monkeypatch)

    v1 = local.save(big_state(), name="m")
    first = local.push(remote, "m@1")
    manifest1 = local.manifest(v1.digest)
    v1_bytes = sum(d.size for d in manifest1.references()) + local.blobs.size_of(v1.digest)
    assert len(manifest1.references()) == 4
    assert (first.blobs_sent, first.bytes_sent) == (5, v1_bytes)
    assert (first.blobs_total, first.bytes_total) == (5, v1_bytes)
    assert sum(moved(requests, remote.url, WRITES).values()) == v1_bytes
    assert bucket_blob_keys(s3_location) == {blob_key(d.digest) for d in manifest1.references()} | {blob_key(v1.digest)}

    v2 = local.save(big_state(changed=True), name="m")
    (changed,) = new_blobs(local, "m@1", "m@2")
    manifest2_size = local.blobs.size_of(v2.digest)
    expected = changed.size + manifest2_size
    assert changed.size >= 2 * ELEMENTS  # the changed tensor's blob, not something small
    keys_before = bucket_blob_keys(s3_location)
    requests.clear()

    second = local.push(remote, "m@2")
    assert second.bytes_sent == expected
    assert second.blobs_sent == 2
    assert second.bytes_total == v1_bytes - local.blobs.size_of(v1.digest) + manifest2_size
    assert [(v.name, v.source_version, v.destination_version, v.published) for v in second.versions] == [
        ("m", 2, 2, True)
    ]
    # Measured: what the upload calls carried, and what appeared in the bucket.
    sent = moved(requests, remote.url, WRITES)
    assert sent == {blob_key(changed.digest): changed.size, blob_key(v2.digest): manifest2_size}
    assert bucket_blob_keys(s3_location) - keys_before == {blob_key(changed.digest), blob_key(v2.digest)}
    assert [e.manifest for e in remote.log()] == [v1.digest, v2.digest]

    # Nothing changed: no blob moves, nothing is published.
    requests.clear()
    again = local.push(remote, "m@2")
    assert (again.bytes_sent, again.blobs_sent) == (0, 0)
    assert [v.published for v in again.versions] == [False]
    assert moved(requests, remote.url, WRITES) == {}
    assert moved(requests, remote.url, WRITES, prefix=LOG_PREFIX) == {}
    assert len(open_store(s3_location, cache_dir=tmp_path / "reader-cache").log()) == 2


@pytest.mark.s3
def test_pull_of_v2_after_v1_fetches_only_the_changed_blob_and_the_manifest(
    s3_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    v1 = writer.save(big_state(), name="m")
    v2 = writer.save(big_state(changed=True), name="m")
    (changed,) = new_blobs(writer, "m@1", "m@2")
    manifest2_size = writer.blobs.size_of(v2.digest)

    local_path = tmp_path / "local"
    local = Store.open(local_path)
    source = open_store(s3_location, cache_dir=tmp_path / "puller-cache")
    requests = RequestLog().install(monkeypatch)
    first = local.pull(source, "m@1")
    assert first.bytes_sent == blob_bytes_on_disk(local_path)
    assert first.blobs_sent == 5

    on_disk = blob_bytes_on_disk(local_path)
    requests.clear()
    second = local.pull(source, "m@2")
    expected = changed.size + manifest2_size
    assert second.bytes_sent == expected
    assert second.blobs_sent == 2
    assert [(v.destination_version, v.published) for v in second.versions] == [(2, True)]
    # Measured: what arrived on the local disk, and what the download calls fetched from the bucket.
    assert blob_bytes_on_disk(local_path) - on_disk == expected
    fetched = moved(requests, source.url, ("download", "read_capped", "read_range", "open_read"))
    assert fetched == {blob_key(changed.digest): changed.size, blob_key(v2.digest): manifest2_size}
    # The manifest was read once (to learn what it references) and copied from the pool, not downloaded again.
    read = moved(requests, source.url, ("read", "read_capped"))
    assert read == {blob_key(v2.digest): manifest2_size, blob_key(changed.digest): changed.size}
    assert_same_state(local.load("m@2"), big_state(changed=True))
    assert [e.manifest for e in local.log()] == [v1.digest, v2.digest]

    requests.clear()
    again = local.pull(source, "m@2")
    assert (again.bytes_sent, again.blobs_sent) == (0, 0)
    assert [v.published for v in again.versions] == [False]
    reads = ("download", "read", "read_range", "read_capped", "open_read")
    assert moved(requests, source.url, reads) == {}
    assert blob_bytes_on_disk(local_path) - on_disk == expected
    assert len(Store.open(local_path).log()) == 2


@pytest.mark.s3
@pytest.mark.gcs
def test_local_to_gcs_and_s3_to_gcs_round_trips(
    s3_location: StoreLocation, gcs_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = Store.open(tmp_path / "local")
    v1 = local.save(big_state(), name="m", metrics={"val_loss": 0.3})
    v2 = local.save(big_state(changed=True), name="m", metrics={"val_loss": 0.1}, history={"loss": [1.0, 0.1]})
    local.tag("m@2", "prod")
    s3 = open_store(s3_location)
    gcs = open_store(gcs_location)
    local.push(s3, "m", all_versions=True, tags=True)

    # local -> GCS: v1 only.
    to_gcs = local.push(gcs, "m@1")
    assert to_gcs.bytes_sent == to_gcs.bytes_total > 4 * 4 * ELEMENTS

    # S3 -> GCS, remote to remote: v2 brings its changed tensor, its history and its manifest, nothing else.
    requests = RequestLog().install(monkeypatch)
    expected = {d.digest: d.size for d in new_blobs(local, "m@1", "m@2")}
    expected[v2.digest] = local.blobs.size_of(v2.digest)
    assert len(expected) == 3  # the changed tensor's blob, the history blob, the manifest
    remote_to_remote = gcs.pull(s3, "m@2", tags=True)
    assert remote_to_remote.bytes_sent == sum(expected.values())
    assert remote_to_remote.blobs_sent == 3
    assert remote_to_remote.tags == ("m:prod",)
    assert moved(requests, gcs.url, WRITES) == {blob_key(d): size for d, size in expected.items()}
    assert bucket_blob_keys(gcs_location) == bucket_blob_keys(s3_location)

    # A fresh reader of GCS, and a fresh local store pulling every version back, see the same models.
    reader = open_store(gcs_location, cache_dir=tmp_path / "gcs-reader-cache")
    assert [(r.ref, r.digest) for r in reader.list("m")] == [("m@1", v1.digest), ("m@2", v2.digest)]
    assert reader.resolve("m:prod").digest == v2.digest
    assert_same_state(reader.load("m@2"), big_state(changed=True))
    assert reader.history("m@2") == {"loss": [1.0, 0.1]}

    back = Store.open(tmp_path / "back")
    pulled = back.pull(reader, "m", all_versions=True, tags=True)
    assert [v.digest for v in pulled.versions] == [v1.digest, v2.digest]
    assert pulled.bytes_sent == pulled.bytes_total
    assert_same_state(back.load("m@1"), big_state())
    assert_same_state(back.load("m:prod"), big_state(changed=True))
    best = back.best("val_loss")
    assert best is not None and best.digest == v2.digest

    # Round trips are idempotent: nothing travels, nothing is published, in either direction.
    assert local.push(gcs, "m", all_versions=True).bytes_sent == 0
    assert [v.published for v in gcs.pull(s3, "m", all_versions=True).versions] == [False, False]
    assert len(open_store(gcs_location, cache_dir=tmp_path / "gcs-final-cache").log()) == 3  # 2 publishes + tag


@pytest.mark.parametrize("direction", ["local->s3", "s3->local"])
def test_a_wrong_sized_blob_at_the_destination_is_replaced(
    s3_location: StoreLocation, tmp_path: Path, direction: str
) -> None:
    local = Store.open(tmp_path / "local")
    remote = open_store(s3_location)
    source, destination = (local, remote) if direction == "local->s3" else (remote, local)
    saved = source.save(big_state(), name="m")
    victim = max(source.manifest(saved.digest).tensor_blobs, key=lambda d: d.size)
    # Something short under the blob's name (a damaged copy, a truncated upload by another tool).
    if destination is remote:
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_location.storage_options)
        fs.pipe_file(f"{s3_location.url.removeprefix('s3://')}/{blob_key(victim.digest)}", b"truncated")
    else:
        path = tmp_path / "local" / blob_key(victim.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"truncated")
    summary = source.push(destination, "m")
    assert [v.published for v in summary.versions] == [True]
    assert destination.blobs.size_of(victim.digest) == victim.size
    reader = Store.open(
        destination.backend.url if destination is local else s3_location.url,
        storage_options=None if destination is local else s3_location.storage_options,
        cache_dir=tmp_path / "fresh-cache",
    )
    assert_same_state(reader.load("m"), big_state())
    assert reader.verify(read_data=True).ok
