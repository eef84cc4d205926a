"""Local benchmark: fracstore against safetensors and raw SHA-256 on this machine, side by side, in one run.

What it measures (docs/benchmarks.md has the reading of a run):

1. save, regime "fresh": ``Store.open(<new dir>).save(state_dict)`` into a brand-new store per repetition, against
   ``safetensors.torch.save_file`` into a new file and against SHA-256 of the same tensor bytes on every core.
   Outputs of earlier repetitions are kept until the section ends, so every write lands on never-written paths.
2. save, regime "repeat": the same target paths rewritten after unlinking them (a store whose blob files were
   deleted; the same safetensors path), page cache warm. Then the dedup cases: the identical model saved again
   into the same store, and the model with 1 of its 16 big tensors changed (bytes from ``SavedModel``).
3. peak extra memory of one save, in a child process each: VmHWM (reset through ``/proc/self/clear_refs``) minus
   VmRSS with the state dict built.
4. load: ``store.load`` plus one read of every tensor against ``safetensors.torch.load_file`` plus the same reads,
   page cache warm, verified-state records present; and fracstore's first load with no records (fresh cache).

fracstore fsyncs every blob (DESIGN.md section 5) and ``save_file`` does not, so the table also shows
``save_file`` followed by an fsync of the file, for context; the targets are those of the issue and use plain
``save_file``.

Usage:
    .venv/bin/python benchmarks/bench_local.py [--size-mib 1024] [--reps 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

import fracstore

BIG_TENSORS = 16
WIDTH = 4096
MIB = 1 << 20
MIN_SIZE_MIB = 16  # below this the big tensors fall under fracstore's 1 MiB pack threshold
SAVE_RATIO_TARGET = 1.2
LOAD_RATIO_TARGET = 1.2
MEMORY_TARGET = 0.10  # peak extra memory of a save, as a fraction of the model size
CHILD_TIMEOUT_S = 600


# -- the model ------------------------------------------------------------------------------------------------


def build_state_dict(size_mib: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """16 float32 weights of ``size_mib / 16`` MiB each plus 50 small tensors (biases, norms, two scalars).

    Every tensor holds different random bytes, so no dedup can happen inside one model.
    """
    rows = size_mib * MIB // BIG_TENSORS // (WIDTH * 4)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(BIG_TENSORS):
        state[f"layers.{i}.weight"] = torch.rand(rows, WIDTH, generator=generator)
        state[f"layers.{i}.bias"] = torch.rand(WIDTH, generator=generator)
        state[f"layers.{i}.norm.weight"] = torch.rand(WIDTH, generator=generator)
        state[f"layers.{i}.norm.bias"] = torch.rand(WIDTH, generator=generator)
    state["step"] = torch.tensor(123_456, dtype=torch.int64)
    state["temperature"] = torch.tensor(0.7)
    return state


def model_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- the contenders -------------------------------------------------------------------------------------------


def quiesce() -> None:
    """Start each measurement with no dirty pages of an earlier one still being written back, and no garbage."""
    gc.collect()
    os.sync()


def time_fracstore_save(state: Mapping[str, torch.Tensor], store_dir: Path) -> tuple[float, fracstore.SavedModel]:
    quiesce()
    start = time.perf_counter()
    saved = fracstore.Store.open(store_dir).save(state, name="bench")
    return time.perf_counter() - start, saved


def time_save_file(state: Mapping[str, torch.Tensor], path: Path) -> tuple[float, float]:
    """Seconds for ``save_file``, and for ``save_file`` followed by an fsync of the file."""
    quiesce()
    start = time.perf_counter()
    safetensors.torch.save_file(state, str(path))
    written = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return written - start, time.perf_counter() - start


def _shares(tensors: list[torch.Tensor], count: int) -> list[list[torch.Tensor]]:
    """Split the tensors into ``count`` shares of about equal bytes (largest first, onto the lightest share)."""
    shares: list[list[torch.Tensor]] = [[] for _ in range(count)]
    loads = [0] * count
    for tensor in sorted(tensors, key=lambda t: -t.numel() * t.element_size()):
        lightest = loads.index(min(loads))
        shares[lightest].append(tensor)
        loads[lightest] += tensor.numel() * tensor.element_size()
    return [share for share in shares if share]


def _hash_share(share: list[torch.Tensor]) -> list[str]:
    # hashlib releases the GIL for updates of 2 KiB and more, so the threads hash in parallel.
    return [hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest() for t in share]


def time_sha256_all_cores(state: Mapping[str, torch.Tensor]) -> float:
    shares = _shares(list(state.values()), os.cpu_count() or 1)
    gc.collect()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(shares)) as pool:
        list(pool.map(_hash_share, shares))
    return time.perf_counter() - start


def read_every_tensor(state: Mapping[str, torch.Tensor]) -> float:
    """One full read of every tensor (a sum), so lazily mapped pages are really touched."""
    return sum(float(t.double().sum()) if t.dim() == 0 else float(t.sum()) for t in state.values())


def time_fracstore_load(store: fracstore.Store) -> float:
    gc.collect()
    start = time.perf_counter()
    state = store.load("bench")
    read_every_tensor(state)
    seconds = time.perf_counter() - start
    del state
    return seconds


def time_load_file(path: Path) -> float:
    gc.collect()
    start = time.perf_counter()
    state = safetensors.torch.load_file(str(path))
    read_every_tensor(state)
    seconds = time.perf_counter() - start
    del state
    return seconds


def delete_blob_files(store_dir: Path) -> None:
    """Unlink every blob file of a store, keeping its folders, marker and registry."""
    for path in (store_dir / "blobs").rglob("*"):
        if path.is_file():
            path.unlink()


# -- peak memory, in a child process ----------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_memory(kind: str, size_mib: int, work_dir: Path) -> dict[str, Any]:
    """Runs in the child: build the model, reset the high-water mark, save once, report the peak over baseline."""
    state = build_state_dict(size_mib)
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False  # then VmHWM may still hold a peak from building the model: the result is an upper bound
    baseline = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if kind == "fracstore":
        fracstore.Store.open(work_dir / "store").save(state, name="bench")
    elif kind == "save_file":
        safetensors.torch.save_file(state, str(work_dir / "model.safetensors"))
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    return {
        "kind": kind,
        "baseline_rss": baseline,
        "peak_rss": peak,
        "extra": max(0, peak - baseline),
        "hwm_reset": reset,
        "seconds": seconds,
    }


def measure_memory(kind: str, size_mib: int, work_dir: Path) -> dict[str, Any]:
    work_dir.mkdir(parents=True)
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                *("--child-memory", kind, "--size-mib", str(size_mib), "--work-dir", str(work_dir)),
            ],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory child for {kind} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


# -- the run --------------------------------------------------------------------------------------------------


class CpuMonitor:
    """How many CPUs other processes kept busy during a section (this machine is shared; it explains noise)."""

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")

    def _busy_seconds(self) -> float:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq + steal) / self._tick

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system + times.children_user + times.children_system

    def __enter__(self) -> CpuMonitor:
        self._start = (time.perf_counter(), self._busy_seconds(), self._own_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._start[0]
        busy = self._busy_seconds() - self._start[1]
        own = self._own_seconds() - self._start[2]
        self.others = max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def rotated(items: list[Callable[[], None]], by: int) -> list[Callable[[], None]]:
    """The contenders in a different order each repetition, so none always runs first or last."""
    by %= len(items)
    return items[by:] + items[:by]


def run_save_regimes(state: dict[str, torch.Tensor], root: Path, reps: int) -> dict[str, Any]:
    fresh: dict[str, list[float]] = {"fracstore": [], "save_file": [], "save_file_fsync": [], "sha256": []}
    fresh_dirs: list[Path] = []
    fresh_files: list[Path] = []
    saved_fresh: list[fracstore.SavedModel] = []
    for rep in range(reps):
        store_dir, path = root / f"fresh-store-{rep}", root / f"fresh-{rep}.safetensors"
        fresh_dirs.append(store_dir)
        fresh_files.append(path)

        def fr(store_dir: Path = store_dir) -> None:
            seconds, saved = time_fracstore_save(state, store_dir)
            fresh["fracstore"].append(seconds)
            saved_fresh.append(saved)

        def sf(path: Path = path) -> None:
            plain, synced = time_save_file(state, path)
            fresh["save_file"].append(plain)
            fresh["save_file_fsync"].append(synced)

        def sha() -> None:
            fresh["sha256"].append(time_sha256_all_cores(state))

        for step in rotated([fr, sf, sha], rep):
            step()
        progress(
            f"fresh rep {rep + 1}/{reps}: fracstore {fresh['fracstore'][-1]:.2f}s, save_file "
            f"{fresh['save_file'][-1]:.2f}s (+fsync {fresh['save_file_fsync'][-1]:.2f}s), "
            f"sha256 {fresh['sha256'][-1]:.2f}s"
        )

    # The repeat regime rewrites the first repetition's paths; the other fresh outputs are no longer needed.
    store_dir, path = fresh_dirs[0], fresh_files[0]
    for extra_dir, extra_file in zip(fresh_dirs[1:], fresh_files[1:], strict=True):
        shutil.rmtree(extra_dir)
        extra_file.unlink()
    repeat: dict[str, list[float]] = {"fracstore": [], "save_file": [], "save_file_fsync": [], "sha256": []}
    saved_repeat: list[fracstore.SavedModel] = []
    for rep in range(reps):

        def fr() -> None:
            delete_blob_files(store_dir)
            seconds, saved = time_fracstore_save(state, store_dir)
            repeat["fracstore"].append(seconds)
            saved_repeat.append(saved)

        def sf() -> None:
            path.unlink()
            plain, synced = time_save_file(state, path)
            repeat["save_file"].append(plain)
            repeat["save_file_fsync"].append(synced)

        def sha() -> None:
            repeat["sha256"].append(time_sha256_all_cores(state))

        for step in rotated([fr, sf, sha], rep):
            step()
        progress(
            f"repeat rep {rep + 1}/{reps}: fracstore {repeat['fracstore'][-1]:.2f}s, save_file "
            f"{repeat['save_file'][-1]:.2f}s (+fsync {repeat['save_file_fsync'][-1]:.2f}s), "
            f"sha256 {repeat['sha256'][-1]:.2f}s"
        )
    return {
        "fresh": fresh,
        "repeat": repeat,
        "bytes_written_fresh": [s.bytes_written for s in saved_fresh],
        "bytes_written_repeat": [s.bytes_written for s in saved_repeat],
        "store_dir": store_dir,
        "file": path,
    }


def run_dedup(state: dict[str, torch.Tensor], store_dir: Path, reps: int) -> dict[str, Any]:
    same: dict[str, list[Any]] = {"seconds": [], "bytes_written": [], "blobs_written": []}
    changed: dict[str, list[Any]] = {"seconds": [], "bytes_written": [], "blobs_written": []}
    key = "layers.3.weight"
    for rep in range(reps):
        seconds, saved = time_fracstore_save(state, store_dir)
        same["seconds"].append(seconds)
        same["bytes_written"].append(saved.bytes_written)
        same["blobs_written"].append(saved.blobs_written)
        # A different change each repetition, or the second one would dedup against the first.
        variant = dict(state)
        variant[key] = state[key] + float(rep + 1)
        seconds, saved = time_fracstore_save(variant, store_dir)
        del variant
        changed["seconds"].append(seconds)
        changed["bytes_written"].append(saved.bytes_written)
        changed["blobs_written"].append(saved.blobs_written)
        progress(
            f"dedup rep {rep + 1}/{reps}: identical {same['seconds'][-1]:.2f}s / {same['bytes_written'][-1]} B, "
            f"1 changed {changed['seconds'][-1]:.2f}s / {changed['bytes_written'][-1]} B"
        )
    return {"identical": same, "one_changed": changed, "changed_tensor_bytes": model_bytes({key: state[key]})}


def run_loads(store_dir: Path, path: Path, root: Path, reps: int) -> dict[str, Any]:
    # One untimed load of each first: fills the page cache, and checks both return the same tensors.
    ours = fracstore.Store.open(store_dir).load("bench")
    theirs = safetensors.torch.load_file(str(path))
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise RuntimeError("fracstore and safetensors loaded different tensors")
    del ours, theirs
    warm: dict[str, list[float]] = {"fracstore": [], "load_file": []}
    first: list[float] = []
    for rep in range(reps):
        store = fracstore.Store.open(store_dir)  # a new Store object: no manifest cached in memory

        def fr(store: fracstore.Store = store) -> None:
            warm["fracstore"].append(time_fracstore_load(store))

        def lf() -> None:
            warm["load_file"].append(time_load_file(path))

        for step in rotated([fr, lf], rep):
            step()
        # A fresh cache folder: no verified-state records, so this load re-hashes every blob.
        cold_cache = root / f"cold-cache-{rep}"
        first.append(time_fracstore_load(fracstore.Store.open(store_dir, cache_dir=cold_cache)))
        shutil.rmtree(cold_cache)
        progress(
            f"load rep {rep + 1}/{reps}: fracstore {warm['fracstore'][-1]:.3f}s, load_file "
            f"{warm['load_file'][-1]:.3f}s, fracstore first load {first[-1]:.3f}s"
        )
    return {"warm": warm, "first_fracstore": first}


def environment() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    repo = Path(__file__).resolve().parent.parent
    commit = dirty = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "fracstore"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / MIB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "safetensors": safetensors.__version__,
        "fracstore": fracstore.__version__,
        "commit": commit,
        "fracstore_uncommitted_changes": dirty,
    }


# -- report ---------------------------------------------------------------------------------------------------


def _span(values: list[float], unit: str = "s", digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return f"{median(values):.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**MISS**"


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case: what fracstore did, what the baselines did, the ratio, the target and the verdict."""
    rows: list[dict[str, Any]] = []
    size = results["model_bytes"]
    for regime in ("fresh", "repeat"):
        times = results["save"][regime]
        ours = median(times["fracstore"])
        bound = max(median(times["save_file"]), median(times["sha256"]))
        ratio = ours / bound
        rows.append(
            {
                "case": f"save, {regime}",
                "fracstore": _span(times["fracstore"]),
                "safetensors": f"save_file {_span(times['save_file'])}; +fsync {_span(times['save_file_fsync'])}",
                "sha256": _span(times["sha256"]),
                "ratio": f"{ratio:.2f} (vs save_file+fsync: {ours / median(times['save_file_fsync']):.2f})",
                "target": f"<= {SAVE_RATIO_TARGET}",
                "verdict": _verdict(ratio <= SAVE_RATIO_TARGET),
                "ratio_value": ratio,
            }
        )
    dedup = results["dedup"]
    for label, key, expected in (
        ("save identical model again", "identical", "~0 B (manifest only)"),
        ("save with 1 of 16 big tensors changed", "one_changed", f"~{dedup['changed_tensor_bytes'] / MIB:.0f} MiB"),
    ):
        written = dedup[key]["bytes_written"]
        rows.append(
            {
                "case": label,
                "fracstore": f"{_span(dedup[key]['seconds'])}; wrote {median(written) / MIB:.2f} MiB "
                f"in {median(dedup[key]['blobs_written']):.0f} blob(s)",
                "safetensors": f"rewrites all {size / MIB:.0f} MiB",
                "sha256": "",
                "ratio": f"{median(written) / size:.4f} of model",
                "target": expected,
                "verdict": "",
            }
        )
    memory = results["memory"]
    ours_mem = median([m["extra"] for m in memory["fracstore"]])
    theirs_mem = median([m["extra"] for m in memory["save_file"]])
    rows.append(
        {
            "case": "peak extra memory of a save",
            "fracstore": f"{ours_mem / MIB:.1f} MiB",
            "safetensors": f"save_file {theirs_mem / MIB:.1f} MiB ({theirs_mem / size:.1%})",
            "sha256": "",
            "ratio": f"{ours_mem / size:.1%} of model",
            "target": f"< {MEMORY_TARGET:.0%}",
            "verdict": _verdict(ours_mem < MEMORY_TARGET * size),
            "ratio_value": ours_mem / size,
        }
    )
    loads = results["load"]
    ratio = median(loads["warm"]["fracstore"]) / median(loads["warm"]["load_file"])
    rows.append(
        {
            "case": "load + read all, warm, records present",
            "fracstore": _span(loads["warm"]["fracstore"], digits=3),
            "safetensors": f"load_file {_span(loads['warm']['load_file'], digits=3)}",
            "sha256": "",
            "ratio": f"{ratio:.2f}",
            "target": f"<= {LOAD_RATIO_TARGET}",
            "verdict": _verdict(ratio <= LOAD_RATIO_TARGET),
            "ratio_value": ratio,
        }
    )
    first_ratio = median(loads["first_fracstore"]) / median(loads["warm"]["load_file"])
    rows.append(
        {
            "case": "first load + read all (no record: re-hash)",
            "fracstore": _span(loads["first_fracstore"], digits=3),
            "safetensors": f"load_file {median(loads['warm']['load_file']):.3f} s",
            "sha256": f"{median(results['save']['repeat']['sha256']):.3f} s",
            "ratio": f"{first_ratio:.2f}",
            "target": "(none)",
            "verdict": "",
        }
    )
    return rows


def markdown(results: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    env = results["environment"]
    lines = [
        f"fracstore local benchmark: {results['model_bytes'] / MIB:.1f} MiB state dict "
        f"({results['tensor_count']} tensors); saves: median of {results['reps']} reps, loads: of "
        f"{results['load_reps']}, memory: of {results['memory_reps']} child process(es); (min-max) in brackets",
        f"{env['cpus']} CPUs, {env['memory_gib']} GiB RAM, Python {env['python']}, torch {env['torch']}, "
        f"safetensors {env['safetensors']}, fracstore {env['fracstore']} @ {env['commit']}"
        + (" (+ uncommitted changes in fracstore/)" if env["fracstore_uncommitted_changes"] else ""),
        "",
        "| case | fracstore | safetensors | sha256, all cores | ratio | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row[k] for k in ("case", "fracstore", "safetensors", "sha256", "ratio", "target", "verdict")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("save ratio = fracstore / max(save_file, sha256 all cores); load ratio = fracstore / load_file.")
    busy = ", ".join(f"{k} {v:.2f}" for k, v in results["other_processes_cpus"].items())
    lines.append(f"CPUs kept busy by other processes during each section (of {env['cpus']}): {busy}.")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="model size in MiB (default 1024)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per measurement; medians are reported")
    parser.add_argument("--load-reps", type=int, default=9, help="repetitions of the (cheap) loads (default 9)")
    parser.add_argument("--memory-reps", type=int, default=1, help="child processes per memory measurement (1)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample as JSON to PATH ('-': stdout)")
    parser.add_argument("--tmp", metavar="DIR", default="/tmp", help="where the temporary folder goes (/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child-memory", choices=["fracstore", "save_file"], help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size_mib < MIN_SIZE_MIB:
        parser.error(f"--size-mib must be at least {MIN_SIZE_MIB}")
    if min(args.reps, args.load_reps, args.memory_reps) < 1:
        parser.error("--reps, --load-reps and --memory-reps must be at least 1")

    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.size_mib, args.work_dir)))
        return 0

    root = Path(tempfile.mkdtemp(prefix="fracstore-bench-", dir=args.tmp))
    os.environ["FRACSTORE_CACHE_DIR"] = str(root / "cache")  # children inherit it
    started = time.perf_counter()
    try:
        progress(f"building a {args.size_mib} MiB state dict in {root}")
        state = build_state_dict(args.size_mib)
        results: dict[str, Any] = {
            "environment": environment(),
            "size_mib": args.size_mib,
            "model_bytes": model_bytes(state),
            "tensor_count": len(state),
            "reps": args.reps,
            "load_reps": args.load_reps,
            "memory_reps": args.memory_reps,
        }
        others: dict[str, float] = {}
        with CpuMonitor() as monitor:
            save = run_save_regimes(state, root, args.reps)
        others["save"] = monitor.others
        with CpuMonitor() as monitor:
            results["load"] = run_loads(save["store_dir"], save["file"], root, args.load_reps)
        others["load"] = monitor.others
        with CpuMonitor() as monitor:
            results["dedup"] = run_dedup(state, save["store_dir"], args.reps)
        others["dedup"] = monitor.others
        results["save"] = save
        del state
        gc.collect()
        shutil.rmtree(save["store_dir"])
        save["file"].unlink()
        results["memory"] = {"fracstore": [], "save_file": []}
        with CpuMonitor() as monitor:
            for rep in range(args.memory_reps):
                for kind in ("fracstore", "save_file"):
                    sample = measure_memory(kind, args.size_mib, root / f"memory-{kind}-{rep}")
                    results["memory"][kind].append(sample)
                progress(
                    f"memory rep {rep + 1}/{args.memory_reps}: fracstore "
                    f"+{results['memory']['fracstore'][-1]['extra'] / MIB:.1f} MiB, save_file "
                    f"+{results['memory']['save_file'][-1]['extra'] / MIB:.1f} MiB"
                )
        others["memory"] = monitor.others
        results["other_processes_cpus"] = others
        results["seconds_total"] = time.perf_counter() - started
        rows = summarize(results)
        results["rows"] = rows
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown(results, rows), flush=True)
    progress(f"done in {results['seconds_total']:.0f} s")
    if args.json:
        text = json.dumps(_jsonable(results), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
