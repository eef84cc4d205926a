"""The loopback servers themselves: moto honours S3's conditional create, the GCS emulator overwrites unless the
test wrapper enforces ``ifGenerationMatch``, and both can be stopped and started again without losing data."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import fsspec
import pytest

from tests.servers import GcsEmulator, MotoS3Server, StoreLocation, wait_until_refused

SMALL = b"first small object"
# gcsfs switches from a one-request upload to a resumable session at `chunksize` bytes; a small chunk size makes a
# resumable upload of several chunks out of an object of under a MiB.
RESUMABLE_CHUNK = 2**18


def _fs(location: StoreLocation) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(location.url, **location.storage_options)
    return fs, root


def _race_creates(fs: Any, path: str, writers: int = 8) -> list[bytes]:
    barrier = threading.Barrier(writers)
    wins: list[bytes] = []
    errors: list[BaseException] = []

    def race(i: int) -> None:
        payload = f"writer-{i}".encode() * 100
        barrier.wait()
        try:
            fs.pipe_file(path, payload, mode="create")
        except FileExistsError:
            return
        except BaseException as exc:
            errors.append(exc)
            return
        wins.append(payload)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return wins


# -- S3 (moto) ------------------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_location_is_an_empty_bucket_reached_with_its_options_only(s3_location: StoreLocation) -> None:
    assert s3_location.url.startswith("s3://") and s3_location.url.endswith("/store")
    assert set(s3_location.storage_options) == {"endpoint_url", "key", "secret"}
    assert s3_location.storage_options["endpoint_url"].startswith("http://127.0.0.1:")
    fs, root = _fs(s3_location)
    bucket = root.split("/")[0]
    assert fs.ls(bucket) == []
    s3_location.storage_options["extra"] = 1  # a test's own copy: the location is unchanged
    assert "extra" not in s3_location.storage_options


@pytest.mark.s3
def test_each_s3_test_starts_from_a_reset_server(s3_server: MotoS3Server, s3_location: StoreLocation) -> None:
    fs, root = _fs(s3_location)
    fs.pipe_file(f"{root}/k", b"data")
    s3_server.reset()
    assert not fs.exists(root.split("/")[0])  # the bucket itself is gone


# s3fs's pipe_file sends one PutObject below 2 * chunksize, else a multipart upload (S3 parts are >= 5 MiB).
S3_PART = 5 * 2**20


@pytest.mark.s3
@pytest.mark.parametrize("size", [len(SMALL), 2 * S3_PART + 1000], ids=["put-object", "multipart"])
def test_s3_conditional_create_refuses_an_existing_key(s3_location: StoreLocation, size: int) -> None:
    fs, root = _fs(s3_location)
    path = f"{root}/k"
    first = SMALL if size == len(SMALL) else os.urandom(size)
    fs.pipe_file(path, first, mode="create", chunksize=S3_PART)
    with pytest.raises(FileExistsError):  # If-None-Match: * on PutObject / CompleteMultipartUpload
        fs.pipe_file(path, b"x" * size, mode="create", chunksize=S3_PART)
    assert fs.cat_file(path) == first


@pytest.mark.s3
def test_s3_racing_creates_have_one_winner(s3_location: StoreLocation) -> None:
    fs, root = _fs(s3_location)
    wins = _race_creates(fs, f"{root}/race")
    assert len(wins) == 1
    assert fs.cat_file(f"{root}/race") == wins[0]


@pytest.mark.s3
def test_a_stopped_s3_server_refuses_connections_and_keeps_its_data(
    s3_server: MotoS3Server, s3_location: StoreLocation
) -> None:
    fs, root = _fs(s3_location)
    fs.pipe_file(f"{root}/k", b"kept")
    endpoint = s3_server.endpoint
    with s3_server.stopped():
        assert not s3_server.running
        wait_until_refused(endpoint)
    assert s3_server.endpoint == endpoint
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/k") == b"kept"


# -- GCS (emulator) ---------------------------------------------------------------------------------------------


@pytest.mark.gcs
def test_gcs_location_is_an_empty_bucket_reached_with_its_options_only(gcs_location: StoreLocation) -> None:
    assert gcs_location.url.startswith("gs://") and gcs_location.url.endswith("/store")
    assert gcs_location.storage_options == {
        "endpoint_url": gcs_location.endpoint,
        "token": "anon",
        "project": "test",
    }
    fs, root = _fs(gcs_location)
    assert fs.ls(root.split("/")[0]) == []


@pytest.mark.gcs
def test_the_bare_emulator_ignores_if_generation_match(gcs_emulator: GcsEmulator, gcs_location: StoreLocation) -> None:
    # Why the wrapper exists: without it a put-if-absent test on GCS proves nothing.
    gcs_emulator.enforce_preconditions = False
    fs, root = _fs(gcs_location)
    fs.pipe_file(f"{root}/k", SMALL, mode="create")
    fs.pipe_file(f"{root}/k", b"overwritten", mode="create")  # no error
    assert fs.cat_file(f"{root}/k") == b"overwritten"


@pytest.mark.gcs
@pytest.mark.parametrize("size", [len(SMALL), 3 * RESUMABLE_CHUNK + 1000], ids=["simple", "resumable"])
def test_gcs_conditional_create_refuses_an_existing_key(
    gcs_emulator: GcsEmulator, gcs_location: StoreLocation, size: int
) -> None:
    fs, root = _fs(gcs_location)
    path = f"{root}/k"
    kind = "simple" if size == len(SMALL) else "resumable"
    first = SMALL if kind == "simple" else os.urandom(size)
    fs.pipe_file(path, first, mode="create", chunksize=RESUMABLE_CHUNK)
    assert gcs_emulator.uploads == {kind: 1}  # the upload path under test is the one that ran
    started = time.monotonic()
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"y" * size, mode="create", chunksize=RESUMABLE_CHUNK)
    assert time.monotonic() - started < 5  # refused at once, not after gcsfs's retries
    assert fs.cat_file(path) == first


@pytest.mark.gcs
def test_a_resumable_upload_checks_its_precondition_at_completion(gcs_location: StoreLocation) -> None:
    # The object appears after the upload session was opened (with ifGenerationMatch=0) and before its last chunk.
    fs, root = _fs(gcs_location)
    path = f"{root}/late"
    handle = fs.open(path, "xb", block_size=RESUMABLE_CHUNK)
    handle.write(os.urandom(RESUMABLE_CHUNK + 1000))
    handle.flush()  # opens the session and sends the first chunk
    fs.pipe_file(path, b"created meanwhile", mode="create")
    with pytest.raises(FileExistsError):
        handle.close()
    assert fs.cat_file(path) == b"created meanwhile"


@pytest.mark.gcs
def test_gcs_generation_match_is_compare_and_swap(gcs_location: StoreLocation) -> None:
    fs, root = _fs(gcs_location)
    path = f"{root}/cas"
    fs.pipe_file(path, b"v1", mode="create")
    generation = fs.info(path)["generation"]
    bucket, key = path.split("/", 1)
    call = fs.call  # sync wrapper around gcsfs's request helper
    with pytest.raises(FileExistsError):  # gcsfs maps every 412 to FileExistsError
        call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{bucket}/o",
            uploadType="media",
            name=key,
            ifGenerationMatch=str(int(generation) + 1),
            data=b"v2",
        )
    call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o", uploadType="media", name=key,
         ifGenerationMatch=str(generation), data=b"v2")  # fmt: skip
    assert fs.cat_file(path) == b"v2"


@pytest.mark.gcs
@pytest.mark.parametrize("size", [100, 2 * RESUMABLE_CHUNK], ids=["simple", "resumable"])
def test_gcs_racing_creates_have_one_winner(gcs_location: StoreLocation, size: int) -> None:
    fs, root = _fs(gcs_location)
    barrier = threading.Barrier(6)
    wins: list[bytes] = []

    def race(i: int) -> None:
        payload = bytes([i]) * size
        barrier.wait()
        try:
            fs.pipe_file(f"{root}/race", payload, mode="create", chunksize=RESUMABLE_CHUNK)
        except FileExistsError:
            return
        wins.append(payload)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(wins) == 1
    assert fs.cat_file(f"{root}/race") == wins[0]


@pytest.mark.gcs
def test_a_stopped_emulator_refuses_connections_and_keeps_its_data(
    gcs_emulator: GcsEmulator, gcs_location: StoreLocation
) -> None:
    fs, root = _fs(gcs_location)
    fs.pipe_file(f"{root}/k", b"kept")
    endpoint = gcs_emulator.endpoint
    with gcs_emulator.stopped():
        wait_until_refused(endpoint)
    assert gcs_emulator.endpoint == endpoint
    assert fs.cat_file(f"{root}/k") == b"kept"


@pytest.mark.gcs
def test_a_wipe_forgets_everything(gcs_emulator: GcsEmulator, gcs_location: StoreLocation) -> None:
    fs, root = _fs(gcs_location)
    fs.pipe_file(f"{root}/k", b"data")
    gcs_emulator.wipe()
    fs.invalidate_cache()
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{root}/k")


# -- every backend ------------------------------------------------------------------------------------------------


def test_any_store_location_is_fresh_and_usable(any_store_location: StoreLocation) -> None:
    from fracstore.backend import Backend

    backend = Backend.from_url(any_store_location.url, storage_options=any_store_location.storage_options)
    assert backend.url == any_store_location.url
    assert backend.list("k/") == []  # nothing left from another test on the same server
    assert backend.put_if_absent("k/1", b"data")
    assert backend.read("k/1") == b"data"
    assert (any_store_location.endpoint is None) == (any_store_location.name in ("local", "memory"))
