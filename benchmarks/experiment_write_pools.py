"""Experiment behind the save diagnosis in docs/benchmarks.md: does overlapping hashing with fsync speed up a save?

Repeat regime (blob files unlinked, then the model saved again into the same store), interleaved repetitions of:
the current ``Store._write_tensor_blobs`` (2 workers on a 2-core machine), the same code with 4 workers (by patching
``os.cpu_count``), and a split-pool variant (hash on ``cpu_count`` threads, ``BlobStore.put`` on an 8-thread I/O
pool); plus ``save_file`` with and without fsync. It patches fracstore in memory only and changes no file.

Usage:
    .venv/bin/python benchmarks/experiment_write_pools.py [--size-mib 1024] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import fracstore
from fracstore import store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_local  # the model and helpers of the benchmark itself

_original = store.Store._write_tensor_blobs
_cpu_count = os.cpu_count


def split_pools(self: store.Store, pending: Sequence[Any], written: list[int]) -> dict[int, Any]:
    """Hash on cpu_count threads; write + fsync + link on a separate I/O pool, so fsync waits never idle a core."""
    results: dict[int, Any] = {}
    order = sorted(range(len(pending)), key=lambda i: -pending[i].size)

    def hash_one(index: int) -> tuple[int, Any, Any, Any]:
        materialized = pending[index].materialize()
        descriptor, members = materialized.hash()
        return index, materialized, descriptor, members

    puts: list[tuple[Any, Future[bool]]] = []
    with ThreadPoolExecutor(max_workers=_cpu_count() or 2) as cpu, ThreadPoolExecutor(max_workers=8) as io:
        for index, materialized, descriptor, members in cpu.map(hash_one, order):
            results[index] = (descriptor, members)
            puts.append((descriptor, io.submit(self.blobs.put, descriptor, materialized.chunks)))
        for descriptor, future in puts:
            if future.result():
                written[0] += descriptor.size
                written[1] += 1
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fracstore-pools-", dir="/tmp"))
    os.environ["FRACSTORE_CACHE_DIR"] = str(root / "cache")
    variants: dict[str, tuple[Callable[..., Any], int | None]] = {
        "current code": (_original, None),
        "4 workers": (_original, 4),
        "split pools": (split_pools, None),
    }
    samples: dict[str, list[float]] = {}
    try:
        state = bench_local.build_state_dict(args.size_mib)
        store_dir, path = root / "store", root / "model.safetensors"
        fracstore.Store.open(store_dir).save(state, name="bench")
        bench_local.time_save_file(state, path)
        for rep in range(args.reps):
            names = list(variants)
            names = names[rep % len(names) :] + names[: rep % len(names)]
            for name in names:
                function, cpus = variants[name]
                store.Store._write_tensor_blobs = function  # type: ignore[method-assign]
                if cpus is not None:
                    os.cpu_count = lambda cpus=cpus: cpus
                try:
                    bench_local.delete_blob_files(store_dir)
                    seconds, saved = bench_local.time_fracstore_save(state, store_dir)
                finally:
                    os.cpu_count = _cpu_count
                    store.Store._write_tensor_blobs = _original  # type: ignore[method-assign]
                if saved.bytes_written < bench_local.model_bytes(state):
                    raise RuntimeError(f"{name} wrote only {saved.bytes_written} bytes")
                samples.setdefault(name, []).append(seconds)
            path.unlink()
            plain, synced = bench_local.time_save_file(state, path)
            samples.setdefault("save_file", []).append(plain)
            samples.setdefault("save_file + fsync", []).append(synced)
            bench_local.progress(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in samples.items()))
        store.Store._write_tensor_blobs = split_pools  # type: ignore[method-assign]
        bench_local.delete_blob_files(store_dir)
        fracstore.Store.open(store_dir).save(state, name="bench")
        store.Store._write_tensor_blobs = _original  # type: ignore[method-assign]
        loaded = fracstore.Store.open(store_dir).load("bench")
        if not all(torch.equal(loaded[k], state[k]) for k in state):
            raise RuntimeError("the split-pool variant did not round-trip")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, values in samples.items():
        print(f"{name:20s} median {statistics.median(values):.2f} s  {[round(v, 2) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
