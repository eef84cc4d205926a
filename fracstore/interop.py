"""Weights in and out of the files other tools use: a ``.safetensors`` file, a Hugging Face-style folder, and (read
only, for migration) a legacy PyTorch ``.pt``/``.pth`` state dict.

Terms:

* *HF folder*: a folder with ``config.json`` and either ``model.safetensors`` or shards named
  ``model-00001-of-00003.safetensors`` listed in ``model.safetensors.index.json`` (``{"metadata": {"total_size":
  N}, "weight_map": {tensor name: shard file name}}``), as ``transformers`` writes them.
* *legacy state dict*: a pickle written by ``torch.save``. It is only ever read with ``torch.load(...,
  weights_only=True)`` (DESIGN.md section 9: never unpickle), and reading one warns with
  :class:`LegacyFormatWarning`, since the way forward is to save it into a store once and use safetensors after.

Reading returns CPU tensors; writing is atomic per file (a temp file with a random name in the target folder, then
``os.replace``), so an interrupted export never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, FormatError, NotFoundError

SAFETENSORS_SUFFIX = ".safetensors"
LEGACY_SUFFIXES = (".pt", ".pth", ".bin")
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-([0-9]{5})-of-([0-9]{5})\.safetensors")
# The state-dict keys a training checkpoint commonly nests its weights under (``torch.save({"model_state_dict":
# model.state_dict(), "optimizer": ...})``); tried in this order when the top level is not itself a state dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_MAX_JSON_BYTES = 64 * 1024 * 1024


class LegacyFormatWarning(UserWarning):
    """A weights file was read from a pickle-based format; save it into a store to migrate to safetensors."""


@dataclass(frozen=True, slots=True)
class Weights:
    """Weights read from a file or folder.

    Attributes:
        state_dict: tensor name -> CPU tensor.
        config: the HF folder's ``config.json``, or None when the source has none.
        kind: ``"safetensors"``, ``"hf-folder"`` or ``"legacy-pt"``.
        metadata: the safetensors header's text metadata (``{"format": "pt"}`` from transformers), if any.
    """

    state_dict: dict[str, torch.Tensor]
    kind: str
    config: dict[str, Any] | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


def read_weights(path: str | os.PathLike[str]) -> Weights:
    """Read weights from a ``.safetensors`` file, an HF folder or a legacy ``.pt``/``.pth``/``.bin`` state dict.

    Raises:
        NotFoundError: nothing at ``path``.
        FormatError: not one of those forms, or a malformed one (the message says which part).
    """
    source = Path(path)
    if source.is_dir():
        return read_hf_folder(source)
    if not source.exists():
        raise NotFoundError(f"no such file or folder: {source}", what=str(source))
    suffix = source.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        tensors, metadata = _read_safetensors_file(source)
        return Weights(tensors, "safetensors", metadata=metadata)
    if suffix in LEGACY_SUFFIXES:
        return Weights(read_legacy_state_dict(source), "legacy-pt")
    raise FormatError(
        f"cannot tell the format of {source}: give a .safetensors file, a folder with {HF_CONFIG} and "
        f"{HF_WEIGHTS} (or sharded weights), or a legacy {'/'.join(LEGACY_SUFFIXES)} state dict"
    )


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, on the CPU.

    Raises:
        NotFoundError: no such file.
        FormatError: not a valid safetensors file.
    """
    return _read_safetensors_file(Path(path))[0]


def _read_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open  # noqa: PLC0415 (keeps `import fracstore.interop` light)

    if not path.is_file():
        raise NotFoundError(f"no such safetensors file: {path}", what=str(path))
    try:
        # safetensors validates the header (size, offsets inside the file, no overlap, dtype and shape agree).
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # SafetensorError (a bad header) has no importable base class
        raise FormatError(f"{path} is not a valid safetensors file: {exc}") from exc
    return tensors, metadata


def read_hf_folder(folder: str | os.PathLike[str]) -> Weights:
    """Read an HF-style folder: ``config.json`` plus ``model.safetensors`` or the shards its index lists.

    Raises:
        NotFoundError: the folder, its config or a weights file is missing.
        FormatError: a malformed index or config, a shard name that is not a plain file name, a tensor listed in
            the index but missing from its shard, or a tensor in two shards.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotFoundError(f"no such folder: {root}", what=str(root))
    config_path = root / HF_CONFIG
    if not config_path.is_file():
        raise NotFoundError(
            f"{root} has no {HF_CONFIG}; an HF-style folder holds {HF_CONFIG} and {HF_WEIGHTS}", what=str(config_path)
        )
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise FormatError(f"{config_path} must hold a JSON object, not {type(config).__name__}")
    index_path = root / HF_INDEX
    if index_path.is_file():
        return Weights(_read_shards(root, index_path), "hf-folder", config=config)
    weights_path = root / HF_WEIGHTS
    if not weights_path.is_file():
        raise NotFoundError(f"{root} has neither {HF_WEIGHTS} nor {HF_INDEX}", what=str(weights_path))
    tensors, metadata = _read_safetensors_file(weights_path)
    return Weights(tensors, "hf-folder", config=config, metadata=metadata)


def _read_shards(root: Path, index_path: Path) -> dict[str, torch.Tensor]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index_path} has no weight_map of tensor name -> shard file name")
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        # The index is outside data: a shard name is a plain file name in this folder, never a path.
        if shard != os.path.basename(shard) or shard in ("", ".", "..") or not shard.endswith(SAFETENSORS_SUFFIX):
            raise FormatError(f"{index_path}: shard {shard!r} for {name!r} is not a .safetensors file name")
        by_shard.setdefault(shard, set()).add(name)
    tensors: dict[str, torch.Tensor] = {}
    for shard, wanted in sorted(by_shard.items()):
        loaded, _ = _read_safetensors_file(root / shard)
        missing = sorted(wanted - set(loaded))
        if missing:
            raise FormatError(f"{root / shard} lacks {missing[0]!r}, which {HF_INDEX} places there")
        for name in sorted(wanted):
            tensors[name] = loaded[name]
    return tensors


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise FormatError(f"{path} is larger than {_MAX_JSON_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not valid JSON: {exc}") from exc


def read_legacy_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save``, for migration, with ``weights_only=True``.

    A checkpoint that nests its weights under ``state_dict``, ``model_state_dict`` or ``model`` is accepted; its other
    entries (optimizer state, epoch) are ignored. Warns with :class:`LegacyFormatWarning`.

    Raises:
        NotFoundError: no such file.
        FormatError: the file cannot be read with ``weights_only=True`` (it holds objects beyond tensors and plain
            containers) or holds no state dict.
    """
    source = Path(path)
    if not source.is_file():
        raise NotFoundError(f"no such file: {source}", what=str(source))
    warnings.warn(
        f"{source} is a pickle-based PyTorch file, read with torch.load(weights_only=True) as a migration path; "
        "save it into a store once and use safetensors from then on",
        LegacyFormatWarning,
        stacklevel=2,
    )
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what weights_only refuses
        raise FormatError(
            f"cannot read {source} with torch.load(weights_only=True): {exc}. Only state dicts of tensors are "
            "migrated; never unpickle arbitrary objects"
        ) from exc
    state_dict = _as_state_dict(loaded)
    if state_dict is None and isinstance(loaded, Mapping):
        for key in _NESTED_KEYS:
            state_dict = _as_state_dict(loaded.get(key))
            if state_dict is not None:
                break
    if state_dict is None:
        keys = ", ".join(map(repr, list(loaded)[:10])) if isinstance(loaded, Mapping) else type(loaded).__name__
        raise FormatError(
            f"{source} holds no state dict (tensor name -> tensor); found {keys}. Nested weights are looked for "
            f"under {', '.join(_NESTED_KEYS)}"
        )
    return state_dict


def _as_state_dict(value: Any) -> dict[str, torch.Tensor] | None:
    if (
        isinstance(value, Mapping)
        and value
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    ):
        return dict(value)
    return None


# -- writing -----------------------------------------------------------------------------------------------------


def write_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> int:
    """Write ``state_dict`` as one safetensors file, atomically.

    Tied weights (entries sharing storage) are written as separate copies: the format has no aliases, and readers
    such as ``load_state_dict`` accept the copies.

    Returns:
        the file's size in bytes.

    Raises:
        ConfigError: ``path`` exists and ``overwrite`` is False.
        FormatError: a value is not a tensor.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass overwrite=True to replace it")
    tensors = _writable(state_dict)
    _atomic_write(target, functools.partial(_save_file, tensors, metadata))
    return target.stat().st_size


def write_hf_folder(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    max_shard_bytes: int | None = None,
    files: Mapping[str, bytes] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write an HF-style folder: ``config.json``, then ``model.safetensors`` or, when the tensors exceed
    ``max_shard_bytes``, shards ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``.

    Args:
        config: written as ``config.json`` (an empty object when None, since HF readers require the file).
        max_shard_bytes: the largest shard's tensor bytes (a tensor bigger than this gets a shard of its own);
            None writes one file.
        files: extra artifacts, ``{relative path: bytes}`` (tokenizer.json, README.md); paths must stay inside the
            folder.
        overwrite: replace files that exist; otherwise a non-empty folder is refused.

    Returns:
        the files written.

    Raises:
        ConfigError: the folder exists and is not empty, and ``overwrite`` is False; or a bad shard size.
        FormatError: a value is not a tensor, or an artifact path leaves the folder.
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise ConfigError(f"{root} is not empty; pass overwrite=True to write into it")
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or max_shard_bytes < 1):
        raise ConfigError(f"max_shard_bytes must be a positive byte count, not {max_shard_bytes!r}")
    extra = {_artifact_path(root, rel): data for rel, data in (files or {}).items() if rel != HF_CONFIG}
    tensors = _writable(state_dict)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    config_bytes = json.dumps(dict(config or {}), indent=2, sort_keys=True).encode("utf-8") + b"\n"
    written.append(_write_bytes(root / HF_CONFIG, config_bytes))
    shards = _plan_shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # what transformers writes and checks for
    if len(shards) == 1:
        written.append(root / HF_WEIGHTS)
        _atomic_write(root / HF_WEIGHTS, functools.partial(_save_file, shards[0], metadata))
    else:
        weight_map: dict[str, str] = {}
        for number, shard in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            weight_map.update(dict.fromkeys(shard, name))
            written.append(root / name)
            _atomic_write(root / name, functools.partial(_save_file, shard, metadata))
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        written.append(_write_bytes(root / HF_INDEX, json.dumps(index, indent=2).encode("utf-8") + b"\n"))
    for target, data in extra.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(_write_bytes(target, data))
    return written


def _artifact_path(root: Path, rel: str) -> Path:
    parts = rel.split("/")
    if not parts or any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\x00" in rel:
        raise FormatError(f"artifact path {rel!r} is not a relative path inside the folder")
    return root.joinpath(*parts)


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_shard_bytes is None:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():  # state-dict order keeps a layer's tensors together, as transformers does
        nbytes = _nbytes(tensor)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _writable(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no two sharing storage (safetensors refuses shared or strided tensors)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise FormatError(f"state dict entries must map a name to a tensor, not {name!r}: {type(tensor).__name__}")
        value = tensor.detach().to("cpu").contiguous()
        identity = (str(value.device), value.untyped_storage().data_ptr())
        if identity in storages and value.numel():
            value = value.clone()
        storages.add(identity)
        out[name] = value
    return out


def _save_file(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str] | None, path: str) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415 (keeps `import fracstore.interop` light)

    save_file(tensors, path, metadata=dict(metadata) if metadata else None)


def _write_bytes(target: Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    _atomic_write(target, write)
    return target


def _atomic_write(target: Path, write: Callable[[str], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
