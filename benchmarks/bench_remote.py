"""Remote benchmark: fracstore push/pull to S3 (moto) against boto3's upload_file/download_file, side by side.

What it measures (docs/benchmarks.md has the reading of a run):

1. push: a 512 MiB model (16 tensors of 32 MiB, ``--size-mib``) saved in a local store, pushed into a new prefix of
   a moto bucket with ``Store.push``; against ``boto3``'s ``upload_file`` of the same bytes as one safetensors file
   (its default TransferConfig: 8 MiB parts, 10 threads). Throughput in MiB/s of model bytes.
2. pull: that version pulled into a new local store with a new cache folder (``Store.pull``), against
   ``download_file`` of the file into a new local path.
3. second pull / second push of the unchanged model: bytes that travel (must be 0) and time.
4. v2 with 1 of the 16 tensors changed, pushed after v1: bytes sent (one tensor plus the manifest).
5. the S3 settings: the same push with s3fs's defaults (``--no-tuning`` rows) against fracstore's ``S3_TUNING``.

moto runs as a separate process (``python -m moto.server``), so the server's CPU use does not share a GIL with the
client being measured. Over plain http botocore signs every body with SHA-256 (a client CPU cost that https
endpoints avoid); that applies to both contenders. moto rebuilds the whole object for every ranged GET, which
penalises ranged (multipart) downloads: boto3's download_file uses them, s3fs's get_file does for objects over its
50 MiB block size. So boto3's download is also measured with multipart off (one plain GET), and the pull ratio is
taken against the faster of the two.

Usage:
    .venv/bin/python benchmarks/bench_remote.py [--size-mib 512] [--reps 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import boto3  # the credentials above are set before boto3 and s3fs read the environment
import safetensors.torch
import torch
from boto3.s3.transfer import TransferConfig

import fracstore
from fracstore.backend import S3_TUNING

MIB = 1 << 20
TENSORS = 16
PUSH_RATIO_TARGET = 0.8
PULL_RATIO_TARGET = 0.8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoProcess:
    """moto's S3 server in a child process on a free loopback port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("moto did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _model(size_mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    per = size_mib * MIB // TENSORS // 4
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(TENSORS)}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fracstore-bench-remote-"))
    os.environ["FRACSTORE_CACHE_DIR"] = str(work / "cache")
    moto = MotoProcess()
    rows: dict[str, list[float]] = {}
    facts: dict[str, Any] = {}

    def record(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    try:
        s3 = boto3.client("s3", endpoint_url=moto.endpoint)
        s3.create_bucket(Bucket="bench")
        options = {"endpoint_url": moto.endpoint}
        untuned = {
            "endpoint_url": moto.endpoint,
            # s3fs's own defaults, overriding every fracstore default
            "config_kwargs": {
                "request_checksum_calculation": "when_supported",
                "response_checksum_validation": "when_supported",
                "max_pool_connections": 10,
                "retries": {"mode": "legacy"},
                "connect_timeout": 60,
            },
        }
        state = _model(args.size_mib)
        model_bytes = sum(t.numel() * t.element_size() for t in state.values())
        facts["model_mib"] = model_bytes / MIB
        local = fracstore.Store.open(work / "local")
        local.save(state, name="bench")
        flat = work / "model.safetensors"
        safetensors.torch.save_file(state, str(flat))

        for rep in range(args.reps):
            # push: fracstore into a new prefix, boto3 upload_file of the same bytes
            remote = fracstore.Store.open(f"s3://bench/push-{rep}", storage_options=options)
            seconds, summary = _timed(lambda remote=remote: local.push(remote, "bench"))
            record("push fracstore (s)", seconds)
            assert summary.bytes_sent >= model_bytes
            seconds, _ = _timed(lambda rep=rep: s3.upload_file(str(flat), "bench", f"flat-{rep}.safetensors"))
            record("push boto3 upload_file (s)", seconds)
            plain = fracstore.Store.open(f"s3://bench/untuned-{rep}", storage_options=untuned)
            seconds, _ = _timed(lambda plain=plain: local.push(plain, "bench"))
            record("push fracstore, s3fs defaults (s)", seconds)

            # second push of the unchanged model
            seconds, again = _timed(lambda remote=remote: local.push(remote, "bench"))
            record("second push (s)", seconds)
            record("second push bytes sent", again.bytes_sent)

            # pull into a new local store with an empty cache
            os.environ["FRACSTORE_CACHE_DIR"] = str(work / f"cache-pull-{rep}")
            target = fracstore.Store.open(work / f"pulled-{rep}")
            source = fracstore.Store.open(f"s3://bench/push-{rep}", storage_options=options)
            seconds, pulled = _timed(lambda target=target, source=source: target.pull(source, "bench"))
            record("pull fracstore (s)", seconds)
            assert pulled.bytes_sent >= model_bytes
            out = work / f"download-{rep}.safetensors"
            seconds, _ = _timed(lambda rep=rep, out=out: s3.download_file("bench", f"flat-{rep}.safetensors", str(out)))
            record("pull boto3 download_file (s)", seconds)
            out.unlink()
            # The same with multipart off: one plain GET, the fair baseline against moto (see the module docstring).
            seconds, _ = _timed(
                lambda rep=rep, out=out: s3.download_file(
                    "bench", f"flat-{rep}.safetensors", str(out), Config=TransferConfig(multipart_threshold=1 << 40)
                )
            )
            record("pull boto3 download_file, one GET (s)", seconds)
            # ... and what it takes to get fracstore's guarantee from it: the SHA-256 of the downloaded bytes.
            hashing, _ = _timed(lambda out=out: _sha256_file(out))
            record("pull boto3 one GET + SHA-256 (s)", seconds + hashing)
            # ... and durable, as a pull into a store must be before it publishes (fracstore fsyncs every blob).
            syncing, _ = _timed(lambda out=out: _fsync(out))
            record("pull boto3 one GET + SHA-256 + fsync (s)", seconds + hashing + syncing)
            seconds, again = _timed(lambda target=target, source=source: target.pull(source, "bench"))
            record("second pull (s)", seconds)
            record("second pull bytes sent", again.bytes_sent)
            loaded = target.load("bench")
            assert all(torch.equal(loaded[k], state[k]) for k in state)
            shutil.rmtree(work / f"pulled-{rep}")
            shutil.rmtree(work / f"cache-pull-{rep}")
            out.unlink()
            os.environ["FRACSTORE_CACHE_DIR"] = str(work / "cache")

        # v2 with one tensor changed, pushed after v1
        changed = dict(state)
        changed["layer0.weight"] = state["layer0.weight"] + 1
        local.save(changed, name="bench")
        remote = fracstore.Store.open("s3://bench/push-0", storage_options=options)
        seconds, v2 = _timed(lambda: local.push(remote, "bench"))
        facts["v2 push bytes sent"] = v2.bytes_sent
        facts["v2 push bytes total"] = v2.bytes_total
        facts["v2 push (s)"] = seconds
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in rows.items()}
    mib = facts["model_mib"]

    def rate(name: str) -> float:
        return mib / medians[name]

    push_ratio = rate("push fracstore (s)") / rate("push boto3 upload_file (s)")
    # Against the faster of boto3's two downloads: moto makes its ranged (multipart) GETs pathologically slow.
    boto3_pull = max(rate("pull boto3 download_file (s)"), rate("pull boto3 download_file, one GET (s)"))
    pull_ratio = rate("pull fracstore (s)") / boto3_pull
    print(f"model: {mib:.0f} MiB in {TENSORS} tensors; {args.reps} repetitions, medians; S3_TUNING={dict(S3_TUNING)}")
    for name, values in rows.items():
        unit = f"  ({rate(name):7.1f} MiB/s)" if name.endswith("(s)") and "second" not in name else ""
        print(f"  {name:38s} {medians[name]:10.3f}{unit}   all: {[round(v, 3) for v in values]}")
    print(f"  push ratio (fracstore / boto3 throughput): {push_ratio:.2f}  target >= {PUSH_RATIO_TARGET}")
    print(f"  pull ratio (fracstore / faster boto3 throughput): {pull_ratio:.2f}  target >= {PULL_RATIO_TARGET}")
    verified_ratio = rate("pull fracstore (s)") / rate("pull boto3 one GET + SHA-256 + fsync (s)")
    print(f"  pull ratio against boto3 one GET + SHA-256 + fsync (the same guarantees): {verified_ratio:.2f}")
    print(
        f"  v2 (1 of {TENSORS} tensors changed): sent {facts['v2 push bytes sent'] / MIB:.2f} MiB "
        f"of {facts['v2 push bytes total'] / MIB:.2f} MiB in {facts['v2 push (s)']:.2f} s"
    )
    if args.json:
        payload = {
            "medians": medians,
            "all": rows,
            "facts": facts,
            "push_ratio": push_ratio,
            "pull_ratio": pull_ratio,
            "pull_ratio_same_guarantees": verified_ratio,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
