"""The tensor codec: a state dict <-> safetensors blobs, without whole-model bytes in memory.

Terms:

* *tensor blob*: a safetensors file holding exactly one tensor under the key ``"t"`` and no user metadata, so its
  digest depends only on dtype, shape and bytes: a renamed layer still dedups. Used for tensors of at least
  ``pack_threshold`` bytes.
* *packed blob*: one safetensors file per save holding every smaller tensor under its own name, in safetensors'
  own order (its dtype rank descending, which puts wider types first and keeps every tensor aligned, then name),
  so dedup by bytes stays near perfect while object counts stay low.
* *tensor digest*: the digest the tensor's own single-tensor blob has (or would have, for a packed tensor). It
  identifies the tensor's value wherever it is stored and lets ``diff`` compare packed tensors too.
* *alias*: a state-dict entry that shares storage with an earlier one (tied weights); stored once, and restored as
  the same tensor object on load.

The safetensors bytes are written by this module rather than by ``safetensors.torch.save``: the library builds the
whole file in memory (4-5.6 s per GiB, GROUND.md), while writing the header ourselves lets the tensor's own memory
be hashed and written in place. The form is pinned by golden tests against the library's output, and reading
always goes through safetensors. Nothing here performs I/O: the store hands in and takes out buffers.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open

from .digest import Descriptor, Digest
from .errors import FormatError

SINGLE_KEY = "t"

# torch dtype <-> safetensors dtype string, with safetensors' sort rank (higher sorts first in a multi-tensor file;
# measured against safetensors 0.8's own output and pinned by tests/unit/test_codec_golden.py).
_DTYPES: tuple[tuple[torch.dtype, str, int], ...] = (
    (torch.uint64, "U64", 17),
    (torch.int64, "I64", 16),
    (torch.float64, "F64", 15),
    (torch.complex64, "C64", 14),
    (torch.float32, "F32", 13),
    (torch.uint32, "U32", 12),
    (torch.int32, "I32", 11),
    (torch.bfloat16, "BF16", 10),
    (torch.float16, "F16", 9),
    (torch.uint16, "U16", 8),
    (torch.int16, "I16", 7),
    (torch.float8_e8m0fnu, "F8_E8M0", 6),
    (torch.float8_e4m3fn, "F8_E4M3", 5),
    (torch.float8_e5m2, "F8_E5M2", 4),
    (torch.int8, "I8", 3),
    (torch.uint8, "U8", 2),
    (torch.bool, "BOOL", 1),
)
TORCH_TO_ST = {dtype: name for dtype, name, _ in _DTYPES}
ST_TO_TORCH = {name: dtype for dtype, name, _ in _DTYPES}
_RANK = {name: rank for _, name, rank in _DTYPES}


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One row of a manifest's tensor table.

    Attributes:
        name: the state-dict key.
        dtype: safetensors dtype string (``"F32"``, ``"BF16"``, ...).
        shape: the tensor's shape.
        size: its data in bytes.
        digest: the tensor digest (see module docstring).
        blob: the blob that holds the data (for an alias: the blob of its target).
        key: the tensor's key inside that blob.
        alias: for tied weights, the name of the entry whose tensor this one is; else None.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    size: int
    digest: Digest
    blob: Digest
    key: str
    alias: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ST_TO_TORCH:
            raise FormatError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise FormatError(f"tensor {self.name!r}: bad shape {self.shape!r}")


@dataclass(frozen=True, slots=True)
class _Source:
    name: str
    tensor: torch.Tensor
    dtype: str
    nbytes: int


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's data as little-endian bytes, from CPU memory, without a copy when it is already contiguous."""
    # resolve_conj/resolve_neg: lazily conjugated or negated views cannot be reinterpreted as bytes.
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


def _header(members: Iterable[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """A safetensors header for ``(key, dtype, shape, nbytes)`` members laid out back to back, in the given order.

    safetensors writes compact JSON (serde_json) padded with spaces so the data starts 8-byte aligned.
    """
    fields: dict[str, dict[str, Any]] = {}
    offset = 0
    for key, dtype, shape, nbytes in members:
        fields[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True, slots=True)
class PendingBlob:
    """A blob to be written: which tensors go into it, under which keys. Materialize it in a worker thread.

    Attributes:
        members: ``(key, source)`` in file order.
        packed: True for the packed blob of small tensors.
        size: the blob's total size in bytes (known before any data is touched).
    """

    members: tuple[tuple[str, _Source], ...]
    packed: bool
    size: int

    def materialize(self) -> MaterializedBlob:
        """Copy the member tensors to contiguous CPU memory where needed and return the blob's buffers."""
        header = _header((key, s.dtype, tuple(s.tensor.shape), s.nbytes) for key, s in self.members)
        data = tuple(_tensor_bytes(source.tensor) for _, source in self.members)
        return MaterializedBlob(self, (header, *data))


@dataclass(frozen=True, slots=True)
class MaterializedBlob:
    """A blob's bytes as buffers (header first), plus its digest and each member's tensor digest."""

    pending: PendingBlob
    chunks: tuple[bytes | memoryview, ...]

    def hash(self) -> tuple[Descriptor, dict[str, Digest]]:
        """Hash the blob in one pass; for a packed blob also each member's single-tensor digest.

        Returns:
            the blob's descriptor and ``{tensor name: tensor digest}`` for its members.
        """
        header, *datas = self.chunks
        hasher = hashlib.sha256(header)
        member_digests = {}
        for (_, source), data in zip(self.pending.members, datas, strict=True):
            hasher.update(data)
            if self.pending.packed:  # each member's own digest from the same read of its memory
                single = hashlib.sha256(
                    _header([(SINGLE_KEY, source.dtype, tuple(source.tensor.shape), source.nbytes)])
                )
                single.update(data)
                member_digests[source.name] = Digest(single.hexdigest())
        blob = Descriptor(Digest(hasher.hexdigest()), self.pending.size)
        if not self.pending.packed:
            return blob, {source.name: blob.digest for _, source in self.pending.members}
        return blob, member_digests


@dataclass(frozen=True, slots=True)
class StateDictPlan:
    """A validated state dict, split into blobs, before any byte is hashed or written.

    Attributes:
        names: state-dict keys in their original order.
        blobs: the blobs to write (one per large tensor, at most one packed blob).
        aliases: ``{alias name: target name}`` for tied tensors.
        devices: the devices the tensors were on (for the manifest's environment).
    """

    names: tuple[str, ...]
    blobs: tuple[PendingBlob, ...]
    aliases: Mapping[str, str]
    sources: Mapping[str, _Source]
    devices: tuple[str, ...]

    def entries(self, hashed: Mapping[int, tuple[Descriptor, Mapping[str, Digest]]]) -> tuple[TensorEntry, ...]:
        """The tensor table, given ``{index in blobs: (descriptor, member digests)}`` for every blob."""
        located: dict[str, tuple[Digest, str, Digest]] = {}
        for index, pending in enumerate(self.blobs):
            descriptor, member_digests = hashed[index]
            for key, source in pending.members:
                located[source.name] = (descriptor.digest, key, member_digests[source.name])
        rows = []
        for name in self.names:
            target = self.aliases.get(name)
            source = self.sources[target or name]
            blob, key, digest = located[target or name]
            rows.append(
                TensorEntry(
                    name=name,
                    dtype=source.dtype,
                    shape=tuple(source.tensor.shape),
                    size=source.nbytes,
                    digest=digest,
                    blob=blob,
                    key=key,
                    alias=target,
                )
            )
        return tuple(rows)


def _check_tensor(name: Any, value: Any) -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"state dict keys must be non-empty strings, not {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"state dict key {name!r} is not valid Unicode (a lone surrogate)") from None
    if name == "__metadata__":
        raise FormatError("a tensor cannot be named '__metadata__' (the name is reserved by safetensors); rename it")
    if not isinstance(value, torch.Tensor):
        raise FormatError(
            f"state dict entry {name!r} is a {type(value).__name__}, not a tensor. Only tensors can be saved as "
            "weights: put plain values into config=, other artifacts into files="
        )
    if value.layout != torch.strided:
        raise FormatError(f"tensor {name!r} has layout {value.layout}; convert it with .to_dense() before saving")
    if value.device.type == "meta":
        raise FormatError(f"tensor {name!r} is on the meta device and holds no data; materialize it before saving")
    if value.dtype not in TORCH_TO_ST:
        supported = ", ".join(str(d).removeprefix("torch.") for d in TORCH_TO_ST)
        raise FormatError(f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot store ({supported})")
    return TORCH_TO_ST[value.dtype]


def _storage_identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def plan_state_dict(state_dict: Mapping[str, Any], *, pack_threshold: int) -> StateDictPlan:
    """Validate ``state_dict`` and split it into blobs. Touches no tensor data.

    Raises:
        FormatError: a key is not a string, a value is not a storable tensor (the message names the key).
    """
    if sys.byteorder != "little":
        raise FormatError("fracstore writes little-endian safetensors and runs only on little-endian machines")
    if not isinstance(state_dict, Mapping):
        raise FormatError(f"expected a state dict (a mapping of names to tensors), not {type(state_dict).__name__}")
    sources: dict[str, _Source] = {}
    aliases: dict[str, str] = {}
    first_by_storage: dict[tuple[Any, ...], str] = {}
    devices: set[str] = set()
    for name, value in state_dict.items():
        dtype = _check_tensor(name, value)
        devices.add(str(value.device))
        identity = _storage_identity(value) if value.numel() else None
        if identity is not None and identity in first_by_storage:
            aliases[name] = first_by_storage[identity]
            continue
        if identity is not None:
            first_by_storage[identity] = name
        sources[name] = _Source(name, value, dtype, value.numel() * value.element_size())
    large = [s for s in sources.values() if s.nbytes >= pack_threshold]
    small = sorted((s for s in sources.values() if s.nbytes < pack_threshold), key=lambda s: (-_RANK[s.dtype], s.name))
    blobs = [_pending([(SINGLE_KEY, s)], packed=False) for s in large]
    if small:
        blobs.append(_pending([(s.name, s) for s in small], packed=True))
    return StateDictPlan(
        names=tuple(state_dict.keys()),
        blobs=tuple(blobs),
        aliases=aliases,
        sources=sources,
        devices=tuple(sorted(devices)),
    )


def _pending(members: list[tuple[str, _Source]], *, packed: bool) -> PendingBlob:
    header = _header((key, s.dtype, tuple(s.tensor.shape), s.nbytes) for key, s in members)
    return PendingBlob(tuple(members), packed, len(header) + sum(s.nbytes for _, s in members))


def single_tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The canonical single-tensor blob of ``tensor`` as bytes (for tests and small tensors)."""
    dtype = _check_tensor(SINGLE_KEY, tensor)
    data = _tensor_bytes(tensor)
    return _header([(SINGLE_KEY, dtype, tuple(tensor.shape), len(data))]) + bytes(data)


BlobSource = Callable[[Descriptor], "Path | bytes"]


def decode_state_dict(
    entries: Iterable[TensorEntry], blob_sizes: Mapping[Digest, int], source: BlobSource, *, device: Any = None
) -> dict[str, torch.Tensor]:
    """Rebuild a state dict from its tensor table.

    Args:
        entries: the manifest's tensor table.
        blob_sizes: the size of every blob the table references.
        source: returns a verified local file (read zero-copy through mmap) or the verified bytes of a blob.
        device: where to put the tensors; None leaves them on the CPU.

    Raises:
        FormatError: a blob does not hold the tensor the table promises (dtype, shape or key differ).
    """
    entries = tuple(entries)
    by_blob: dict[Digest, list[TensorEntry]] = {}
    for entry in entries:
        if entry.alias is None:
            by_blob.setdefault(entry.blob, []).append(entry)
    loaded: dict[str, torch.Tensor] = {}
    for blob, members in by_blob.items():
        where = source(Descriptor(blob, blob_sizes[blob]))
        keys = list(dict.fromkeys(m.key for m in members))
        by_key = dict(zip(keys, _read_members(blob, where, keys), strict=True))
        seen: set[str] = set()
        for entry in members:
            # Separate tensors with equal bytes share a blob; each must still load as its own tensor, or an
            # in-place update of one would change the other (only aliases, i.e. tied weights, share memory).
            tensor = by_key[entry.key].clone() if entry.key in seen else by_key[entry.key]
            seen.add(entry.key)
            if TORCH_TO_ST.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise FormatError(
                    f"blob {blob} holds {tensor.dtype} {tuple(tensor.shape)} under {entry.key!r}, but the manifest "
                    f"says {entry.dtype} {entry.shape} for tensor {entry.name!r}: the manifest and blob disagree"
                )
            loaded[entry.name] = tensor if device is None else tensor.to(device)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        out[entry.name] = loaded[entry.alias] if entry.alias is not None else loaded[entry.name]
    return out


def _from_raw(info: Mapping[str, Any]) -> torch.Tensor:
    dtype = ST_TO_TORCH.get(info["dtype"])
    if dtype is None:
        raise FormatError(f"unsupported safetensors dtype {info['dtype']!r}")
    data, shape = info["data"], tuple(info["shape"])
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def _read_members(blob: Digest, where: Path | bytes, keys: list[str]) -> list[torch.Tensor]:
    try:
        if isinstance(where, Path):
            # safe_open maps the file privately (copy-on-write): writing to a loaded tensor never reaches the blob.
            with safe_open(str(where), framework="pt", device="cpu") as handle:
                present = set(handle.keys())
                missing = [k for k in keys if k not in present]
                if missing:
                    raise FormatError(f"blob {blob} has no tensor under {missing[0]!r}: the manifest and blob disagree")
                return [handle.get_tensor(key) for key in keys]
        # safetensors.torch.load lacks some dtypes (F8_E8M0 in 0.8); the Rust deserializer validates the header
        # and hands back raw bytes, and the dtype table here is the one the writer used.
        wanted = set(keys)
        raw = safetensors.deserialize(where)  # type: ignore[no-untyped-call]  # (the binding ships no stubs)
        tensors = {name: _from_raw(info) for name, info in raw if name in wanted}
    except FormatError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError (header, offsets, dtype) for a malformed file
        raise FormatError(f"blob {blob} is not a valid safetensors file: {exc}") from exc
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise FormatError(f"blob {blob} has no tensor under {missing[0]!r}: the manifest and blob disagree")
    return [tensors[key] for key in keys]
