"""The Store facade on object storage: the same flow on every backend, offline use of what this machine cached,
outages, a blob corrupted in the bucket, and registry writes on remote stores (DESIGN.md sections 4-6, 10).

Every test runs against the real loopback servers of ``tests/servers.py``; request counts come from
:class:`~tests.integration._remote_children.RequestLog`, which patches the Backend class, so nothing a Store object
does in the test process escapes it.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pytest
import torch
from torch import nn

from fracstore import IntegrityError, StorageError, Store, UnsupportedBackendError, register_model_type
from fracstore.backend import S3_TUNING, Backend, tuned_storage_options
from fracstore.errors import OfflineError
from fracstore.layout import blob_key, log_key
from tests.faults import FaultyBackend
from tests.integration._remote_children import RequestLog, assert_same_state
from tests.servers import GcsEmulator, MotoS3Server, StoreLocation

T = TypeVar("T")
BOUND_SECONDS = 30.0  # no call here may hang: each bounded call fails the test after this long


def bounded(call: Callable[[], T], seconds: float = BOUND_SECONDS) -> T:
    """Run ``call`` in a thread and return its result; fail the test if it takes longer than ``seconds``."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as exc:
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not return within {seconds} s"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def open_store(location: StoreLocation, **kwargs: Any) -> Store:
    return Store.open(location.url, storage_options=location.storage_options, **kwargs)


@register_model_type("remote-flow-mlp")
class FlowMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, width)
        self.fc2 = nn.Linear(width, 1)


def mlp(seed: int, width: int = 8) -> FlowMLP:
    torch.manual_seed(seed)
    return FlowMLP(width)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- 1. the same flow on every backend -------------------------------------------------------------------------


def test_save_list_best_load_flow_on_every_backend(any_store_location: StoreLocation, tmp_path: Path) -> None:
    store = open_store(any_store_location)
    models = [mlp(0), mlp(1), mlp(1)]
    with torch.no_grad():
        models[2].fc2.bias.add_(1.0)  # v3 differs from v2 in one tensor only
    losses, accuracies = [0.3, 0.1, 0.2], [0.7, 0.9, 0.8]
    saved = [
        store.save(
            model,
            name="mlp",
            config={"width": 8},
            metrics={"val_loss": losses[v], "accuracy": accuracies[v]},
            tags=["exp"] if v else [],
            description=f"version {v + 1}",
            history={"loss": [1.0, 0.5, losses[v]]},
        )
        for v, model in enumerate(models)
    ]
    other = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    store.save(other, name="other", metrics={"val_loss": 0.05})
    assert [s.version for s in saved] == [1, 2, 3]
    assert len({s.digest for s in saved}) == 3

    def refs(records: Any) -> list[str]:
        return [r.ref for r in records]

    # A second Store object with an empty cache folder sees exactly what was written, from the store alone.
    for reader in (store, open_store(any_store_location, create=False, cache_dir=tmp_path / "fresh-cache")):
        assert refs(reader.list()) == ["mlp@1", "mlp@2", "mlp@3", "other@1"]
        assert refs(reader.list("mlp")) == ["mlp@1", "mlp@2", "mlp@3"]
        assert refs(reader.list(where=["val_loss<0.25"])) == ["mlp@2", "mlp@3", "other@1"]
        assert refs(reader.list(tags=["exp"])) == ["mlp@2", "mlp@3"]
        assert refs(reader.list(model_type="remote-flow-mlp")) == ["mlp@1", "mlp@2", "mlp@3"]
        assert refs(reader.list(latest_only=True)) == ["mlp@3", "other@1"]
        assert [r.digest for r in reader.list("mlp")] == [s.digest for s in saved]
        assert reader.list("mlp")[0].description == "version 1"

        best = reader.best("val_loss")
        assert best is not None and best.ref == "other@1"
        best = reader.best("val_loss", name="mlp")
        assert best is not None and best.ref == "mlp@2"
        best = reader.best("accuracy", name="mlp")  # not a loss: maximised
        assert best is not None and best.ref == "mlp@2"
        best = reader.best("accuracy", mode="min")
        assert best is not None and best.ref == "mlp@1"
        assert reader.best("no-such-metric") is None

        assert reader.history("mlp@2") == {"loss": [1.0, 0.5, 0.1]}

    store.tag("mlp@2", "prod")
    reader = open_store(any_store_location, create=False, cache_dir=tmp_path / "fresh-cache-2")
    assert_same_state(reader.load("mlp"), state_of(models[2]))
    assert_same_state(reader.load("mlp@1"), state_of(models[0]))
    assert_same_state(reader.load("mlp:prod"), state_of(models[1]))
    assert_same_state(reader.load(f"sha256:{saved[0].digest.hex[:12]}"), state_of(models[0]))
    assert_same_state(reader.load(saved[2].digest.hex[:10]), state_of(models[2]))
    assert_same_state(reader.load("other"), other)
    built = reader.load_model("mlp:prod")
    assert isinstance(built, FlowMLP)
    assert_same_state(state_of(built), state_of(models[1]))

    diff = reader.diff("mlp@2", "mlp@3")
    assert (diff.a, diff.b) == ("mlp@2", "mlp@3")
    assert diff.changed == ("fc2.bias",)
    assert sorted(diff.unchanged) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    assert diff.added == diff.removed == ()
    assert diff.metrics["val_loss"] == (0.1, 0.2)

    assert store.delete("mlp@2") == ["mlp@2"]
    for view in (store, open_store(any_store_location, create=False, cache_dir=tmp_path / "fresh-cache-3")):
        assert refs(view.list("mlp")) == ["mlp@1", "mlp@3"]
        best = view.best("val_loss", name="mlp")
        assert best is not None and best.ref == "mlp@3"
        with pytest.raises(LookupError):
            view.load("mlp@2")
        with pytest.raises(LookupError):
            view.load("mlp:prod")  # a tag on a deleted version goes with it
    assert store.delete("mlp", all_versions=True) == ["mlp@1", "mlp@3"]
    assert refs(store.list()) == ["other@1"]
    assert [e.op for e in store.log()] == ["publish"] * 4 + ["tag", "delete", "delete"]


# -- 4. offline use and outages ---------------------------------------------------------------------------------


@pytest.mark.s3
def test_offline_load_list_best_make_no_request_with_the_server_stopped(
    s3_server: MotoS3Server, s3_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    first = writer.save({"w": torch.randn(64, 8), "b": torch.zeros(8)}, name="m", metrics={"val_loss": 0.5})
    second = writer.save({"w": torch.randn(64, 8), "b": torch.ones(8)}, name="m", metrics={"val_loss": 0.2})
    expected = writer.load("m@2")

    cache = tmp_path / "reader-cache"
    online = open_store(s3_location, cache_dir=cache)
    assert_same_state(online.load("m@2"), expected)  # fills this cache folder
    assert [r.digest for r in online.list("m")] == [first.digest, second.digest]
    del online

    requests = RequestLog().install(monkeypatch)
    with s3_server.stopped():

        def offline_session() -> None:
            store = open_store(s3_location, cache_dir=cache, offline=True)
            assert store.offline
            assert_same_state(store.load("m@2"), expected)
            assert_same_state(store.load("m"), expected)
            assert [r.ref for r in store.list("m")] == ["m@1", "m@2"]
            best = store.best("val_loss")
            assert best is not None and best.digest == second.digest
            with pytest.raises(OfflineError):
                store.load("m@1")  # never loaded on this machine: not in the cache
            with pytest.raises(OfflineError) as raised:
                store.save({"w": torch.zeros(2)}, name="m")
            assert isinstance(raised.value, StorageError)
            local = Store.open(tmp_path / "local-store")
            with pytest.raises(OfflineError):
                store.push(local, "m@2")  # the blobs come from the store itself
            local.save({"w": torch.zeros(2)}, name="x")
            with pytest.raises(OfflineError):
                local.push(store, "x")
            assert [r.ref for r in local.list()] == ["x@1"]  # the refused push published nothing

        bounded(offline_session)
    # Only the refused operations (the uncached load, the save, the pushes) asked the offline object's backend for
    # anything, and that backend cannot make a request: each such call raised OfflineError, reaching no server.
    assert all(r.error == "OfflineError" for r in requests.requests), requests.requests
    assert {r.url for r in requests.requests} <= {s3_location.url}


@pytest.mark.s3
def test_offline_load_makes_zero_backend_calls(
    s3_server: MotoS3Server, s3_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(s3_location)
    store.save({"w": torch.randn(32, 4)}, name="m", metrics={"loss": 1.0})
    expected = store.load("m")
    requests = RequestLog().install(monkeypatch)
    with s3_server.stopped():
        offline = bounded(lambda: open_store(s3_location, offline=True))
        assert_same_state(bounded(lambda: offline.load("m")), expected)
        assert [r.ref for r in bounded(offline.list)] == ["m@1"]
        best = bounded(lambda: offline.best("loss"))
        assert best is not None and best.ref == "m@1"
    assert requests.requests == []


def test_offline_open_of_a_store_never_used_here_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OfflineError, match="never opened online"):
        Store.open(
            "s3://never-seen-bucket/store",
            storage_options={"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"},
            offline=True,
            cache_dir=tmp_path / "cache",
        )


@pytest.mark.s3
def test_online_open_with_the_server_stopped_fails_fast_without_the_secret(
    s3_server: MotoS3Server, s3_location: StoreLocation
) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    options = {**s3_location.storage_options, "secret": secret}
    Store.open(s3_location.url, storage_options=options)  # reachable: the store exists
    with s3_server.stopped():
        started = time.monotonic()
        with pytest.raises(StorageError) as raised:
            bounded(lambda: Store.open(s3_location.url, storage_options=options))
        elapsed = time.monotonic() - started
    assert elapsed < 15, f"an unreachable store took {elapsed:.1f} s to fail"
    error = raised.value
    assert not isinstance(error, OfflineError)
    assert s3_location.url in str(error)
    assert error.store == s3_location.url
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and len(chain) < 20:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for part in chain:
        assert secret not in str(part) and secret not in repr(part)


# -- 5. a blob corrupted in the bucket --------------------------------------------------------------------------


def _flip_object_byte(location: StoreLocation, key: str, offset: int = 100) -> None:
    """Overwrite the object under ``key`` in the bucket itself with one byte flipped (same size)."""
    fs, root = fsspec.core.url_to_fs(location.url, **location.storage_options)
    path = f"{root}/{key}"
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    fs.invalidate_cache()
    assert hashlib.sha256(fs.cat_file(path)).hexdigest() != key.rsplit("/", 1)[1]


@pytest.mark.s3
def test_a_blob_corrupted_in_the_bucket_is_refused_on_pull_and_on_load(
    s3_location: StoreLocation, tmp_path: Path
) -> None:
    remote = open_store(s3_location, cache_dir=tmp_path / "writer-cache")
    saved = remote.save({"big": torch.randn(1 << 19), "small": torch.ones(3)}, name="m")  # 2 MiB: its own blob
    manifest = remote.manifest(saved.digest)
    big = next(t for t in manifest.tensors if t.name == "big")
    _flip_object_byte(s3_location, blob_key(big.blob))

    local = Store.open(tmp_path / "local")
    local.save({"w": torch.zeros(2)}, name="existing")
    log_before = [(e.seq, e.op, e.name) for e in local.log()]
    source = open_store(s3_location, cache_dir=tmp_path / "puller-cache")
    with pytest.raises(IntegrityError) as raised:
        bounded(lambda: local.pull(source, "m"))
    message = str(raised.value)
    assert str(big.blob) in message
    assert s3_location.url in message
    assert raised.value.store == s3_location.url
    assert [(e.seq, e.op, e.name) for e in Store.open(tmp_path / "local").log()] == log_before
    assert [r.ref for r in Store.open(tmp_path / "local").list()] == ["existing@1"]
    assert not (tmp_path / "local" / blob_key(big.blob)).exists()

    fresh = open_store(s3_location, cache_dir=tmp_path / "fresh-cache")
    with pytest.raises(IntegrityError) as raised:
        bounded(lambda: fresh.load("m"))
    assert str(big.blob) in str(raised.value)
    assert s3_location.url in str(raised.value)
    assert not (tmp_path / "fresh-cache" / blob_key(big.blob)).exists(), "a corrupt download was cached"


# -- 7. registry writes on remote stores ------------------------------------------------------------------------


@pytest.mark.gcs
def test_an_overwriting_gcs_endpoint_is_refused_for_registry_writes(
    gcs_emulator: GcsEmulator, gcs_location: StoreLocation, tmp_path: Path
) -> None:
    gcs_emulator.enforce_preconditions = False  # the bare emulator: a conditional create overwrites
    store = open_store(gcs_location)
    with pytest.raises(UnsupportedBackendError) as raised:
        store.save({"w": torch.ones(3)}, name="m")
    message = str(raised.value)
    assert "overwrote" in message and "ifGenerationMatch" in message
    assert gcs_location.url in message
    with pytest.raises(UnsupportedBackendError):
        store.tag("m", "prod")  # any registry write, not only a publish

    gcs_emulator.enforce_preconditions = True
    honest = open_store(gcs_location, cache_dir=tmp_path / "other-cache")
    assert list(honest.list()) == []  # nothing was published by the refused writes
    assert honest.log() == []
    assert honest.save({"w": torch.ones(3)}, name="m").version == 1  # the same store, honest again, is accepted


@pytest.mark.s3
def test_a_log_write_that_lands_then_errors_publishes_exactly_once_on_s3(
    s3_location: StoreLocation, tmp_path: Path
) -> None:
    store = open_store(s3_location)
    faulty = FaultyBackend(store.backend).install(store)
    fault = faulty.fail_after("put_if_absent", keys="log/")
    saved = store.save({"w": torch.full((4,), 7.0)}, name="m")
    assert fault.fired == 1
    assert saved.version == 1
    reader = open_store(s3_location, cache_dir=tmp_path / "reader-cache")
    entries = reader.log()
    assert [(e.seq, e.op, e.name, e.manifest) for e in entries] == [(1, "publish", "m", saved.digest)]
    assert not reader.backend.exists(log_key(2))
    assert [r.ref for r in reader.list()] == ["m@1"]
    assert_same_state(reader.load("m@1"), {"w": torch.full((4,), 7.0)})


@pytest.mark.s3
def test_s3_stores_get_the_tuning_under_the_callers_options(s3_location: StoreLocation) -> None:
    caller = {**s3_location.storage_options, "config_kwargs": {"max_pool_connections": 5, "read_timeout": 7}}
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in caller.items()}
    tuned = tuned_storage_options(s3_location.url, caller)
    assert caller == before, "the caller's options were changed in place"
    assert tuned["config_kwargs"] == {**S3_TUNING, "max_pool_connections": 5, "read_timeout": 7}
    assert {k: v for k, v in tuned.items() if k not in ("config_kwargs", "use_listings_cache")} == dict(
        s3_location.storage_options
    )
    assert tuned["use_listings_cache"] is False  # presence must never come from a cached listing
    assert tuned_storage_options(s3_location.url, {"use_listings_cache": True})["use_listings_cache"] is True
    assert tuned_storage_options(s3_location.url, None)["config_kwargs"] == dict(S3_TUNING)
    gcs = tuned_storage_options("gs://bucket/store", {"token": "anon"})
    assert gcs == {"token": "anon", "use_listings_cache": False}
    assert tuned_storage_options("/some/folder", None) == {}

    # What the store's filesystem really got, and it works with it.
    store = Store.open(s3_location.url, storage_options=caller)
    config = store.backend.fs.config_kwargs
    assert config["max_pool_connections"] == 5
    assert config["request_checksum_calculation"] == "when_required"
    assert config["retries"]["mode"] == "standard"  # botocore rewrites max_attempts into its own total count
    assert store.save({"w": torch.ones(2)}, name="m").version == 1
    assert isinstance(Backend.from_url(s3_location.url, storage_options=caller).fs.config_kwargs, dict)


@pytest.mark.parametrize("kind", [pytest.param("s3", marks=pytest.mark.s3), pytest.param("gcs", marks=pytest.mark.gcs)])
def test_a_blob_deleted_by_another_machine_after_a_listing_is_written_again(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # s3fs and gcsfs answer info() from listings cached without expiry; a save that trusted such an answer would
    # dedup onto a deleted blob and publish a version whose data is gone.
    location: StoreLocation = request.getfixturevalue(f"{kind}_location")
    store = open_store(location)
    weights = {"w": torch.arange(400_000, dtype=torch.float32)}
    store.save(weights, name="gone")
    digest = store.manifest(store.resolve("gone").digest).tensor_blobs[0].digest
    store.delete("gone")
    assert store.verify().ok  # lists blobs/ through the same filesystem object
    other_machine = fsspec.filesystem(
        "s3" if kind == "s3" else "gcs", skip_instance_cache=True, **location.storage_options
    )
    other_machine.rm_file(f"{location.url.split('://', 1)[1]}/{blob_key(digest)}")
    saved = store.save(weights, name="back")
    assert saved.bytes_written >= weights["w"].numel() * 4  # the blob was uploaded again, not deduped onto
    fresh = open_store(location, cache_dir=tmp_path / "fresh-machine")
    assert torch.equal(fresh.load("back")["w"], weights["w"])
    assert fresh.verify().ok


@pytest.mark.gcs
def test_an_offline_open_builds_no_client_at_all(
    gcs_location: StoreLocation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(gcs_location, cache_dir=tmp_path / "cache")
    store.save({"w": torch.ones(3)}, name="m")
    import gcsfs

    def no_client(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an offline open constructed a GCS client (it asks the network for credentials)")

    monkeypatch.setattr(gcsfs.GCSFileSystem, "__init__", no_client)
    gcsfs.GCSFileSystem.clear_instance_cache()
    offline = Store.open(
        gcs_location.url, storage_options=gcs_location.storage_options, cache_dir=tmp_path / "cache", offline=True
    )
    assert torch.equal(offline.load("m")["w"], torch.ones(3))
    with pytest.raises(OfflineError, match="never opened online"):
        Store.open("gs://some-other-bucket/store", cache_dir=tmp_path / "cache", offline=True)
