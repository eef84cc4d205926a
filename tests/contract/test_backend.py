"""One backend contract, run unchanged over every backend this build supports (local disk and memory; object
stores join in the object-storage suite)."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fracstore.backend import Backend, redact_url
from fracstore.errors import NotFoundError, StorageError, UnsupportedBackendError


@pytest.fixture(params=["local", "file-url", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield Backend.from_url(str(tmp_path / "b"))
    elif request.param == "file-url":
        yield Backend.from_url(f"file://{tmp_path / 'b'}")
    else:
        url = f"memory://contract-{uuid.uuid4().hex}"
        backend = Backend.from_url(url)
        yield backend
        with contextlib.suppress(FileNotFoundError):
            backend.fs.rm(backend.root, recursive=True)


def test_put_if_absent_creates_once_and_keeps_the_first(backend: Backend) -> None:
    assert backend.put_if_absent("a/b/key", b"first")
    assert not backend.put_if_absent("a/b/key", b"second")
    assert backend.read("a/b/key") == b"first"
    assert backend.size("a/b/key") == 5


def test_put_if_absent_accepts_chunks(backend: Backend) -> None:
    assert backend.put_if_absent("k", [b"ab", memoryview(b"cd"), bytearray(b"e")])
    assert backend.read("k") == b"abcde"


def test_racing_creates_have_exactly_one_winner(backend: Backend) -> None:
    barrier = threading.Barrier(8)
    wins: list[bytes] = []

    def race(i: int) -> None:
        payload = f"writer-{i}".encode() * 1000
        barrier.wait()
        if backend.put_if_absent("race", payload):
            wins.append(payload)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(wins) == 1
    assert backend.read("race") == wins[0]


def test_missing_keys_raise_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError) as info:
        backend.read("nope")
    assert isinstance(info.value, LookupError)
    with pytest.raises(NotFoundError):
        backend.size("nope")
    assert not backend.exists("nope")
    assert backend.delete("nope") is False
    assert backend.list("nothing/") == []


def test_read_range_list_overwrite_delete(backend: Backend) -> None:
    backend.put_if_absent("d/x/1", b"0123456789")
    backend.put_if_absent("d/y", b"y")
    backend.put_if_absent("other", b"o")
    assert backend.read_range("d/x/1", 2, 5) == b"234"
    with backend.open_read("d/x/1") as handle:
        assert handle.read(3) == b"012"
    assert backend.list("d/") == ["d/x/1", "d/y"]
    backend.put_overwrite("meta", b"v1")
    backend.put_overwrite("meta", b"v2")
    assert backend.read("meta") == b"v2"
    assert backend.delete("d/y") is True
    assert backend.list("d/") == ["d/x/1"]


def test_invalid_keys_are_refused(backend: Backend) -> None:
    for key in ("", "/abs", "a/../b"):
        with pytest.raises(StorageError):
            backend.read(key)


def test_probe_passes_on_atomic_backends(backend: Backend) -> None:
    backend.probe_atomic_create()
    assert backend.list("probe/") == []  # the probe cleans up after itself


def test_local_creates_are_read_only_and_leave_no_temp_files(tmp_path: Path) -> None:
    backend = Backend.from_url(str(tmp_path / "b"))
    backend.put_if_absent("x/y", b"data")
    path = tmp_path / "b" / "x" / "y"
    assert path.stat().st_mode & 0o777 == 0o444
    assert os.listdir(path.parent) == ["y"]


def test_a_failing_chunk_source_leaves_nothing_behind(tmp_path: Path) -> None:
    backend = Backend.from_url(str(tmp_path / "b"))

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("producer died")

    with pytest.raises(StorageError, match="producer died"):
        backend.put_if_absent("x/y", chunks())
    assert not backend.exists("x/y")
    assert os.listdir(tmp_path / "b" / "x") == []


def test_permission_errors_become_storage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root in CI, where chmod does not stop writes; inject the error the OS would raise instead.
    backend = Backend.from_url(str(tmp_path / "b"))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "link", denied)
    with pytest.raises(StorageError, match="permission denied") as info:
        backend.put_if_absent("x/z", b"data")
    assert isinstance(info.value.__cause__, PermissionError)
    assert info.value.key == "x/z"
    assert os.listdir(tmp_path / "b" / "x") == []  # the temp file is gone too


def test_a_backend_that_silently_overwrites_is_refused(tmp_path: Path) -> None:
    class Overwriting(Backend):
        def put_if_absent(self, key: str, data: object, **options: bool) -> bool:  # type: ignore[override]
            self.put_overwrite(key, data)  # type: ignore[arg-type]
            return True

    backend = Overwriting.from_url(str(tmp_path / "b"))
    with pytest.raises(UnsupportedBackendError, match="silently overwrote"):
        backend.probe_atomic_create()


def test_protocols_without_atomic_create_are_refused_for_registry_writes(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("dir", path=str(tmp_path), fs=fsspec.filesystem("file"))
    backend = Backend(fs, "store", url="dir::store")
    assert not backend.atomic_create
    with pytest.raises(UnsupportedBackendError, match="no atomic create"):
        backend.probe_atomic_create()


def test_urls_are_shown_without_credentials() -> None:
    assert redact_url("s3://KEY:SECRET@bucket/prefix") == "s3://bucket/prefix"
    assert redact_url("/plain/path") == "/plain/path"
