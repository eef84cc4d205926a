"""Refs, records and queries: how users name, find and rank models. Pure: nothing here touches I/O.

A *ref* is what a user types to name a model version:

* ``name``: the newest live version of that name
* ``name@3``: version 3; ``name@latest`` is the same as ``name``
* ``name:prod``: the version a tag points at
* ``sha256:<hex>`` or a prefix of at least 4 hex digits, with the ``sha256:`` or without it (a bare hex prefix of
  at least 8 digits is tried as a digest only when no model has that name)

A *record* is one live version with its manifest's searchable metadata.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import FormatError
from .manifest import TrainingSummary, check_name

MIN_PREFIX = 4
MIN_BARE_PREFIX = 8
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed ref. Exactly one way of choosing is set: ``version``, ``tag``, ``digest_prefix``, or none (latest).

    Attributes:
        text: the ref as typed.
        name: the model name, or None for a digest ref.
        version: the version number, for ``name@N``.
        tag: the tag, for ``name:tag``.
        digest_prefix: lowercase hex (1-64 digits), for a digest ref.
    """

    text: str
    name: str | None = None
    version: int | None = None
    tag: str | None = None
    digest_prefix: str | None = None

    @classmethod
    def parse(cls, text: str) -> Ref:
        """Parse a ref (see the module docstring).

        Raises:
            FormatError: not a valid ref; the message shows the accepted forms.
        """
        if not isinstance(text, str) or not text:
            raise FormatError(f"a ref must be a non-empty string, not {text!r}")
        if text.startswith("sha256:"):
            prefix = text[len("sha256:") :]
            if not (MIN_PREFIX <= len(prefix) <= 64 and _HEX.fullmatch(prefix)):
                raise FormatError(
                    f"invalid digest ref {text!r}: give 'sha256:' and {MIN_PREFIX} to 64 lowercase hex digits"
                )
            return cls(text, digest_prefix=prefix)
        try:
            if "@" in text:
                name, _, version = text.partition("@")
                if version == "latest":
                    return cls(text, name=check_name(name))
                if not re.fullmatch(r"[1-9][0-9]{0,18}", version):
                    raise FormatError(f"invalid ref {text!r}: the version after '@' must be a number from 1")
                return cls(text, name=check_name(name), version=int(version))
            if ":" in text:
                name, _, tag = text.partition(":")
                return cls(text, name=check_name(name), tag=check_name(tag, what="tag"))
            return cls(text, name=check_name(text))
        except FormatError as exc:
            raise FormatError(
                f"{exc}\nA ref is NAME, NAME@VERSION, NAME:TAG, or sha256:DIGEST (a unique prefix of 4+ hex digits)"
            ) from None

    @property
    def bare_digest_prefix(self) -> str | None:
        """For a plain-name ref that could also be a digest prefix (8+ hex digits), that prefix."""
        plain = self.name is not None and self.version is None and self.tag is None
        if plain and self.name and MIN_BARE_PREFIX <= len(self.name) <= 64 and _HEX.fullmatch(self.name):
            return self.name
        return None


# Metric names that are better when lower, by the words they are made of (split at "_", "-", "." and spaces, so
# "val_loss" is a loss but "lifetime_reward" is not a time); anything else is better when higher.
_LOWER_IS_BETTER = frozenset(
    {"loss", "error", "err", "mse", "mae", "rmse", "nll", "perplexity", "duration", "time", "latency", "residual"}
)
_BETTER_WORDS = frozenset({"reduction", "improvement", "gain", "accuracy", "reward", "score"})

# Seed-compatible metric names that live in the training summary rather than in ``metrics``.
_SUMMARY_METRICS: Mapping[str, str] = {
    "training_duration": "duration_s",
    "duration": "duration_s",
    "duration_s": "duration_s",
    "final_loss": "final_loss",
    "best_loss": "best_loss",
    "best_val_loss": "best_val_loss",
    "epochs": "epochs",
    "steps": "steps",
}


def infer_mode(metric: str) -> str:
    """``"min"`` for losses, errors, durations; ``"max"`` otherwise (accuracy, r2, ...)."""
    words = [w for w in re.split(r"[_\-.\s]+", metric.lower()) if w]
    # The last word decides: "error_reduction" is a reduction (higher is better), "reward_time" a time.
    for word in reversed(words):
        if word in _LOWER_IS_BETTER:
            return "min"
        if word in _BETTER_WORDS:
            return "max"
    return "max"


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One live model version with its searchable metadata.

    Attributes:
        name, version, digest: the version's identity (``ref`` gives ``name@version``).
        seq: the log position of its publish (orders records by publish time).
        published_at: when it was published (log time).
        model_type, created_at, description, labels, metrics, training, parent: from the manifest.
        tags: the registry tags that point at this version now.
        size: bytes of tensor data (tied tensors counted once).
        tensor_count: number of state-dict entries.
    """

    name: str
    version: int
    digest: Digest
    seq: int
    published_at: str
    model_type: str
    created_at: str
    description: str
    labels: tuple[str, ...]
    tags: tuple[str, ...]
    metrics: Mapping[str, float]
    training: TrainingSummary
    parent: Digest | None
    size: int
    tensor_count: int
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``name@version``: a ref that always names exactly this version."""
        return f"{self.name}@{self.version}"

    def metric(self, metric: str) -> float | None:
        """The value of ``metric``: from ``metrics`` first, else from the training summary (seed names such as
        ``training_duration`` and ``best_val_loss``), else None."""
        if metric in self.metrics:
            return float(self.metrics[metric])
        field_name = _SUMMARY_METRICS.get(metric)
        value = getattr(self.training, field_name) if field_name else None
        return None if value is None or isinstance(value, bool) else float(value)

    def as_row(self) -> dict[str, Any]:
        """A flat dict: identity, metadata, then one column per metric."""
        row: dict[str, Any] = {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "digest": str(self.digest),
            "model_type": self.model_type,
            "created_at": self.created_at,
            "description": self.description,
            "tags": list(self.labels),
            "aliases": list(self.tags),
            "size": self.size,
            "training_duration": self.training.duration_s,
            "final_loss": self.training.final_loss,
            "best_val_loss": self.training.best_val_loss,
            "converged": self.training.converged,
            "parent": None if self.parent is None else str(self.parent),
        }
        for key, value in self.metrics.items():
            row.setdefault(key, value)
        return row


_OPS: Mapping[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "!=": operator.ne,
    "==": operator.eq,
    "<": operator.lt,
    ">": operator.gt,
    "=": operator.eq,
}
_FILTER_RE = re.compile(r"\s*([^<>=!\s]+)\s*(<=|>=|!=|==|<|>|=)\s*(\S+)\s*")


@dataclass(frozen=True, slots=True)
class MetricFilter:
    """A threshold on one metric, such as ``val_loss<0.1``. A record without the metric does not match."""

    metric: str
    op: str
    value: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise FormatError(f"unknown comparison {self.op!r}; use one of {', '.join(_OPS)}")

    @classmethod
    def parse(cls, text: str) -> MetricFilter:
        """Parse ``METRIC OP NUMBER`` (``val_loss<0.1``, ``epochs>=100``).

        Raises:
            FormatError: anything else.
        """
        match = _FILTER_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise FormatError(f"invalid metric filter {text!r}: write METRIC OP NUMBER, e.g. 'val_loss<0.1'")
        try:
            value = float(match.group(3))
        except ValueError:
            raise FormatError(f"invalid metric filter {text!r}: {match.group(3)!r} is not a number") from None
        return cls(match.group(1), match.group(2), value)

    def matches(self, record: ModelRecord) -> bool:
        """True when the record has the metric and it passes the comparison."""
        value = record.metric(self.metric)
        return value is not None and not math.isnan(value) and _OPS[self.op](value, self.value)


@dataclass(frozen=True, slots=True)
class Query:
    """A filter over records; every given condition must hold.

    Attributes:
        name: exact model name.
        model_type: exact model type.
        tags: each must be one of the record's labels (manifest tags) or registry tags.
        where: metric thresholds.
    """

    name: str | None = None
    model_type: str | None = None
    tags: tuple[str, ...] = ()
    where: tuple[MetricFilter, ...] = ()

    def matches(self, record: ModelRecord) -> bool:
        """True when ``record`` passes every condition."""
        if self.name is not None and record.name != self.name:
            return False
        if self.model_type is not None and record.model_type != self.model_type:
            return False
        if self.tags and not set(self.tags) <= set(record.labels) | set(record.tags):
            return False
        return all(f.matches(record) for f in self.where)


def best(records: Iterable[ModelRecord], metric: str, *, mode: str | None = None) -> ModelRecord | None:
    """The record with the best value of ``metric``; ties go to the newest (latest publish). None when no record
    has the metric.

    Args:
        mode: ``"min"`` or ``"max"``; None infers it from the metric's name (see :func:`infer_mode`).

    Raises:
        FormatError: ``mode`` is not min or max.
    """
    mode = infer_mode(metric) if mode is None else mode
    if mode not in ("min", "max"):
        raise FormatError(f"mode must be 'min' or 'max', not {mode!r}")
    sign = 1.0 if mode == "min" else -1.0
    scored = [(v, r) for r in records if (v := r.metric(metric)) is not None and not math.isnan(v)]
    if not scored:
        return None
    return min(scored, key=lambda pair: (sign * pair[0], -pair[1].seq))[1]


class Column(Sequence[Any]):
    """One column of a :class:`RecordTable`; ``.values`` as pandas has it."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def __getitem__(self, index: Any) -> Any:
        return self.values[index]

    def __len__(self) -> int:
        return len(self.values)

    def tolist(self) -> list[Any]:
        """The values as a list."""
        return list(self.values)


class RecordTable(Sequence[ModelRecord]):
    """Records as a table: iterate records, index columns by name, ``head(n)``, or ``to_pandas()``.

    Args:
        records: the rows.
        row: turns a record into a flat dict (the columns).
    """

    def __init__(
        self, records: Iterable[ModelRecord], *, row: Callable[[ModelRecord], dict[str, Any]] = ModelRecord.as_row
    ) -> None:
        self.records = list(records)
        self._row = row

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ModelRecord]:
        return iter(self.records)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if self.records and key not in self.columns:
                raise KeyError(f"no column {key!r}; columns: {', '.join(self.columns)}")
            return Column([row.get(key) for row in self.rows()])
        if isinstance(key, slice):
            return RecordTable(self.records[key], row=self._row)
        return self.records[key]

    @property
    def columns(self) -> list[str]:
        """Column names, in first-seen order across rows."""
        seen: dict[str, None] = {}
        for row in self.rows():
            seen.update(dict.fromkeys(row))
        return list(seen)

    @property
    def empty(self) -> bool:
        """True when there are no rows (as pandas has it)."""
        return not self.records

    def rows(self) -> list[dict[str, Any]]:
        """Every record as a flat dict."""
        return [self._row(r) for r in self.records]

    def head(self, n: int = 5) -> RecordTable:
        """The first ``n`` rows."""
        return RecordTable(self.records[:n], row=self._row)

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` of the rows.

        Raises:
            ImportError: pandas is not installed (``pip install pandas``).
        """
        import pandas  # noqa: PLC0415 (pandas is optional)

        return pandas.DataFrame(self.rows(), columns=self.columns)

    def __repr__(self) -> str:
        shown = ", ".join(r.ref for r in self.records[:5])
        return f"RecordTable({len(self.records)} rows: {shown}{', ...' if len(self) > 5 else ''})"
