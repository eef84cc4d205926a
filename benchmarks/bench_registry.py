"""How the cost of one registry append and one idle refresh grows with the length of the log.

    python benchmarks/bench_registry.py [--sizes 500,2000,4000] [--url memory]

Each size builds a log of that many publishes (tiny models) in a fresh store, then times 20 more appends and 20
refreshes that find nothing new. A memory:// store shows the CPU cost alone; ``--url local`` uses a temp folder.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from fracstore import Store


def measure(size: int, url: str, cache: Path) -> tuple[float, float]:
    store = Store.open(url, cache_dir=cache)
    weights = {"w": torch.zeros(1)}
    for _ in range(size):
        store.save(weights, name="m")
    appends = []
    for _ in range(20):
        start = time.perf_counter()
        store.save(weights, name="m")
        appends.append(time.perf_counter() - start)
    refreshes = []
    for _ in range(20):
        start = time.perf_counter()
        store.registry.refresh()
        refreshes.append(time.perf_counter() - start)
    return statistics.median(appends), statistics.median(refreshes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,2000,4000")
    parser.add_argument("--url", choices=["memory", "local"], default="memory")
    args = parser.parse_args()
    print("| log entries | one save (append) | idle refresh |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            url = f"memory://bench-{uuid.uuid4().hex}" if args.url == "memory" else str(Path(tmp) / f"s{size}")
            append, refresh = measure(size, url, Path(tmp) / f"cache{size}")
            print(f"| {size} | {append * 1e3:.1f} ms | {refresh * 1e6:.0f} us |")


if __name__ == "__main__":
    main()
