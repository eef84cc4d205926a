"""Code that runs in child processes of the concurrency and crash tests.

Children are started with the ``spawn`` method (``multiprocessing``) or as ``python -m tests.integration._children``
(``subprocess``), so everything here is importable at module level and imports torch and fracstore lazily. Every
tensor a child saves is derived deterministically from small integers, so the parent can recompute exactly what it
expects to load back.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

# -- deterministic content ------------------------------------------------------------------------------------

SHARED_ELEMENTS = 1 << 19  # 2 MiB of float32: above the 1 MiB pack threshold, so it is its own (deduped) blob
BIG_TENSORS = 4
BIG_ELEMENTS = 4 << 20  # 4 x 16 MiB of int32 = 64 MiB per crash-test save


def publisher_state(child: int, i: int) -> dict[str, Any]:
    """What publisher ``child`` saves as its ``i``-th model.

    ``w`` and ``b`` are unique per (child, i) and go into the packed blob; ``b`` holds a negative zero and a NaN so
    that only a bit-exact round trip compares equal. ``shared`` depends on ``i`` only: children publishing their
    ``i``-th model at the same moment race to write the same blob.
    """
    import torch

    return {
        "w": torch.full((4,), float(child * 1000 + i)),
        "b": torch.tensor([float(i), -0.0, float("nan"), float(child)], dtype=torch.float32),
        "shared": torch.arange(SHARED_ELEMENTS, dtype=torch.float32) + float(i),
    }


def big_state(i: int) -> dict[str, Any]:
    """The 64 MiB state dict of crash-test iteration ``i`` (every big tensor differs between iterations)."""
    import torch

    state = {
        f"layer{j}.weight": torch.arange(BIG_ELEMENTS, dtype=torch.int32) * (j + 1) + i * 7919
        for j in range(BIG_TENSORS)
    }
    state["bias"] = torch.tensor([float(i), -0.0, float("nan")], dtype=torch.float32)
    return state


def same_bits(a: Any, b: Any) -> bool:
    """True when two tensors have the same dtype, shape and bytes (NaN and -0.0 included)."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


# -- multiprocessing (spawn) targets ---------------------------------------------------------------------------


def publish_models(
    store_path: str,
    name: str,
    child: int,
    *,
    count: int,
    cache_dir: str,
    barrier: Any,
    result_path: str,
    checkpoint_interval: int | None = None,
) -> None:
    """Open the store once every sibling is ready, publish ``count`` models, write a JSON report to ``result_path``.

    The report is ``{"store_id": ..., "saved": [[i, digest, version], ...]}`` or ``{"error": traceback}``.
    """
    report: dict[str, Any]
    try:
        os.environ["FRACSTORE_CACHE_DIR"] = cache_dir
        from fracstore import Store

        barrier.wait(timeout=120)  # every child has imported torch: now the race starts
        store = Store.open(store_path, checkpoint_interval=checkpoint_interval)
        saved = []
        for i in range(count):
            result = store.save(publisher_state(child, i), name=name, config={"child": child, "i": i})
            saved.append([i, str(result.digest), result.version])
        report = {"store_id": store.id, "saved": saved}
    except BaseException:
        report = {"error": traceback.format_exc()}
    tmp = Path(result_path + ".part")
    tmp.write_text(json.dumps(report))
    tmp.replace(result_path)
    if "error" in report:
        sys.exit(1)


# -- subprocess entry point -------------------------------------------------------------------------------------


def crash_saver(store_path: str, first: int, checkpoint_interval: int) -> None:
    """Save ``big_state(i)`` for i = first, first + 1, ... until killed; print ``ready`` and ``saved <i> <ref>``."""
    from fracstore import Store

    store = Store.open(store_path, checkpoint_interval=checkpoint_interval)
    print("ready", flush=True)
    i = first
    while True:
        result = store.save(big_state(i), name="big", config={"i": i})
        print(f"saved {i} {result.ref} {result.digest}", flush=True)
        i += 1


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "crash-saver":
        crash_saver(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
