"""A fault-injecting wrapper around :class:`fracstore.backend.Backend` (DESIGN.md section 10; restic's way: faults
are added by wrapping the backend, never by flags inside it).

::

    faulty = FaultyBackend(store.backend).install(store)     # the store now talks to the wrapper
    faulty.fail("put_if_absent", keys="log/")                 # the 1st create of a log entry raises StorageError
    faulty.fail_after("put_if_absent", keys="log/")           # the entry is created, then StorageError: unknown outcome
    faulty.fail("read", on_call=3, times=None, error=TimeoutError("slow"))   # every read from the 3rd on
    faulty.truncate("read", to=-1)                            # reads lose their last byte
    faulty.flip_bit("put_if_absent", offset=100)              # what gets written has one bit flipped
    faulty.overwrite_on_create()                              # put_if_absent silently overwrites and says "created"

Terms: a *fault* is one rule: a method name, a key filter (``keys``: a prefix or a predicate), which matching calls it
hits (``on_call`` = the first one, 1-based, counting only calls that match; ``times`` = how many, None = all from
then on) and what it does. Each adding method returns its :class:`Fault`, whose ``matched`` / ``fired`` counters a
test can assert on; ``faulty.calls`` counts every call by method name.

Methods the wrapper does not intercept run Backend's own code with the wrapper as ``self`` (data attributes come
from the wrapped backend), so a Backend method that calls another internally meets the faults too:
``probe_atomic_create`` goes through the wrapper's ``put_if_absent``, ``exists`` through its ``size``. Nested calls
count in ``calls`` like direct ones.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fracstore.backend import Backend
from fracstore.errors import StorageError

KeyFilter = str | Callable[[str], bool] | None
ErrorFactory = BaseException | Callable[[str], BaseException] | None

# Methods whose first argument is the key (or prefix) they act on.
_KEYED = frozenset(
    {
        "read",
        "read_range",
        "read_capped",
        "open_read",
        "download",
        "size",
        "exists",
        "list",
        "put_if_absent",
        "put_overwrite",
        "upload",
        "delete",
        "local_temp",
        "link_if_absent",
    }
)
_READS_BYTES = frozenset({"read", "read_range", "read_capped"})
_WRITES_DATA = frozenset({"put_if_absent", "put_overwrite"})
_CORRUPTIBLE = _READS_BYTES | _WRITES_DATA | {"open_read", "download", "upload"}
_CREATES = frozenset({"put_if_absent", "upload", "link_if_absent"})


@dataclass(eq=False)
class Fault:
    """One injected fault. ``matched``: calls of ``method`` whose key passed the filter; ``fired``: how many of them
    this fault hit."""

    method: str
    kind: str  # "fail", "fail_after", "corrupt", "overwrite"
    keys: KeyFilter = None
    on_call: int = 1
    times: int | None = 1
    error: ErrorFactory = None
    transform: Callable[[bytes, int, int | None], bytes] | None = None  # (data, offset in object, object size)
    matched: int = 0
    fired: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _hits(self, key: str) -> bool:
        if self.keys is not None:
            ok = key.startswith(self.keys) if isinstance(self.keys, str) else self.keys(key)
            if not ok:
                return False
        with self._lock:
            self.matched += 1
            last = None if self.times is None else self.on_call + self.times - 1
            hit = self.matched >= self.on_call and (last is None or self.matched <= last)
            if hit:
                self.fired += 1
            return hit

    def _error(self, key: str, url: str) -> BaseException:
        if self.error is None:
            return StorageError(f"injected fault: {self.method} {key} in {url}", key=key, store=url)
        if isinstance(self.error, BaseException):
            return self.error
        return self.error(key)


def truncated(to: int) -> Callable[[bytes, int, int | None], bytes]:
    """Keep the object's bytes before offset ``to`` (negative: from the end, like a slice)."""

    def apply(data: bytes, offset: int, total: int | None) -> bytes:
        cut = to if to >= 0 else (total if total is not None else offset + len(data)) + to
        return data[: max(0, cut - offset)]

    return apply


def bit_flipped(offset: int, bit: int = 0) -> Callable[[bytes, int, int | None], bytes]:
    """Flip bit ``bit`` of the object's byte at ``offset`` (negative: from the end)."""

    def apply(data: bytes, start: int, total: int | None) -> bytes:
        at = offset if offset >= 0 else (total if total is not None else start + len(data)) + offset
        if not start <= at < start + len(data):
            return data
        out = bytearray(data)
        out[at - start] ^= 1 << bit
        return bytes(out)

    return apply


class _CorruptingReader:
    """A read handle passing every chunk through a fault's transform at its offset in the object."""

    def __init__(self, handle: IO[bytes], transform: Callable[[bytes, int, int | None], bytes], total: int) -> None:
        self._handle = handle
        self._transform = transform
        self._total = total

    def read(self, size: int = -1) -> bytes:
        offset = self._handle.tell()
        return self._transform(self._handle.read(size), offset, self._total)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _join(data: Any) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    return b"".join(bytes(chunk) for chunk in data)


class FaultyBackend:
    """Wraps a :class:`~fracstore.backend.Backend` and injects faults into its calls (see the module docstring).

    Attributes:
        inner: the wrapped backend.
        calls: every call by method name (nested calls included).
        faults: the faults in force, in the order added; the first matching fault of a kind applies.
    """

    def __init__(self, backend: Backend) -> None:
        self.inner = backend
        self.calls: Counter[str] = Counter()
        self.faults: list[Fault] = []
        self._calls_lock = threading.Lock()

    # -- adding faults ----------------------------------------------------------------------------------------

    def _add(self, fault: Fault) -> Fault:
        if not callable(getattr(type(self.inner), fault.method, None)):
            raise ValueError(f"Backend has no method {fault.method!r}")
        if fault.on_call < 1 or (fault.times is not None and fault.times < 1):
            raise ValueError("on_call and times count from 1")
        self.faults.append(fault)
        return fault

    def fail(
        self,
        method: str,
        *,
        keys: KeyFilter = None,
        on_call: int = 1,
        times: int | None = 1,
        error: ErrorFactory = None,
    ) -> Fault:
        """Raise ``error`` (default: a StorageError naming the key) instead of running the call."""
        return self._add(Fault(method, "fail", keys, on_call, times, error))

    def fail_after(
        self,
        method: str = "put_if_absent",
        *,
        keys: KeyFilter = None,
        on_call: int = 1,
        times: int | None = 1,
        error: ErrorFactory = None,
    ) -> Fault:
        """Run the call (a write lands), then raise ``error``: the caller cannot tell whether it happened."""
        return self._add(Fault(method, "fail_after", keys, on_call, times, error))

    def truncate(
        self, method: str, *, to: int = -1, keys: KeyFilter = None, on_call: int = 1, times: int | None = None
    ) -> Fault:
        """Data read (read, read_range, read_capped, open_read, download) or written (put_if_absent,
        put_overwrite, upload) ends at object offset ``to`` (default: the last byte is lost)."""
        return self._corrupt(method, truncated(to), keys, on_call, times)

    def flip_bit(
        self,
        method: str,
        *,
        offset: int = 0,
        bit: int = 0,
        keys: KeyFilter = None,
        on_call: int = 1,
        times: int | None = None,
    ) -> Fault:
        """Data read or written has bit ``bit`` of the byte at object offset ``offset`` flipped."""
        return self._corrupt(method, bit_flipped(offset, bit), keys, on_call, times)

    def _corrupt(
        self,
        method: str,
        transform: Callable[[bytes, int, int | None], bytes],
        keys: KeyFilter,
        on_call: int,
        times: int | None,
    ) -> Fault:
        if method not in _CORRUPTIBLE:
            raise ValueError(f"cannot corrupt the data of {method!r}; one of {sorted(_CORRUPTIBLE)}")
        return self._add(Fault(method, "corrupt", keys, on_call, times, transform=transform))

    def overwrite_on_create(self, *, keys: KeyFilter = None, on_call: int = 1, times: int | None = None) -> Fault:
        """put_if_absent (and upload, link_if_absent) replace an existing object and report it as created: a backend
        whose conditional create is silently ignored."""
        return self._add(Fault("put_if_absent", "overwrite", keys, on_call, times))

    def clear(self) -> None:
        """Remove every fault (the wrapper becomes transparent)."""
        self.faults.clear()

    def install(self, store: Any) -> FaultyBackend:
        """Make ``store`` (and its parts: registry, blob store, ...) use this wrapper instead of the backend it wraps.

        Raises:
            ValueError: nothing in ``store`` referred to the wrapped backend.
        """
        replaced = 0
        for holder in (store, *getattr(store, "__dict__", {}).values()):
            for name, value in list(getattr(holder, "__dict__", {}).items()):
                if value is self.inner:
                    setattr(holder, name, self)
                    replaced += 1
        if not replaced:
            raise ValueError(f"{store!r} does not use {self.inner!r}")
        return self

    # -- delegation -------------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only called for names the wrapper lacks. Backend's functions run with the wrapper as self (so internal
        # calls meet the faults), public keyed ones through _invoke; everything else is the wrapped backend's.
        static = inspect.getattr_static(type(self.inner), name, None)
        if isinstance(static, property):
            return static.__get__(self)
        if inspect.isfunction(static):
            if name in _KEYED:
                return types.MethodType(lambda _self, *a, **k: self._invoke(name, static, a, k), self)
            return types.MethodType(static, self)
        return getattr(self.inner, name)

    def _active(self, method: str, key: str) -> list[Fault]:
        # Every fault on this method sees the call (so its counters are exact), whether or not another one fires.
        kinds = [f for f in list(self.faults) if f.method == method or (f.kind == "overwrite" and method in _CREATES)]
        return [fault for fault in kinds if fault._hits(key)]

    def _invoke(self, name: str, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._calls_lock:
            self.calls[name] += 1
        key = str(args[0]) if args else str(kwargs.get("key", kwargs.get("prefix", "")))
        hits = self._active(name, key)
        by_kind = {fault.kind: fault for fault in reversed(hits)}  # the first added wins
        if "fail" in by_kind:
            raise by_kind["fail"]._error(key, self.inner.url)
        corrupt = by_kind.get("corrupt")
        if "overwrite" in by_kind:
            result = self._overwrite(name, key, args, kwargs)
        elif corrupt is not None and name in _WRITES_DATA | {"upload"}:
            result = self._corrupt_write(name, function, corrupt, args, kwargs)
        else:
            result = function(self, *args, **kwargs)
            if corrupt is not None:
                result = self._corrupt_read(name, key, corrupt, args, result)
        if "fail_after" in by_kind:
            raise by_kind["fail_after"]._error(key, self.inner.url)
        return result

    def _overwrite(self, name: str, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if name == "put_if_absent":
            Backend.put_overwrite(self.inner, key, args[1] if len(args) > 1 else kwargs["data"])  # type: ignore[arg-type]
        elif name == "upload":
            Backend.put_overwrite(self.inner, key, Path(args[1] if len(args) > 1 else kwargs["path"]).read_bytes())
        else:  # link_if_absent(key, tmp): the temp file replaces whatever had the name
            tmp = Path(args[1] if len(args) > 1 else kwargs["tmp"])
            os.replace(tmp, self.inner._local(key))
        return True

    def _corrupt_write(
        self, name: str, function: Callable[..., Any], fault: Fault, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        assert fault.transform is not None
        rest = list(args[1:])
        if name == "upload":
            source = Path(rest[0] if rest else kwargs.pop("path"))
            data = source.read_bytes()
            fd, tmp_name = tempfile.mkstemp(prefix="fracstore-fault-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(fault.transform(data, 0, len(data)))
                return function(self, args[0], Path(tmp_name), *rest[1:], **kwargs)
            finally:
                os.unlink(tmp_name)
        data = _join(rest.pop(0) if rest else kwargs.pop("data"))
        return function(self, args[0], fault.transform(data, 0, len(data)), *rest, **kwargs)

    def _corrupt_read(self, name: str, key: str, fault: Fault, args: tuple[Any, ...], result: Any) -> Any:
        assert fault.transform is not None
        transform = fault.transform
        if name == "download":
            path = Path(args[1])
            data = path.read_bytes()
            path.write_bytes(transform(data, 0, len(data)))
            return result
        if name == "open_read":
            return self._corrupting_stream(result, transform, self.inner.size(key))
        start = int(args[1]) if name == "read_range" else 0
        total = self.inner.size(key) if name == "read_range" else None
        if name == "read":
            total = len(result)
        return transform(bytes(result), start, total)

    @staticmethod
    @contextlib.contextmanager
    def _corrupting_stream(
        manager: Any, transform: Callable[[bytes, int, int | None], bytes], total: int
    ) -> Iterator[Any]:
        with manager as handle:
            yield _CorruptingReader(handle, transform, total)


def chunks(data: bytes, size: int) -> Iterable[bytes]:
    """``data`` as a chunk iterable, for calling write methods the way streaming callers do."""
    return (data[i : i + size] for i in range(0, len(data), size))
