"""Helpers shared by test modules (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import json
import multiprocessing.process
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def blob_bytes_on_disk(store_path: Path) -> int:
    """Total size of every blob file under a local store (what a save really cost)."""
    root = store_path / "blobs"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


def blob_files(store_path: Path) -> set[Path]:
    """Every blob file under a local store."""
    root = store_path / "blobs"
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def run_children(
    procs: Sequence[multiprocessing.process.BaseProcess], results: Sequence[Path], *, timeout: float
) -> list[dict[str, Any]]:
    """Start child processes, join them within one shared ``timeout`` (a hang fails the test, never the CI run),
    kill any left, and return the JSON report each wrote to its ``results`` path; a child that failed or wrote no
    report fails the test with its error."""
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        hung = [c for c, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"children {hung} did not finish within {timeout} s"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    reports = []
    for c, (proc, path) in enumerate(zip(procs, results, strict=True)):
        report = json.loads(path.read_text()) if path.exists() else {"error": "no report"}
        assert "error" not in report, f"child {c} failed (exit {proc.exitcode}):\n{report['error']}"
        assert proc.exitcode == 0
        reports.append(report)
    return reports
