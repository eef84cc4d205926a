"""Defaults and environment variables. Nothing is read at import time: every function reads the environment when
called, so tests and long-running programs see changes (STYLE.md: the huggingface_hub anti-pattern)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

ENV_CACHE_DIR = "FRACSTORE_CACHE_DIR"
ENV_STORE = "FRACSTORE_STORE"
ENV_DEBUG = "FRACSTORE_DEBUG"
ENV_CACHE_MAX_SIZE = "FRACSTORE_CACHE_MAX_SIZE"  # e.g. "20GiB": the local blob pool is pruned (LRU) to this size

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6}
_SIZE_UNITS |= {"g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*")

DEFAULT_PACK_THRESHOLD = 1 << 20  # tensors smaller than 1 MiB share one packed blob per save
DEFAULT_CHECKPOINT_INTERVAL = 1000
DEFAULT_APPEND_ATTEMPTS = 64  # a registry append retries this often after losing a race, then ConflictError
MAX_ENTRY_BYTES = 64 * 1024  # log entries stay small; anything larger goes into a blob
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """fracstore's own options for one open store (fsspec's ``storage_options`` travel separately, untouched).

    Attributes:
        pack_threshold: tensors with fewer bytes than this are packed together into one blob per save.
        checkpoint_interval: a registry checkpoint is written every this many log entries.
        append_attempts: how often one registry append may lose a race before raising ConflictError.
        cache_dir: the local cache folder (verified-state records, replay state).
    """

    pack_threshold: int = DEFAULT_PACK_THRESHOLD
    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL
    append_attempts: int = DEFAULT_APPEND_ATTEMPTS
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pack_threshold, int) or self.pack_threshold < 0:
            raise ConfigError(f"pack_threshold must be a byte count >= 0, not {self.pack_threshold!r}")
        if not isinstance(self.checkpoint_interval, int) or self.checkpoint_interval < 1:
            raise ConfigError(f"checkpoint_interval must be >= 1, not {self.checkpoint_interval!r}")
        if not isinstance(self.append_attempts, int) or self.append_attempts < 1:
            raise ConfigError(f"append_attempts must be >= 1, not {self.append_attempts!r}")


def default_cache_dir() -> Path:
    """``$FRACSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fracstore``, else ``~/.cache/fracstore``."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: ignore relative paths
    return base / "fracstore"


def default_store_url() -> str:
    """``$FRACSTORE_STORE``, else a local store under ``$XDG_DATA_HOME/fracstore/store``."""
    explicit = os.environ.get(ENV_STORE)
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return str(base / "fracstore" / "store")


def parse_size(text: str) -> int:
    """``"10GiB"``, ``"500 MB"``, ``"1.5 MiB"``, ``"0"`` -> bytes (binary units for ``KiB``/``K``, decimal for
    ``KB``).

    Raises:
        ConfigError: not a size.
    """
    match = _SIZE_RE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(f"{text!r} is not a size; write a number with an optional unit, e.g. 10GiB, 500MB or 0")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def cache_max_bytes() -> int | None:
    """``$FRACSTORE_CACHE_MAX_SIZE`` in bytes, or None when unset (the cache is then never pruned on its own).

    Raises:
        ConfigError: the variable is not a size.
    """
    text = os.environ.get(ENV_CACHE_MAX_SIZE, "").strip()
    return parse_size(text) if text else None
