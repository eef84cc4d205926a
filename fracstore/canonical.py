"""Canonical msgpack: one byte string for one value, so that a digest of the bytes is a digest of the value.

Rules (docs/format.md, "Canonical msgpack"): maps have string keys sorted by code point (= by UTF-8 bytes);
arrays for lists and tuples; str as msgpack str, bytes as bin; every float as float64 with NaN written as the one
quiet NaN 0x7ff8000000000000; integers in the smallest msgpack form (the library's default); no ext types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgpack

from .errors import FormatError

JSONLike = None | bool | int | float | str | bytes | list["JSONLike"] | dict[str, "JSONLike"]

_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


def normalize(value: Any, *, where: str = "value") -> JSONLike:
    """Return ``value`` as plain canonical data (dicts sorted by key, tuples as lists, NaN canonical).

    Raises:
        FormatError: a value msgpack cannot carry canonically (a set, an object, a non-string key, a huge int);
            the message names where it sits.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise FormatError(f"{where}: integer {value} does not fit in 64 bits")
        return int(value)
    if isinstance(value, float):
        return math.nan if math.isnan(value) else float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        out: dict[str, JSONLike] = {}
        for key in sorted(value, key=_key_order(where)):
            out[key] = normalize(value[key], where=f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [normalize(item, where=f"{where}[{i}]") for i, item in enumerate(value)]
    # numpy / torch scalars and small arrays are common in configs, metrics and histories; store them as the
    # Python numbers and lists they hold.
    if hasattr(value, "tolist") and hasattr(value, "ndim") and hasattr(value, "dtype"):
        plain = value.tolist()
        if isinstance(plain, bool | int | float | list):
            return normalize(plain, where=where)
    raise FormatError(
        f"{where}: {type(value).__name__} cannot be stored; use None, bool, int, float, str, bytes, lists and "
        "dicts with string keys"
    )


def _key_order(where: str) -> Any:
    def check(key: object) -> str:
        if not isinstance(key, str):
            raise FormatError(f"{where}: map keys must be strings, not {type(key).__name__} ({key!r})")
        return key

    return check


def encode(value: Any, *, where: str = "value") -> bytes:
    """Canonical msgpack bytes of ``value`` (see module docstring).

    Raises:
        FormatError: see :func:`normalize`.
    """
    try:
        data: bytes = msgpack.packb(normalize(value, where=where), use_bin_type=True, use_single_float=False)
    except UnicodeEncodeError as exc:
        raise FormatError(f"{where}: a string is not valid Unicode (lone surrogate?): {exc}") from exc
    return data


def _refuse_timestamp(value: Any) -> None:
    # msgpack decodes its timestamp extension (ext -1) itself, before any ext_hook sees it.
    if isinstance(value, msgpack.Timestamp):
        raise FormatError("msgpack ext type -1 (timestamp) is not allowed in fracstore objects")


def _strict_list(items: list[Any]) -> list[Any]:
    for item in items:
        _refuse_timestamp(item)
    return items


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        _refuse_timestamp(value)
        if not isinstance(key, str):
            raise FormatError(f"map keys must be strings, not {type(key).__name__}")
        if key in out:
            raise FormatError(f"duplicate map key {key!r}")
        out[key] = value
    return out


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FormatError(f"msgpack ext type {code} is not allowed in fracstore objects")


def decode(data: bytes, *, what: str, max_bytes: int) -> Any:
    """Decode msgpack written by :func:`encode` (or any well-formed msgpack without ext types).

    Raises:
        FormatError: the bytes are too large, not msgpack, or use ext types.
    """
    if len(data) > max_bytes:
        raise FormatError(f"{what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            object_pairs_hook=_strict_map,
            list_hook=_strict_list,
        )
    except FormatError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise FormatError(f"{what} is not valid msgpack: {exc}") from exc
    _refuse_timestamp(value)
    return value
