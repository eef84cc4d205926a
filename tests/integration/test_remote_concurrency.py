"""Spawned processes publishing to one S3 store and to one GCS store at once (DESIGN.md section 4).

Each child is a separate process with its own cache folder and its own storage client, given the store URL and its
fsspec options as arguments. The registry's put-if-absent on ``log/<tip+1>`` (S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``) is then the only thing that orders them. Afterwards: versions 1..N with no gap, each
child's saves present exactly once (their metrics and descriptions carry the child and its index), and the hash
chain intact, checked by ``Store.log()`` and again here from the raw bytes of every entry in the bucket.

CI runs 4 children x 25 publishes; ``FRACSTORE_STRESS=1`` runs 4 x 100. Each test prints how long the publishes
took and how many log creates lost their race (``-s`` shows it).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pytest

from fracstore import Digest, Store, canonical
from fracstore.layout import LOG_PREFIX, log_key
from tests.helpers import run_children
from tests.integration._remote_children import assert_same_state, child_state, publish_remote
from tests.servers import StoreLocation

STRESS = os.environ.get("FRACSTORE_STRESS") == "1"
CHILDREN = 4
PER_CHILD = 100 if STRESS else 25
JOIN_TIMEOUT = 600.0 if STRESS else 240.0  # generous for a noisy 2-core machine; a hang fails the test, not the run


def run_publishers(location: StoreLocation, tmp_path: Path, name: str) -> list[dict[str, Any]]:
    """Start the children, wait for all of them (bounded), and return their reports."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(CHILDREN)
    results = [tmp_path / f"result-{c}.json" for c in range(CHILDREN)]
    procs = [
        ctx.Process(
            target=publish_remote,
            args=(location.url, location.storage_options, name, c),
            kwargs={
                "count": PER_CHILD,
                "cache_dir": str(tmp_path / f"child-cache-{c}"),
                "barrier": barrier,
                "result_path": str(results[c]),
            },
            daemon=True,
        )
        for c in range(CHILDREN)
    ]
    return run_children(procs, results, timeout=JOIN_TIMEOUT)


def raw_log(location: StoreLocation) -> list[bytes]:
    """The bytes of every object under ``log/`` in the bucket, in key order, read by the storage client itself."""
    fs, root = fsspec.core.url_to_fs(location.url, **location.storage_options)
    fs.invalidate_cache()
    paths = sorted(fs.find(f"{root}/{LOG_PREFIX.rstrip('/')}"))
    keys = [p.split(f"{root}/", 1)[1] for p in paths]
    total = len(keys)
    assert keys == [log_key(seq) for seq in range(1, total + 1)], "the log's keys are not 1..N without a gap"
    return [bytes(fs.cat_file(p)) for p in paths]


def check_run(location: StoreLocation, tmp_path: Path, name: str, reports: list[dict[str, Any]]) -> None:
    total = CHILDREN * PER_CHILD
    reader = Store.open(location.url, storage_options=location.storage_options, create=False, cache_dir=tmp_path / "r")
    assert {r["store_id"] for r in reports} == {reader.id}, "the children did not agree on one store"

    # Versions 1..N, no gap; each (child, index) exactly once, in its metrics and its description.
    records = reader.list(name)
    assert [r.version for r in records] == list(range(1, total + 1))
    carried = Counter((int(r.metrics["child"]), int(r.metrics["index"])) for r in records)
    assert carried == Counter((c, i) for c in range(CHILDREN) for i in range(PER_CHILD))
    assert all(r.description == f"child={int(r.metrics['child'])} index={int(r.metrics['index'])}" for r in records)
    by_digest = {r.digest: r for r in records}
    assert len(by_digest) == total
    for child, report in enumerate(reports):
        assert [i for i, _, _ in report["saved"]] == list(range(PER_CHILD))
        versions = [v for _, _, v in report["saved"]]
        assert versions == sorted(versions), f"child {child}'s own versions went backwards"
        for i, digest, version in report["saved"]:
            record = by_digest[Digest.parse(digest)]
            assert (record.version, record.metrics["child"], record.metrics["index"]) == (version, child, i)

    # The hash chain: Store.log() reads and checks it ...
    entries = reader.log()
    assert [e.seq for e in entries] == list(range(1, total + 1))
    assert all(e.op == "publish" and e.name == name for e in entries)
    assert [e.manifest for e in entries] == [r.digest for r in records], "version N is not the N-th publish"
    # ... and so do we, from the raw bytes in the bucket: each prev is the SHA-256 of the previous entry's bytes.
    raw = raw_log(location)
    assert len(raw) == total
    previous: str | None = None
    for seq, data in enumerate(raw, start=1):
        decoded = canonical.decode(data, what=f"log entry {seq}", max_bytes=1 << 16)
        assert decoded["seq"] == seq
        assert decoded["prev"] == previous, f"entry {seq} does not chain to entry {seq - 1}"
        assert Digest.parse(decoded["manifest"]) == entries[seq - 1].manifest
        previous = f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert len({e.writer.pid for e in entries}) == CHILDREN, "every child wrote its own entries"

    # A sample of versions loads bit-identical to what its child saved.
    for record in (records[0], records[total // 2], records[-1]):
        expected = child_state(int(record.metrics["child"]), int(record.metrics["index"]))
        assert_same_state(reader.load(record.ref), expected)


# About a minute on a 2-core machine: moto serves every request from this process while four clients publish.
@pytest.mark.slow
@pytest.mark.s3
def test_processes_publish_concurrently_to_one_s3_store(s3_location: StoreLocation, tmp_path: Path) -> None:
    reports = run_publishers(s3_location, tmp_path, "m")
    started = time.monotonic()
    check_run(s3_location, tmp_path, "m", reports)
    print(
        f"S3: {CHILDREN} x {PER_CHILD} publishes in {max(r['seconds'] for r in reports):.1f} s, "
        f"{sum(r['lost'] for r in reports)} lost races; checked in {time.monotonic() - started:.1f} s"
    )


@pytest.mark.gcs
def test_processes_publish_concurrently_to_one_gcs_store(gcs_location: StoreLocation, tmp_path: Path) -> None:
    reports = run_publishers(gcs_location, tmp_path, "m")
    started = time.monotonic()
    check_run(gcs_location, tmp_path, "m", reports)
    print(
        f"GCS: {CHILDREN} x {PER_CHILD} publishes in {max(r['seconds'] for r in reports):.1f} s, "
        f"{sum(r['lost'] for r in reports)} lost races; checked in {time.monotonic() - started:.1f} s"
    )
