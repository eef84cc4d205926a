"""Helpers shared by test modules (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

from pathlib import Path


def blob_bytes_on_disk(store_path: Path) -> int:
    """Total size of every blob file under a local store (what a save really cost)."""
    root = store_path / "blobs"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


def blob_files(store_path: Path) -> set[Path]:
    """Every blob file under a local store."""
    root = store_path / "blobs"
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()
