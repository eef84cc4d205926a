"""How the command line shows things: sizes, times, tables and JSON. Pure functions of values (the clock is a
parameter), so they are tested without a store.

Human output uses binary units (KiB, MiB, GiB), local time with an age ("2 h ago") and aligned columns; JSON output
is plain data with the keys documented in docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import PurePath
from typing import Any

from .. import config
from ..digest import Descriptor, Digest
from ..errors import ConfigError, FormatError
from ..manifest import parse_time
from ..query import ModelRecord

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DURATION_FACTORS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z]*)\s*")


def format_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``; bytes below 1 KiB are shown exactly."""
    value = float(size)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover (the loop returns at the last unit)


def parse_size(text: str) -> int:
    """``10GiB``, ``500MB``, ``1.5 MiB``, ``4096`` -> bytes, by :func:`fracstore.config.parse_size`'s grammar.

    Raises:
        FormatError: anything else (a usage error on the command line).
    """
    try:
        return config.parse_size(text)
    except ConfigError as exc:
        raise FormatError(str(exc)) from None


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w``, ``0`` -> a timedelta.

    Raises:
        FormatError: anything else.
    """
    match = _DURATION_RE.fullmatch(text.lower())
    if match is not None and not match.group(2) and float(match.group(1)) == 0:
        return timedelta(0)
    factor = _DURATION_FACTORS.get(match.group(2)) if match else None
    if match is None or factor is None:
        raise FormatError(f"invalid duration {text!r}: write a number and a unit (s, m, h, d, w), e.g. 7d or 12h")
    return timedelta(seconds=float(match.group(1)) * factor)


def format_age(moment: datetime, *, now: datetime) -> str:
    """How long ago ``moment`` was: ``just now``, ``42 s ago``, ``5 min ago``, ``2 h ago``, ``3 d ago``."""
    seconds = (now - moment).total_seconds()
    if seconds < 0:
        return "in the future"
    if seconds < 1:
        return "just now"
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600), (365 * 86400, "d", 86400)):
        if seconds < limit:
            return f"{int(seconds // size)} {unit} ago"
    return f"{seconds / (365.25 * 86400):.1f} y ago"


def format_when(text: str, *, now: datetime, age_only: bool = False) -> str:
    """A fracstore UTC time string as local time with its age (``2024-12-01 14:30:22 (2 h ago)``)."""
    try:
        moment = parse_time(text)
    except FormatError:
        return text
    age = format_age(moment, now=now)
    return age if age_only else f"{moment.astimezone():%Y-%m-%d %H:%M:%S} ({age})"


def utc_now() -> datetime:
    """The current time, timezone-aware (the one place the CLI reads the clock)."""
    return datetime.now(UTC)


def format_number(value: float | None) -> str:
    """Metric values: four significant digits, ``-`` when absent."""
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] | None = None) -> str:
    """Aligned columns separated by two spaces; ``right[i]`` right-aligns column i (numbers, sizes)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    align = right or [False] * len(headers)

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, align, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses become objects (field names as keys), digests and paths strings,
    times ISO 8601 (UTC), durations seconds, tuples and sets lists."""
    if isinstance(value, Digest | PurePath):
        return str(value)
    if isinstance(value, Descriptor):
        return {"digest": str(value.digest), "size": value.size}
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [plain(v) for v in items]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None  # JSON has no NaN; json.loads in other languages refuses it
    return value


def to_json(value: Any) -> str:
    """Indented JSON text (one document, parseable with ``json.loads``)."""
    return json.dumps(plain(value), indent=2, ensure_ascii=False, allow_nan=False)


def record_json(record: ModelRecord) -> dict[str, Any]:
    """The JSON form of a model version (docs/cli.md, "Record keys")."""
    return {
        "ref": record.ref,
        "name": record.name,
        "version": record.version,
        "digest": str(record.digest),
        "model_type": record.model_type,
        "created_at": record.created_at,
        "published_at": record.published_at,
        "description": record.description,
        "tags": list(record.labels),
        "aliases": list(record.tags),
        "metrics": plain(dict(record.metrics)),
        "training": plain(record.training.as_dict()),
        "parent": None if record.parent is None else str(record.parent),
        "size": record.size,
        "tensor_count": record.tensor_count,
    }


def tags_cell(record: ModelRecord) -> str:
    """Registry tags as ``:prod``, then labels: ``:prod baseline tuned``."""
    return " ".join([*(f":{t}" for t in record.tags), *record.labels]) or "-"
