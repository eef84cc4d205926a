"""The manifest: everything needed to use a saved model again, as one canonical msgpack blob.

A manifest's digest is the model's identity. It references its tensor blobs, file blobs and history blob by digest
and carries the metadata: name, model type, creation time, description, labels, config, metrics, training summary,
environment and parent. Encoding is canonical (``canonical.py``), so equal manifests are equal bytes. Readers ignore
unknown fields, which lets later versions add fields without breaking older readers; a higher ``schema`` than this
reader knows is refused, since it signals a change in meaning.
"""

from __future__ import annotations

import mimetypes
import platform
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy
import safetensors
import torch

from . import canonical
from .codec import TensorEntry
from .config import MAX_MANIFEST_BYTES
from .digest import Descriptor, Digest
from .errors import FormatError

SCHEMA = 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LABEL_RE = re.compile(r"[^\s,\x00-\x1f\x7f]([^,\x00-\x1f\x7f]{0,126}[^\s,\x00-\x1f\x7f])?")
RESERVED_NAMES = frozenset({"sha256"})  # "sha256:..." is a digest ref, so a model of that name could not be tagged


def check_name(name: str, *, what: str = "model name") -> str:
    """Return ``name`` if it is a valid model or tag name.

    Raises:
        FormatError: it is not 1-128 of ``A-Za-z0-9._-`` starting with a letter or digit.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise FormatError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise FormatError(f"{name!r} is reserved (it starts digest refs); choose another {what}")
    return name


def check_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Return ``labels`` (descriptive tags saved with a version) as a tuple without duplicates, in order.

    Raises:
        FormatError: a plain string was passed instead of a list, or a label is empty, has a comma, a control
            character, leading or trailing space, or more than 128 characters.
    """
    if isinstance(labels, str | bytes):
        raise FormatError(f"tags takes a list of strings, e.g. tags=[{labels!r}], not a single string")
    out = tuple(dict.fromkeys(labels))
    for label in out:
        if not isinstance(label, str) or not LABEL_RE.fullmatch(label):
            raise FormatError(
                f"invalid tag {label!r}: tags are 1-128 printable characters, no commas, no leading or trailing space"
            )
    return out


def check_model_type(model_type: str) -> str:
    """Return ``model_type`` if it is a string of at most 128 characters.

    Raises:
        FormatError: otherwise.
    """
    if not isinstance(model_type, str) or len(model_type) > 128:
        raise FormatError(f"model type must be a string of at most 128 characters, not {model_type!r}")
    return model_type


def format_time(moment: datetime) -> str:
    """UTC time as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (fixed width, sorts as text)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Inverse of :func:`format_time`.

    Raises:
        FormatError: not in that form.
    """
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"not a fracstore UTC time: {text!r}") from exc


def check_file_path(path: str) -> str:
    """Return ``path`` if it is a safe relative path for an artifact file (``tokenizer/vocab.json``).

    Raises:
        FormatError: absolute, empty, with ``..`` or ``.`` parts, backslashes or NUL.
    """
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\x00" in path:
        raise FormatError(f"invalid file path {path!r}: use a relative path like 'tokenizer/vocab.json'")
    return path


@dataclass(frozen=True, slots=True)
class FileEntry:
    """An artifact file stored with the model (tokenizer.json, a README, an ONNX export)."""

    path: str
    blob: Digest
    size: int
    media_type: str

    def __post_init__(self) -> None:
        check_file_path(self.path)


def guess_media_type(path: str) -> str:
    """The media type for an artifact path, ``application/octet-stream`` when unknown."""
    return mimetypes.guess_type(path, strict=False)[0] or "application/octet-stream"


@dataclass(frozen=True, slots=True)
class TrainingSummary:
    """How the model was trained. Every field is optional because not every loop knows every fact.

    Attributes:
        duration_s: wall-clock training time in seconds.
        epochs: epochs completed.
        steps: optimizer steps completed.
        converged: whether the loop's convergence criterion was met.
        final_loss: the training loss at the end.
        best_loss: the lowest training loss seen.
        best_val_loss: the lowest validation loss seen.
    """

    duration_s: float | None = None
    epochs: int | None = None
    steps: int | None = None
    converged: bool | None = None
    final_loss: float | None = None
    best_loss: float | None = None
    best_val_loss: float | None = None

    def __post_init__(self) -> None:
        # Coerce numbers so the encoded form does not depend on whether the caller passed 3 or 3.0 (float64 always).
        for name in ("duration_s", "final_loss", "best_loss", "best_val_loss"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise FormatError(f"training summary {name} must be a number, not {value!r}")
                object.__setattr__(self, name, float(value))
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise FormatError(f"training summary {name} must be a count (int >= 0), not {value!r}")
        if self.converged is not None and not isinstance(self.converged, bool):
            raise FormatError(f"training summary converged must be True or False, not {self.converged!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TrainingSummary:
        """Build from a dict; unknown keys are an error here (user input), unlike when decoding."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise FormatError(f"unknown training summary fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}


def capture_environment(*, devices: Sequence[str]) -> dict[str, str]:
    """The versions and platform a model was saved with, plus the devices its tensors were on."""
    from . import __version__  # noqa: PLC0415 (the package imports this module, so import its version late)

    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or ""),
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "fracstore": __version__,
        "device": ",".join(devices) or "cpu",
    }


@dataclass(frozen=True, slots=True)
class Manifest:
    """One saved model. See docs/format.md, "Manifest", for the encoded form."""

    name: str
    model_type: str
    created_at: str
    tensors: tuple[TensorEntry, ...]
    description: str = ""
    labels: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    training: TrainingSummary = field(default_factory=TrainingSummary)
    environment: Mapping[str, str] = field(default_factory=dict)
    parent: Digest | None = None
    files: tuple[FileEntry, ...] = ()
    tensor_blobs: tuple[Descriptor, ...] = ()
    history: Digest | None = None
    history_size: int = 0

    def __post_init__(self) -> None:
        check_name(self.name)
        check_model_type(self.model_type)
        parse_time(self.created_at)
        if check_labels(self.labels) != self.labels:
            raise FormatError(f"duplicate tags in manifest: {self.labels!r}")
        for key, value in self.metrics.items():
            if not isinstance(key, str) or not isinstance(value, int | float) or isinstance(value, bool):
                raise FormatError(f"metric {key!r} must map a name to a number, not {value!r}")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise FormatError("duplicate tensor names in manifest")
        stored = {t.name for t in self.tensors if t.alias is None}
        for entry in self.tensors:
            if entry.alias is not None and entry.alias not in stored:
                raise FormatError(f"tensor {entry.name!r} is an alias of {entry.alias!r}, which is not a stored tensor")
        blobs = {d.digest for d in self.tensor_blobs}
        missing = {t.blob for t in self.tensors} - blobs
        if missing:
            raise FormatError(
                f"manifest tensors reference blobs missing from its blob table: {sorted(map(str, missing))}"
            )
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise FormatError("duplicate file paths in manifest")

    def references(self) -> tuple[Descriptor, ...]:
        """Every blob this manifest references (tensor blobs, file blobs, the history blob), each once."""
        seen: dict[Digest, int] = {d.digest: d.size for d in self.tensor_blobs}
        for entry in self.files:
            seen.setdefault(entry.blob, entry.size)
        if self.history is not None:
            seen.setdefault(self.history, self.history_size)
        return tuple(Descriptor(digest, size) for digest, size in seen.items())

    def tensor_blob_sizes(self) -> dict[Digest, int]:
        """``{digest: size}`` of the tensor blobs."""
        return {d.digest: d.size for d in self.tensor_blobs}

    # -- encoding ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain data (the form that is canonically encoded)."""
        return {
            "schema": SCHEMA,
            "name": self.name,
            "model_type": self.model_type,
            "created_at": self.created_at,
            "description": self.description,
            "tags": list(self.labels),
            "config": dict(self.config),
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "training": self.training.as_dict(),
            "environment": dict(self.environment),
            "parent": None if self.parent is None else str(self.parent),
            "tensors": [_tensor_to_dict(t) for t in self.tensors],
            "blobs": [{"digest": str(d.digest), "size": d.size} for d in self.tensor_blobs],
            "files": [
                {"path": f.path, "blob": str(f.blob), "size": f.size, "media_type": f.media_type} for f in self.files
            ],
            "history": None if self.history is None else {"digest": str(self.history), "size": self.history_size},
        }

    def to_bytes(self) -> bytes:
        """Canonical msgpack bytes."""
        return canonical.encode(self.to_dict(), where="manifest")

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Decode a manifest, ignoring unknown fields.

        Raises:
            FormatError: not a manifest, or written by a newer schema.
        """
        raw = canonical.decode(data, what="manifest", max_bytes=MAX_MANIFEST_BYTES)
        if not isinstance(raw, dict):
            raise FormatError("manifest is not a map")
        try:
            schema = raw["schema"]
            if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
                raise FormatError(f"manifest schema must be a positive integer, not {schema!r}")
            if schema > SCHEMA:
                raise FormatError(
                    f"manifest schema {schema!r} is newer than this fracstore understands ({SCHEMA}); upgrade fracstore"
                )
            history = raw.get("history")
            training = raw.get("training") or {}
            return cls(
                name=raw["name"],
                model_type=raw["model_type"],
                created_at=raw["created_at"],
                description=raw.get("description", ""),
                labels=tuple(_typed(raw.get("tags", []), list, "tags")),
                config=_typed(raw.get("config", {}), dict, "config"),
                metrics=_typed(raw.get("metrics", {}), dict, "metrics"),
                training=TrainingSummary(
                    **{k: training[k] for k in TrainingSummary.__dataclass_fields__ if k in training}
                ),
                environment=raw.get("environment") or {},
                parent=None if raw.get("parent") is None else Digest.parse(raw["parent"]),
                tensors=tuple(_tensor_from_dict(t) for t in raw.get("tensors", ())),
                files=tuple(
                    FileEntry(f["path"], Digest.parse(f["blob"]), _count(f["size"]), f.get("media_type", ""))
                    for f in raw.get("files", ())
                ),
                history=None if history is None else Digest.parse(history["digest"]),
                history_size=0 if history is None else _count(history["size"]),
                tensor_blobs=tuple(
                    Descriptor(Digest.parse(b["digest"]), _count(b["size"])) for b in raw.get("blobs", ())
                ),
            )
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc


def _tensor_to_dict(entry: TensorEntry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "dtype": entry.dtype,
        "shape": list(entry.shape),
        "size": entry.size,
        "digest": str(entry.digest),
        "blob": str(entry.blob),
        "key": entry.key,
        "alias": entry.alias,
    }


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"manifest holds {value!r} where a count (int >= 0) belongs")
    return value


def _typed(value: Any, expected: type, field: str) -> Any:
    if not isinstance(value, expected):
        raise FormatError(f"manifest field {field!r} must be a {expected.__name__}, not {type(value).__name__}")
    return value


def _tensor_from_dict(raw: Mapping[str, Any]) -> TensorEntry:
    return TensorEntry(
        name=raw["name"],
        dtype=raw["dtype"],
        shape=tuple(_count(d) for d in raw["shape"]),
        size=_count(raw["size"]),
        digest=Digest.parse(raw["digest"]),
        blob=Digest.parse(raw["blob"]),
        key=raw["key"],
        alias=raw.get("alias"),
    )


def now() -> str:
    """The current UTC time in manifest form."""
    return format_time(datetime.now(UTC))
