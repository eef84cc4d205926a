"""Code shared by the object-storage integration tests and the child processes they spawn.

Children are started with the ``spawn`` method, so everything here is importable at module level and imports torch
and fracstore lazily. Each child gets the store URL, its fsspec options and its own cache folder as arguments (a
spawned process inherits no fixtures) and writes a JSON report the parent reads after a bounded join.

:class:`RequestLog` records every call a :class:`~fracstore.backend.Backend` makes to a remote store (any protocol
but the local disk) by patching the class, so calls from every Store object, registry and cache in the test
process are seen, including those made while a store is being opened.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- deterministic content ------------------------------------------------------------------------------------


def child_state(child: int, i: int) -> dict[str, Any]:
    """What publisher ``child`` saves as its ``i``-th model: tiny, and unique per (child, i)."""
    import torch

    return {
        "w": torch.full((4,), float(child * 1000 + i)),
        "b": torch.tensor([float(i), -0.0, float("nan"), float(child)], dtype=torch.float32),
    }


def same_bits(a: Any, b: Any) -> bool:
    """True when two tensors have the same dtype, shape and bytes (NaN and -0.0 included)."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def assert_same_state(loaded: Any, expected: Any) -> None:
    """Same keys, and every tensor bit-identical."""
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        assert same_bits(loaded[key], tensor), f"tensor {key} differs"


# -- counting requests ----------------------------------------------------------------------------------------

_REQUEST_METHODS = (
    "read",
    "read_range",
    "read_capped",
    "download",
    "upload",
    "open_read",
    "size",
    "list",
    "put_if_absent",
    "put_overwrite",
    "delete",
)


@dataclass(frozen=True, slots=True)
class Request:
    """One Backend call on a remote store: which store, which method, which key, and the bytes it moved (sent for
    uploads and puts, received for reads and downloads; 0 for metadata calls) and the name of the error it raised,
    if any."""

    url: str
    method: str
    key: str
    nbytes: int
    error: str | None = None


class RequestLog:
    """Every remote Backend call made while installed (see the module docstring)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def install(self, monkeypatch: Any) -> RequestLog:
        from fracstore.backend import Backend

        for name in _REQUEST_METHODS:
            monkeypatch.setattr(Backend, name, self._wrap(name, getattr(Backend, name)))
        return self

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        log = self

        def call(backend: Any, key: str, *args: Any, **kwargs: Any) -> Any:
            if backend.protocol == "file":
                return original(backend, key, *args, **kwargs)
            sent = 0
            if name in ("put_if_absent", "put_overwrite"):
                data = args[0] if args else kwargs.pop("data")
                chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
                sent = sum(memoryview(c).nbytes for c in chunks)
                args = (chunks, *args[1:])
            elif name == "upload":
                sent = os.path.getsize(args[0] if args else kwargs["path"])
            try:
                result = original(backend, key, *args, **kwargs)
            except BaseException as exc:
                log._add(Request(backend.url, name, key, sent, type(exc).__name__))
                raise
            received = 0
            if name == "download":
                received = os.path.getsize(args[0] if args else kwargs["path"])
            elif name in ("read", "read_range", "read_capped"):
                received = len(result)
            log._add(Request(backend.url, name, key, sent + received))
            return result

        return call

    def _add(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def matching(
        self, *, url: str | None = None, prefix: str = "", methods: Iterable[str] | None = None
    ) -> list[Request]:
        """The requests to ``url`` (any remote when None) on keys under ``prefix``, by the given methods."""
        wanted = None if methods is None else set(methods)
        with self._lock:
            return [
                r
                for r in self.requests
                if (url is None or r.url == url) and r.key.startswith(prefix) and (wanted is None or r.method in wanted)
            ]


# -- spawn targets ---------------------------------------------------------------------------------------------


def _write_report(result_path: str, report: dict[str, Any]) -> None:
    tmp = Path(result_path + ".part")
    tmp.write_text(json.dumps(report))
    tmp.replace(result_path)


def _prepare_child(cache_dir: str) -> None:
    os.environ["FRACSTORE_CACHE_DIR"] = cache_dir
    # gcsfs reads this at import time; without it every call waits 60 s on a lookup the emulator never answers.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def _count_lost_races(backend_class: Any) -> list[str]:
    """Record, in this process, every log create that found its key taken (a lost race)."""
    lost: list[str] = []
    original = backend_class.put_if_absent

    def put_if_absent(backend: Any, key: str, *args: Any, **kwargs: Any) -> bool:
        created = bool(original(backend, key, *args, **kwargs))
        if key.startswith("log/") and not created:
            lost.append(key)
        return created

    backend_class.put_if_absent = put_if_absent
    return lost


def publish_remote(
    url: str,
    storage_options: dict[str, Any],
    name: str,
    child: int,
    *,
    count: int,
    cache_dir: str,
    barrier: Any,
    result_path: str,
) -> None:
    """Wait for every sibling, then open the store and publish ``count`` versions of ``name``, each carrying the
    child and its index in its metrics and description. Report ``{"store_id", "saved": [[i, digest, version]],
    "seconds", "lost"}`` (the time from the start of the race to the last publish, and how many log creates found
    the key taken) or ``{"error": traceback}``."""
    report: dict[str, Any]
    try:
        _prepare_child(cache_dir)
        from fracstore import Store
        from fracstore.backend import Backend

        lost = _count_lost_races(Backend)
        barrier.wait(timeout=120)  # every child has imported torch and fracstore: now the race starts
        started = time.monotonic()
        store = Store.open(url, storage_options=storage_options)
        saved = []
        for i in range(count):
            result = store.save(
                child_state(child, i),
                name=name,
                metrics={"child": float(child), "index": float(i)},
                description=f"child={child} index={i}",
            )
            saved.append([i, str(result.digest), result.version])
        report = {"store_id": store.id, "saved": saved, "seconds": time.monotonic() - started, "lost": len(lost)}
    except BaseException:
        report = {"error": traceback.format_exc()}
    _write_report(result_path, report)
    if "error" in report:
        sys.exit(1)


def fill_cache(
    url: str,
    storage_options: dict[str, Any],
    digest: str,
    size: int,
    *,
    cache_dir: str,
    threads: int,
    barrier: Any,
    result_path: str,
) -> None:
    """Fill one blob into the cache folder from ``threads`` threads at once, after every sibling process is ready.
    Report ``{"paths": [...], "created": [...]}`` or ``{"error": traceback}``."""
    report: dict[str, Any]
    try:
        _prepare_child(cache_dir)
        from fracstore.backend import Backend
        from fracstore.cache import BlobCache
        from fracstore.digest import Descriptor, Digest

        source = Backend.from_url(url, storage_options=storage_options)
        descriptor = Descriptor(Digest.parse(digest), size)
        cache = BlobCache(Path(cache_dir))
        start = threading.Barrier(threads)
        paths: list[str] = []
        errors: list[str] = []

        def fill() -> None:
            try:
                start.wait(timeout=60)
                paths.append(str(cache.fill(descriptor, source).path))
            except BaseException:
                errors.append(traceback.format_exc())

        barrier.wait(timeout=120)
        workers = [threading.Thread(target=fill) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        if errors or any(w.is_alive() for w in workers):
            report = {"error": "\n".join(errors) or "a filler thread hung"}
        else:
            report = {"paths": paths}
    except BaseException:
        report = {"error": traceback.format_exc()}
    _write_report(result_path, report)
    if "error" in report:
        sys.exit(1)
