"""Named remotes: short names for store URLs (and their fsspec ``storage_options``), kept in a small JSON file.

The file is ``$XDG_CONFIG_HOME/fracstore/remotes.json`` (else ``~/.config/fracstore/remotes.json``), read each time
it is needed (never at import time) and replaced atomically on every change, so two commands editing it at once
leave one complete file. It holds only what the user gave: a URL and, when asked, options such as ``endpoint_url``
or ``profile``. Credentials belong in the standard environment or the cloud SDKs' own files; a secret stored here
is one the user put here explicitly, and :func:`redacted_options` hides it whenever remotes are shown.

Format::

    {"format": 1, "remotes": {"prod": {"url": "s3://bucket/models", "storage_options": {"profile": "ml"}}}}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, FormatError, NotFoundError

REMOTES_FORMAT = 1
REMOTES_FILE = "remotes.json"
# A remote name can never be mistaken for a URL or a path: no "/", ":", "\" or leading ".".
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "key", "auth", "session")
_MAX_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Remote:
    """A named store.

    Attributes:
        name: the short name (letters, digits, ``_``, ``-``).
        url: the store URL.
        storage_options: passed to fsspec untouched when the store is opened.
    """

    name: str
    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_remote_name(self.name)
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError(f"remote {self.name!r} needs a non-empty URL")
        if not isinstance(self.storage_options, Mapping) or not all(isinstance(k, str) for k in self.storage_options):
            raise ConfigError(f"remote {self.name!r}: storage_options must map option names to values")


def check_remote_name(name: str) -> str:
    """Return ``name`` if it can name a remote.

    Raises:
        ConfigError: not 1-64 letters, digits, ``_`` or ``-`` starting with a letter or digit.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid remote name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit "
            "(so that it cannot be mistaken for a path or URL)"
        )
    return name


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/fracstore``, else ``~/.config/fracstore``."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"  # XDG: ignore relative paths
    return base / "fracstore"


def remotes_path() -> Path:
    """The remotes file."""
    return config_dir() / REMOTES_FILE


def load_remotes(path: Path | None = None) -> dict[str, Remote]:
    """Every remote, by name; empty when the file does not exist.

    Raises:
        FormatError: the file exists but is not a remotes file (it is never silently replaced then).
    """
    source = remotes_path() if path is None else path
    try:
        if source.stat().st_size > _MAX_BYTES:
            raise FormatError(f"{source} is larger than {_MAX_BYTES} bytes; it is not a fracstore remotes file")
        raw = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read the remotes file {source}: {exc}; fix or remove it") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("remotes"), dict):
        raise FormatError(f"{source} is not a fracstore remotes file (no 'remotes' object); fix or remove it")
    fmt = raw.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > REMOTES_FORMAT:
        raise FormatError(f"{source} was written by a newer fracstore (format {fmt}); upgrade")
    remotes = {}
    for name, value in raw["remotes"].items():
        if not isinstance(value, dict):
            raise FormatError(f"{source}: remote {name!r} is not an object")
        try:
            remotes[name] = Remote(name, value.get("url", ""), dict(value.get("storage_options") or {}))
        except ConfigError as exc:
            raise FormatError(f"{source}: {exc}") from None
    return remotes


def save_remotes(remotes: Mapping[str, Remote], path: Path | None = None) -> None:
    """Replace the remotes file atomically (temp file, fsync, rename), readable by the user only, since options
    the user chose to store may be sensitive."""
    target = remotes_path() if path is None else path
    data = {
        "format": REMOTES_FORMAT,
        "remotes": {
            name: {"url": r.url, "storage_options": dict(r.storage_options)} for name, r in sorted(remotes.items())
        },
    }
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def add_remote(remote: Remote, *, replace: bool = False, path: Path | None = None) -> None:
    """Add ``remote``.

    Raises:
        ConfigError: a remote of that name exists and ``replace`` is False.
    """
    remotes = load_remotes(path)
    if remote.name in remotes and not replace:
        raise ConfigError(f"remote {remote.name!r} exists ({remotes[remote.name].url}); remove it first or replace it")
    remotes[remote.name] = remote
    save_remotes(remotes, path)


def remove_remote(name: str, *, path: Path | None = None) -> Remote:
    """Remove the remote ``name`` and return it.

    Raises:
        NotFoundError: there is no such remote.
    """
    remotes = load_remotes(path)
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise NotFoundError(f"no remote named {name!r} (remotes: {known})", what=name)
    removed = remotes.pop(name)
    save_remotes(remotes, path)
    return removed


def get_remote(name: str, *, path: Path | None = None) -> Remote | None:
    """The remote ``name``, or None when there is none (or ``name`` cannot be a remote name)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return None
    return load_remotes(path).get(name)


def is_secret_option(key: str) -> bool:
    """True for option names that usually hold credentials (``secret``, ``key``, ``token``, ``password`` ...)."""
    words = re.split(r"[_\-.]+", key.lower())
    return any(w.startswith(s) or w.endswith(s) for w in words for s in _SECRET_WORDS)


def redacted_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the values of secret-looking keys replaced by ``"***"`` (nested mappings too, such as
    ``client_kwargs``), safe to show."""
    return {
        k: "***" if is_secret_option(k) else redacted_options(v) if isinstance(v, Mapping) else v
        for k, v in options.items()
    }
