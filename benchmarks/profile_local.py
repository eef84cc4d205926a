"""Where a local fracstore save and load spend their time: a companion to bench_local.py.

Wraps fracstore's internal steps with timers (summed over the save's worker threads, so a column can exceed the
wall time) and prints them per save: a fresh store, a store whose blob files were deleted (repeat), the identical
model again (dedup), then the split of a warm load into fracstore's own work and the tensor reads. It patches
private names of fracstore (codec, blobs, backend, store), so it may need updating when those change; it changes
no file of the package.

Usage:
    .venv/bin/python benchmarks/profile_local.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch

import fracstore
from fracstore import backend, blobs, codec, registry, store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_local  # the model and helpers of the benchmark itself

_totals: dict[str, float] = defaultdict(float)
_counts: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


def _wrap(owner: Any, name: str, label: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            with _lock:
                _totals[label] += time.perf_counter() - start
                _counts[label] += 1

    setattr(owner, name, timed)


def instrument() -> None:
    _wrap(store.Store, "save", "Store.save (wall)")
    _wrap(store.Store, "_write_tensor_blobs", "Store._write_tensor_blobs (wall)")
    _wrap(codec.MaterializedBlob, "hash", "MaterializedBlob.hash (sha256 of the tensor bytes)")
    _wrap(backend.Backend, "_local_write_temp", "Backend._local_write_temp (write + fsync)")
    _wrap(os, "fsync", "  of which os.fsync (files, everywhere)")
    _wrap(backend, "_fsync_dir", "backend._fsync_dir (folder fsyncs)")
    _wrap(blobs.BlobStore, "_record_verified", "BlobStore._record_verified")
    _wrap(store.Store, "_confirm", "Store._confirm")
    _wrap(registry.Registry, "append", "Registry.append (publish)")
    _wrap(store.Store, "resolve", "Store.resolve (registry + manifest)")
    _wrap(store, "decode_state_dict", "codec.decode_state_dict")
    _wrap(blobs.BlobStore, "local_file", "  BlobStore.local_file (stat + record)")
    _wrap(codec, "_read_members", "  codec._read_members (safe_open + get_tensor)")


def report(title: str, wall: float, extra: str = "") -> None:
    print(f"== {title}: {wall:.3f} s wall {extra}")
    for label in sorted(_totals, key=lambda k: -_totals[k]):
        print(f"   {_totals[label]:8.3f} s  x{_counts[label]:<4d} {label}")
    _totals.clear()
    _counts.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fracstore-profile-", dir="/tmp"))
    os.environ["FRACSTORE_CACHE_DIR"] = str(root / "cache")
    try:
        state = bench_local.build_state_dict(args.size_mib)
        instrument()
        store_dir, path = root / "store", root / "model.safetensors"
        for regime in ("fresh", "repeat", "dedup"):
            if regime == "repeat":
                bench_local.delete_blob_files(store_dir)
            _totals.clear()
            _counts.clear()
            bench_local.quiesce()
            cpu = os.times()
            start = time.perf_counter()
            saved = fracstore.Store.open(store_dir).save(state, name="bench")
            wall = time.perf_counter() - start
            after = os.times()
            if path.exists():
                path.unlink()
            plain, synced = bench_local.time_save_file(state, path)
            report(
                f"save, {regime}",
                wall,
                f"(process CPU: user {after.user - cpu.user:.2f} s, sys {after.system - cpu.system:.2f} s; "
                f"wrote {saved.bytes_written / (1 << 20):.1f} MiB; same-regime save_file {plain:.2f} s, "
                f"+fsync {synced:.2f} s)",
            )
        tiny = bench_local.build_state_dict(bench_local.MIN_SIZE_MIB)
        bench_local.quiesce()
        start = time.perf_counter()
        fracstore.Store.open(root / "tiny").save(tiny, name="bench")
        report(
            f"save, fresh, {bench_local.MIN_SIZE_MIB} MiB model (the fixed cost of a save)", time.perf_counter() - start
        )
        safetensors.torch.load_file(str(path))
        fracstore.Store.open(store_dir).load("bench")
        for rep in range(3):
            opened = fracstore.Store.open(store_dir)
            gc.collect()
            _totals.clear()
            _counts.clear()
            start = time.perf_counter()
            loaded = opened.load("bench")
            middle = time.perf_counter()
            bench_local.read_every_tensor(loaded)
            end = time.perf_counter()
            del loaded
            gc.collect()
            begin = time.perf_counter()
            theirs = safetensors.torch.load_file(str(path))
            between = time.perf_counter()
            bench_local.read_every_tensor(theirs)
            done = time.perf_counter()
            del theirs
            report(
                f"warm load {rep + 1}",
                end - start,
                f"(store.load {middle - start:.3f} s + reads {end - middle:.3f} s; load_file {between - begin:.3f} s "
                f"+ reads {done - between:.3f} s)",
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
