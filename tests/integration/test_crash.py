"""Crash consistency and tamper detection on a real local store (DESIGN.md sections 4 and 5).

* A child process saves a 64 MiB model in a loop and is killed with SIGKILL at random moments. After every kill
  the store must hold only complete versions: each listed version loads bit-identical to what was saved, no log
  entry references a missing blob, and every file under a final blob name hashes to that name (leftover ``.tmp-``
  files are allowed, and invisible to fracstore).
* Damaged log entries (a flipped byte, a truncation, a removal, a renumbering) make replay raise the specific
  fracstore error the code promises.
* A save that fails part-way publishes nothing, and a retry succeeds.

The kill delays are random; the seed is printed in every failure message (set FRACSTORE_CRASH_SEED to replay one).
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fracstore import Digest, FormatError, IntegrityError, StorageError, Store
from fracstore.blobs import BlobStore
from fracstore.layout import blob_key, log_key
from fracstore.registry_state import Entry
from tests.integration._children import big_state, same_bits

STRESS = os.environ.get("FRACSTORE_STRESS") == "1"
REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 120.0
TEMP_PREFIX = ".tmp-"


# -- SIGKILL during saves -------------------------------------------------------------------------------------


class Saver:
    """A child process running ``crash_saver``: saves ``big_state(i)`` for i = first, first + 1, ... until killed."""

    def __init__(self, store_path: Path, first: int, stderr_path: Path) -> None:
        self._stderr = open(stderr_path, "wb")  # noqa: SIM115 (closed in kill())
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration._children", "crash-saver", str(store_path), str(first), "3"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._early: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_ready(self) -> None:
        try:
            line = self.lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            self.kill()
            pytest.fail(f"the saver did not start within {STARTUP_TIMEOUT} s")
        if line != "ready":
            self.kill()
            pytest.fail(f"the saver failed to start ({line!r}):\n{self.stderr_path.read_text()}")

    def wait_saved(self) -> None:
        """Wait until the child reports one finished save."""
        try:
            line = self.lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            self.kill()
            pytest.fail(f"the saver finished no save within {STARTUP_TIMEOUT} s")
        if line is None:
            pytest.fail(f"the saver died:\n{self.stderr_path.read_text()}")
        self._early.append(line)

    def kill(self) -> list[str]:
        """SIGKILL the child; return every line it printed after ``ready``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout=60)
        finally:
            self._reader.join(60)
            self._stderr.close()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        out = list(self._early)
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                out.append(line)
        return out


class StoreChecker:
    """Checks a local store after a crash. Blob files that already hashed to their names and have not changed since
    (same inode, size, mtime, ctime) are not re-hashed."""

    def __init__(self, store_path: Path, cache_root: Path) -> None:
        self.store_path = store_path
        self.cache_root = cache_root
        self._hashed: dict[Path, tuple[int, ...]] = {}
        self._loaded: set[Digest] = set()
        self.readers = 0
        self.published: dict[int, Digest] = {}

    def fresh_reader(self) -> Store:
        self.readers += 1
        return Store.open(self.store_path, create=False, cache_dir=self.cache_root / f"reader-{self.readers}")

    def blob_files(self) -> tuple[set[Digest], list[Path]]:
        """Every final blob (checked to hash to its name) and every leftover temp file."""
        finals: set[Digest] = set()
        temps: list[Path] = []
        for path in sorted((self.store_path / "blobs" / "sha256").rglob("*")):
            if not path.is_file():
                continue
            if path.name.startswith(TEMP_PREFIX):
                temps.append(path)
                continue
            assert path.parent.name == path.name[:2], f"{path} is under the wrong fan-out folder"
            st = path.stat()
            identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if self._hashed.get(path) != identity:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                assert digest == path.name, f"{path} holds bytes that hash to {digest}: a torn or wrong blob"
                self._hashed[path] = identity
            finals.add(Digest(path.name))
        return finals, temps

    def check(self, acked: dict[int, Digest], *, load_all: bool) -> int:
        """Check the store; return how many versions are published. ``acked`` maps iteration -> digest of every
        save that must be durable: those the children reported as finished, and those an earlier check saw."""
        finals, _ = self.blob_files()
        reader = self.fresh_reader()
        assert set(reader.blobs.digests()) == finals, "temp files must be invisible to fracstore"
        records = reader.list()
        iterations = [r.config["i"] for r in records]
        # Every iteration published at most once, in order, with no gap: a killed save is either complete or absent,
        # and the next run saves the same iteration again.
        assert iterations == list(range(len(records)))
        assert [r.version for r in records] == list(range(1, len(records) + 1))
        by_iteration = {r.config["i"]: r for r in records}
        self.published = {i: r.digest for i, r in by_iteration.items()}
        for i, digest in acked.items():
            assert i in by_iteration and by_iteration[i].digest == digest, f"acknowledged save {i} is lost"
        assert len(records) - len(acked) in (0, 1), "at most the save in flight at the kill can be unacknowledged"
        # No log entry points at missing or damaged data (the chain is verified from entry 1).
        for entry in reader.registry.entries():
            if entry.op != "publish":
                continue
            assert entry.manifest in finals, f"log entry {entry.seq} references a missing manifest"
            manifest = reader.manifest(entry.manifest)
            for ref in manifest.references():
                assert ref.digest in finals, f"{entry.name} (entry {entry.seq}) references missing blob {ref.digest}"
                assert (self.store_path / blob_key(ref.digest)).stat().st_size == ref.size
        for record in records:
            if record.digest in self._loaded and not load_all:
                continue
            loaded = reader.load(record.ref)
            expected = big_state(record.config["i"])
            assert sorted(loaded) == sorted(expected)
            for key, tensor in expected.items():
                assert same_bits(loaded[key], tensor), f"{record.ref} {key} does not equal what was saved"
            self._loaded.add(record.digest)
        # The cache the killed child shared (its replay state and verified-state records) is still sound.
        shared = Store.open(self.store_path, create=False)
        assert [(r.version, r.digest) for r in shared.list()] == [(r.version, r.digest) for r in records]
        if records:
            newest = shared.load(records[-1].ref)
            assert same_bits(newest["bias"], big_state(records[-1].config["i"])["bias"])
        return len(records)


@pytest.mark.parametrize("kills", [4, pytest.param(12, marks=pytest.mark.slow)])
def test_sigkill_during_saves_leaves_only_complete_versions(store_path: Path, tmp_path: Path, kills: int) -> None:
    kills = kills * (2 if STRESS else 1)
    seed = int(os.environ.get("FRACSTORE_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    Store.open(store_path)  # the children open an existing store; the parent checks it
    checker = StoreChecker(store_path, tmp_path / "readers")
    acked: dict[int, Digest] = {}
    published = 0
    kill_log = []
    try:
        for run in range(kills):
            # The first kill lands inside the first save; the second after at least one save completed (so the
            # test always checks published versions too); later ones anywhere in the loop.
            delay = rng.uniform(0.02, 0.4) if run == 0 else rng.uniform(0.05, 2.2)
            saver = Saver(store_path, published, tmp_path / f"saver-{run}.stderr")
            saver.wait_ready()
            if run == 1:
                saver.wait_saved()
            time.sleep(delay)
            lines = saver.kill()
            context = f"seed {seed}, run {run}, delay {delay:.3f} s"
            assert saver.proc.returncode == -signal.SIGKILL, (
                f"{context}: the saver died on its own:\n{saver.stderr_path.read_text()}"
            )
            for line in lines:
                word, i, _ref, digest = line.split()
                assert word == "saved"
                acked[int(i)] = Digest.parse(digest)
            try:
                published = checker.check(acked, load_all=False)
            except Exception as exc:  # any failure of a check is the store's, reported with how to replay it
                raise AssertionError(f"{context}: {type(exc).__name__}: {exc}") from exc
            # What is published now must stay published: later checks hold it to the same standard as an ack.
            acked = dict(checker.published)
            kill_log.append((round(delay, 3), len(lines), published))
        _, temps = checker.blob_files()
        print(f"seed {seed}: (delay, acked saves, published) per kill {kill_log}; {len(temps)} temp files left")
        checker.check(acked, load_all=True)  # finally every version, through a fresh reader
    finally:
        shutil.rmtree(store_path, ignore_errors=True)  # hundreds of MiB; keep the disk free


# -- tampered log entries -------------------------------------------------------------------------------------


def _history(store_path: Path) -> Store:
    """A store whose log is: publish m@1, publish m@2, tag prod -> 1, publish m@3."""
    store = Store.open(store_path)
    store.save({"w": torch.zeros(4)}, name="m")
    store.save({"w": torch.ones(4)}, name="m")
    store.tag("m@1", "prod")
    store.save({"w": torch.full((4,), 2.0)}, name="m")
    return store


def _entry_path(store_path: Path, seq: int) -> Path:
    path = store_path / log_key(seq)
    path.chmod(0o644)  # entries are created read-only
    return path


def _expected_error(data: bytes, seq: int) -> type[Exception]:
    """What replay must raise for entry ``seq`` replaced by ``data`` while later entries stay: FormatError when the
    entry cannot be decoded, else IntegrityError (its bytes no longer hash to the next entry's ``prev``, or its own
    ``prev`` no longer names the entry before)."""
    try:
        Entry.from_bytes(data, seq=seq)
    except FormatError:
        return FormatError
    return IntegrityError


def test_every_single_byte_flip_in_a_middle_entry_is_detected(store_path: Path, tmp_path: Path) -> None:
    _history(store_path)
    path = _entry_path(store_path, 2)
    original = path.read_bytes()
    empty_cache = tmp_path / "empty-cache"
    seen: dict[type[Exception], int] = {FormatError: 0, IntegrityError: 0}
    for offset in range(len(original)):
        for mask in (0x01, 0x80):
            flipped = bytearray(original)
            flipped[offset] ^= mask
            path.write_bytes(bytes(flipped))
            expected = _expected_error(bytes(flipped), 2)
            seen[expected] += 1
            reader = Store.open(store_path, create=False, cache_dir=empty_cache)
            where = f"byte {offset} ^ {mask:#04x}"
            with pytest.raises(expected) as replay:
                reader.registry.refresh()
            assert type(replay.value) is expected, f"{where}: {type(replay.value).__name__}: {replay.value}"
            with pytest.raises(expected) as chain:
                reader.registry.entries()
            assert type(chain.value) is expected, f"{where}: {type(chain.value).__name__}: {chain.value}"
            assert not empty_cache.exists(), f"{where}: a replay state was cached from a damaged log"
    assert seen[FormatError] and seen[IntegrityError], seen  # both kinds of damage were exercised
    path.write_bytes(original)
    assert len(Store.open(store_path, create=False, cache_dir=empty_cache).list()) == 3


def test_decodable_edit_of_a_middle_entry_breaks_the_chain(store_path: Path, tmp_path: Path) -> None:
    store = _history(store_path)
    Store.open(store_path, create=False).list()  # a reader replays the intact log and caches its state
    path = _entry_path(store_path, 2)
    data = path.read_bytes()
    entry = Entry.from_bytes(data, seq=2)
    at = data.index(entry.time.encode())  # the first digit of the year: still a valid entry after the flip
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    with pytest.raises(IntegrityError, match="entry 3"):
        Store.open(store_path, create=False, cache_dir=tmp_path / "fresh").list()
    # A reader whose cached state already covers entry 2 does not re-read it (it trusts its tip check), but the
    # chain check of the log reads every entry and catches the edit.
    warm = Store.open(store_path, create=False)
    assert len(warm.list()) == 3
    with pytest.raises(IntegrityError, match="entry 3"):
        warm.registry.entries()
    with pytest.raises(IntegrityError):
        store.log()


def test_broken_chain_error_names_the_store_key(store_path: Path, tmp_path: Path) -> None:
    _history(store_path)
    path = _entry_path(store_path, 2)
    data = path.read_bytes()
    at = data.index(Entry.from_bytes(data, seq=2).time.encode())
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    with pytest.raises(IntegrityError) as info:
        Store.open(store_path, create=False, cache_dir=tmp_path / "fresh").list()
    assert info.value.key == log_key(3)  # what Registry.entries() and the hole check report


def test_truncated_entry_is_a_format_error(store_path: Path, tmp_path: Path) -> None:
    _history(store_path)
    path = _entry_path(store_path, 2)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(FormatError, match="log entry 2"):
        Store.open(store_path, create=False, cache_dir=tmp_path / "fresh").list()


def test_undecodable_tip_entry_is_a_format_error_even_for_a_cached_reader(store_path: Path, tmp_path: Path) -> None:
    _history(store_path)
    path = _entry_path(store_path, 4)
    path.write_bytes(b"\xc1" + path.read_bytes()[1:])  # 0xc1 is never valid msgpack
    with pytest.raises(FormatError):
        Store.open(store_path, create=False, cache_dir=tmp_path / "fresh").list()
    # The cached state's tip no longer matches entry 4, so the reader replays from scratch and meets the damage.
    with pytest.raises(FormatError):
        Store.open(store_path, create=False).list()


def test_removed_middle_entry_is_detected_on_replay(store_path: Path, tmp_path: Path) -> None:
    _history(store_path)
    os.unlink(store_path / log_key(2))
    with pytest.raises(IntegrityError, match="removed") as info:
        Store.open(store_path, create=False, cache_dir=tmp_path / "fresh").list()
    assert info.value.key == log_key(2)
    before = sorted(p.name for p in (store_path / "log").iterdir())
    with pytest.raises(IntegrityError):  # and nobody writes into the hole
        Store.open(store_path, create=False, cache_dir=tmp_path / "fresh2").save({"w": torch.ones(4)}, name="m")
    assert sorted(p.name for p in (store_path / "log").iterdir()) == before


def test_removed_middle_entry_is_detected_by_the_chain_check(store_path: Path, tmp_path: Path) -> None:
    _history(store_path)
    os.unlink(store_path / log_key(2))
    reader = Store.open(store_path, create=False, cache_dir=tmp_path / "fresh")
    with pytest.raises(IntegrityError):
        reader.registry.entries()


def test_renumbered_log_after_a_removal_is_a_format_error(store_path: Path, tmp_path: Path) -> None:
    """Closing the gap by renaming later entries down is caught: every entry records its own seq."""
    _history(store_path)
    os.unlink(store_path / log_key(2))
    os.rename(store_path / log_key(3), store_path / log_key(2))
    os.rename(store_path / log_key(4), store_path / log_key(3))
    reader = Store.open(store_path, create=False, cache_dir=tmp_path / "fresh")
    with pytest.raises(FormatError, match="says it is entry 3"):
        reader.list()
    with pytest.raises(FormatError, match="says it is entry 3"):
        reader.registry.entries()


# -- saves that fail part-way ---------------------------------------------------------------------------------


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{j}": torch.randn(64, 64, generator=g) for j in range(4)}


def _save_kwargs() -> dict[str, Any]:
    return {"name": "m", "history": {"loss": [1.0, 0.5]}, "files": {"notes.txt": b"hello"}}


def _log_names(store_path: Path) -> list[str]:
    return sorted(p.name for p in (store_path / "log").iterdir())


@pytest.fixture
def put_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Counts BlobStore.put calls; set ``fail_at`` to make that call (1-based) raise StorageError."""
    control: dict[str, Any] = {"calls": 0, "fail_at": None}
    lock = threading.Lock()
    original = BlobStore.put

    def put(self: BlobStore, descriptor: Any, data: Any, *args: Any, **kwargs: Any) -> bool:
        with lock:
            control["calls"] += 1
            failing = control["calls"] == control["fail_at"]
        if failing:
            raise StorageError("injected: disk full", key=blob_key(descriptor.digest))
        return original(self, descriptor, data, *args, **kwargs)

    monkeypatch.setattr(BlobStore, "put", put)
    yield control


@pytest.mark.parametrize("fail_at", ["first", "third", "manifest"])
def test_save_failing_midway_publishes_nothing(
    store_path: Path, tmp_path: Path, put_calls: dict[str, Any], fail_at: str
) -> None:
    store = Store.open(store_path, pack_threshold=0)  # every tensor is its own blob: 4 tensors, history, file, manifest
    first = store.save(_model(0), **_save_kwargs())
    per_save = put_calls["calls"]
    assert per_save == 7
    log_before = _log_names(store_path)
    put_calls.update(calls=0, fail_at={"first": 1, "third": 3, "manifest": per_save}[fail_at])
    with pytest.raises(StorageError, match="injected"):
        store.save(_model(1), **_save_kwargs())
    assert _log_names(store_path) == log_before
    assert [r.digest for r in store.list()] == [first.digest]
    assert [r.digest for r in Store.open(store_path, cache_dir=tmp_path / "fresh").list()] == [first.digest]
    # A retry with the same store object succeeds and is exactly the next version.
    put_calls.update(calls=0, fail_at=None)
    retry = store.save(_model(1), **_save_kwargs())
    assert retry.version == 2
    loaded = Store.open(store_path, cache_dir=tmp_path / "fresh2").load("m@2")
    for key, tensor in _model(1).items():
        assert same_bits(loaded[key], tensor)
    assert [e.op for e in store.log()] == ["publish", "publish"]


def test_save_whose_blob_vanishes_before_publish_publishes_nothing(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confirm step (DESIGN.md section 5): a referenced blob missing after writing (a concurrent gc, a damaged
    store) is written once more from the data in hand; one that keeps vanishing stops the save before the log
    entry."""
    store = Store.open(store_path, pack_threshold=0)
    store.save(_model(0), name="m")
    original = BlobStore.put
    doomed: list[Path] = []

    def put_then_lose(self: BlobStore, descriptor: Any, data: Any, *args: Any, **kwargs: Any) -> bool:
        created = original(self, descriptor, data, *args, **kwargs)
        path = store_path / blob_key(descriptor.digest)
        if not doomed:  # the first tensor blob written disappears right after it was written, every time
            doomed.append(path)
        if path == doomed[0]:
            path.unlink()
        return created

    monkeypatch.setattr(BlobStore, "put", put_then_lose)
    with pytest.raises(StorageError, match="missing"):
        store.save(_model(1), name="m")
    monkeypatch.setattr(BlobStore, "put", original)
    assert not doomed[0].exists()
    assert _log_names(store_path) == [log_key(1).split("/")[1]]
    assert len(Store.open(store_path, cache_dir=tmp_path / "fresh").list()) == 1
    assert store.save(_model(1), name="m").version == 2  # the retry writes the blob again
    assert doomed[0].exists()


def test_save_rewrites_a_blob_that_vanished_once_before_publish(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(store_path, pack_threshold=0)
    original = BlobStore.put
    lost: list[Path] = []

    def put_then_lose_once(self: BlobStore, descriptor: Any, data: Any, *args: Any, **kwargs: Any) -> bool:
        created = original(self, descriptor, data, *args, **kwargs)
        if not lost:
            lost.append(store_path / blob_key(descriptor.digest))
            lost[0].unlink()
        return created

    monkeypatch.setattr(BlobStore, "put", put_then_lose_once)
    saved = store.save(_model(1), name="m")
    assert lost[0].exists()  # written again from the data in hand before the publish
    loaded = Store.open(store_path).load(saved.ref)
    assert all(torch.equal(loaded[k], v) for k, v in _model(1).items())
