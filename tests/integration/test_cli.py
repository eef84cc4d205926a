"""The ``fracstore`` command line, end to end.

Every verb runs at least once as a real subprocess (``python -m fracstore ...``) against a temporary store, with the
cache and XDG folders pointed at temporary folders; those runs are independent of each other, so they are started
together once per module (importing torch makes each take a second or more) and each test checks its own result.
The finer cases (every option, every error path) call :func:`fracstore.cli.main` in-process, which is the same code
without the interpreter start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from fracstore import Digest, Store
from fracstore.cli import (
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    build_parser,
    commands,
    exit_code_for,
    main,
)
from fracstore.cli.render import format_age, format_size, parse_duration, parse_size, table
from fracstore.errors import AmbiguousRefError, ConflictError, FormatError, IntegrityError, NotFoundError
from fracstore.remotes import Remote, add_remote

ROOT = Path(__file__).resolve().parents[2]
BIG = 300_000  # float32 elements: 1.2 MB, over the 1 MiB pack threshold, so "w" gets a blob of its own
APIS = commands.available_apis()


def _needs(api: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not APIS[api], reason=f"the library API behind `fracstore {api}` is not installed")


def _weights(seed: int, *, bias: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(BIG, generator=g), "b": torch.full((4,), bias)}


# -- the seeded store and the subprocess runs ---------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    root: Path
    store: Path
    inputs: Path
    shared_blob: Digest  # the blob of "w", shared by pinn@1 and pinn@2


@dataclass(frozen=True)
class Run:
    argv: tuple[str, ...]
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return f"fracstore {' '.join(self.argv)} -> {self.rc}\nstdout: {self.out}\nstderr: {self.err}"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    root = tmp_path_factory.mktemp("cli")
    store_path = root / "store"
    store = Store.open(store_path, cache_dir=root / "seed-cache")
    store.save(_weights(0), name="pinn", model_type="pinn", metrics={"val_loss": 0.5}, tags=["base"], config={"w": 4})
    store.save(
        _weights(0, bias=1.0),
        name="pinn",
        model_type="pinn",
        metrics={"val_loss": 0.2},
        parent="pinn@1",
        history={"loss": [1.0, 0.5, 0.2]},
        training={"epochs": 3, "duration_s": 12.5},
    )
    store.save({"x": torch.ones(3)}, name="other", model_type="mlp", metrics={"accuracy": 0.9})
    store.tag("pinn@1", "prod")
    shared = next(t.blob for t in store.info("pinn@2").manifest.tensors if t.name == "w")
    inputs = root / "inputs"
    inputs.mkdir()
    save_file(_weights(1), str(inputs / "m.safetensors"))
    torch.save({"model_state_dict": _weights(2), "epoch": 9}, inputs / "old.pt")
    hf = inputs / "hf"
    hf.mkdir()
    save_file(_weights(3), str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text('{"hidden": 16}')
    (hf / "tokenizer.json").write_text('{"vocab": {}}')
    return Seeded(root, store_path, inputs, shared)


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRACSTORE_")}
    env.update(
        FRACSTORE_CACHE_DIR=str(root / "cache"),
        XDG_CACHE_HOME=str(root / "xdg-cache"),
        XDG_CONFIG_HOME=str(root / "xdg-config"),
        XDG_DATA_HOME=str(root / "xdg-data"),
        # The runs go in parallel on few cores; one thread each keeps them from oversubscribing (tensors are tiny).
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def _run(argv: Sequence[str], *, cwd: Path, env: dict[str, str]) -> Run:
    done = subprocess.run(
        [sys.executable, "-m", "fracstore", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return Run(tuple(argv), done.returncode, done.stdout, done.stderr)


def _corrupt(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)  # blob files are read-only
    with open(path, "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def runs(seeded: Seeded) -> dict[str, list[Run]]:
    """Every subprocess run, started together; each job is a list of commands that run in order."""
    root, s = seeded.root, str(seeded.store)
    out = root / "out"
    out.mkdir()
    for copy in ("tagged", "corrupt", "transfer"):
        shutil.copytree(seeded.store, root / copy)
    _corrupt(root / "corrupt" / "blobs" / "sha256" / seeded.shared_blob.hex[:2] / seeded.shared_blob.hex)
    pt = str(seeded.inputs / "old.pt")
    # One process per verb (each pays for importing torch); the finer checks run in-process below.
    jobs: dict[str, list[list[str]]] = {
        "init": [["--store", str(root / "fresh"), "init", "--json"]],
        "save": [["save", pt, "--name", "legacy", "--metric", "val_loss=0.3", "--store", str(root / "new"), "--json"]],
        "ls": [["--store", s, "ls", "--json"]],
        "show": [["--store", s, "show", "nosuch@1"]],
        "log": [["--store", str(root / "no" / "such"), "log"]],
        "best": [["--store", "main", "best", "--metric", "val_loss", "--json"]],  # a remote name as the store
        "compare": [["--store", s, "compare", "pinn@1", "a@b@c"]],
        "diff": [["--store", s, "diff", "pinn@1", "pinn@2", "--json"]],
        "tag": [
            ["--store", str(root / "tagged"), "tag", "pinn@2", "prod", "--json"],
            ["--store", str(root / "tagged"), "untag", "pinn", "prod"],
            ["--store", str(root / "tagged"), "rm", "pinn@1", "--json"],
        ],
        "get": [["--store", str(root / "corrupt"), "get", "pinn@2", str(out / "bad.safetensors")]],
        "remote": [["remote", "ls", "--json"]],
    }
    if APIS["cache"]:
        jobs["cache"] = [["cache", "ls", "--json"]]
    if APIS["export"] and APIS["import"]:
        bundle = str(out / "b.zip")
        jobs["bundle"] = [
            ["--store", s, "export", "pinn", "other", "-o", bundle, "--json"],
            ["--store", str(root / "imported"), "import", bundle, "--json"],
        ]
    if APIS["push"] and APIS["pull"]:
        jobs["transfer"] = [
            ["--store", str(root / "transfer"), "push", str(root / "pushed"), "pinn", "--all", "--tags", "--json"],
            ["--store", str(root / "pulled"), "pull", str(root / "transfer"), "pinn:prod", "--json"],
        ]
    if APIS["verify"]:
        jobs["verify"] = [["--store", str(root / "corrupt"), "verify", "--read-data", "--json"]]
    if APIS["gc"]:
        jobs["gc"] = [["--store", str(root / "tagged"), "gc", "--dry-run", "--grace", "0", "--json"]]
    if APIS["demo"]:
        jobs["demo"] = [["--store", str(root / "demo-store"), "demo", "--workdir", str(root / "demo")]]
    env = _env(root)
    # `remote add` itself runs in-process (test_remote_errors_and_precedence); here the file it writes is read back
    # by `remote ls` and used by `--store main` in another process.
    add_remote(
        Remote("main", s, {"secret_token": "hunter2", "anon": True}),
        path=root / "xdg-config" / "fracstore" / "remotes.json",
    )

    def job(commands_: list[list[str]]) -> list[Run]:
        return [_run(argv, cwd=root, env=env) for argv in commands_]

    # Chains that read the seeded store run beside chains that write their own copies; none shares a store it writes.
    order = sorted(jobs, key=lambda k: -len(jobs[k]))
    with ThreadPoolExecutor(max_workers=max(2, len(os.sched_getaffinity(0)))) as pool:
        results = dict(zip(order, pool.map(job, [jobs[k] for k in order]), strict=True))
    return results


def _ok(run: Run) -> Run:
    assert run.rc == 0, str(run)
    assert "Traceback" not in run.err, str(run)
    return run


# -- subprocess checks, one or more per verb ----------------------------------------------------------------


def test_init_creates_a_store(runs: dict[str, list[Run]], seeded: Seeded) -> None:
    data = _ok(runs["init"][0]).json()
    assert data["created"] is True and data["url"].endswith("fresh") and len(data["id"]) == 36
    assert (seeded.root / "fresh" / "fracstore.msgpack").is_file()


def test_save_legacy_pt_warns_and_creates_the_store(runs: dict[str, list[Run]]) -> None:
    run = _ok(runs["save"][0])
    data = run.json()
    assert data["ref"] == "legacy@1" and data["source_format"] == "legacy-pt"
    assert data["bytes_written"] > BIG * 4 and data["digest"].startswith("sha256:")
    assert "warning" in run.err and "weights_only=True" in run.err and "migration" in run.err


def test_ls_json(runs: dict[str, list[Run]]) -> None:
    rows = _ok(runs["ls"][0]).json()
    assert [r["ref"] for r in rows] == ["pinn@1", "pinn@2", "other@1"]
    first = rows[0]
    assert set(first) == {
        "ref", "name", "version", "digest", "model_type", "created_at", "published_at", "description", "tags",
        "aliases", "metrics", "training", "parent", "size", "tensor_count",
    }  # fmt: skip
    assert first["aliases"] == ["prod"] and first["tags"] == ["base"] and first["metrics"] == {"val_loss": 0.5}
    assert rows[1]["parent"] == first["digest"] and rows[1]["training"] == {"epochs": 3, "duration_s": 12.5}


def test_show_a_bad_ref(runs: dict[str, list[Run]]) -> None:
    missing = runs["show"][0]
    assert missing.rc == EXIT_NOT_FOUND and missing.out == ""
    assert "no model named 'nosuch" in missing.err and "Traceback" not in missing.err


def test_log_of_a_missing_store_is_not_found_and_creates_nothing(runs: dict[str, list[Run]], seeded: Seeded) -> None:
    run = runs["log"][0]
    assert run.rc == EXIT_NOT_FOUND and "no fracstore store" in run.err and "init" in run.err
    assert not (seeded.root / "no").exists()


def test_best_json(runs: dict[str, list[Run]]) -> None:
    data = _ok(runs["best"][0]).json()
    assert data["ref"] == "pinn@2" and data["best"] == {"metric": "val_loss", "mode": "min", "value": 0.2}


def test_compare_with_a_malformed_ref_is_a_usage_error(runs: dict[str, list[Run]]) -> None:
    run = runs["compare"][0]
    assert run.rc == EXIT_USAGE and run.out == "" and "A ref is NAME" in run.err and "usage:" in run.err


def test_diff_json(runs: dict[str, list[Run]]) -> None:
    data = _ok(runs["diff"][0]).json()
    assert data["changed"] == ["b"] and data["unchanged"] == ["w"] and data["added"] == data["removed"] == []
    assert data["bytes_shared"] >= BIG * 4 and data["metrics"] == {"val_loss": [0.5, 0.2]}


def test_tag_untag_rm(runs: dict[str, list[Run]], seeded: Seeded) -> None:
    tagged, untagged, removed = (_ok(r) for r in runs["tag"])
    assert tagged.json()["ref"] == "pinn@2" and tagged.json()["aliases"] == ["prod"]
    assert "removed tag pinn:prod" in untagged.err
    assert removed.json() == {"deleted": ["pinn@1"]}
    store = Store.open(seeded.root / "tagged", create=False, cache_dir=seeded.root / "check-cache")
    assert [(r.ref, r.tags) for r in store.list()] == [("pinn@2", ()), ("other@1", ())]


def test_corrupt_blob_exits_3_naming_the_digest(runs: dict[str, list[Run]], seeded: Seeded) -> None:
    run = runs["get"][0]
    assert run.rc == EXIT_INTEGRITY, str(run)
    assert str(seeded.shared_blob) in run.err and "corrupt" in run.err and "Traceback" not in run.err
    assert not (seeded.root / "out" / "bad.safetensors").exists()


def test_remote_ls_hides_secrets(runs: dict[str, list[Run]], seeded: Seeded) -> None:
    listed = _ok(runs["remote"][0])
    assert listed.json() == [
        {"name": "main", "url": str(seeded.store), "storage_options": {"secret_token": "***", "anon": True}}
    ]
    assert "hunter2" not in listed.out + listed.err


@_needs("cache")
def test_cache_ls(runs: dict[str, list[Run]], seeded: Seeded) -> None:
    data = _ok(runs["cache"][0]).json()
    assert data["cache_dir"] == str(seeded.root / "cache") and isinstance(data["entries"], list)


@_needs("export")
@_needs("import")
def test_export_then_import(runs: dict[str, list[Run]]) -> None:
    exported, imported = (_ok(r) for r in runs["bundle"])
    assert {m["ref"] for m in exported.json()["models"]} == {"pinn@2", "other@1"}
    data = imported.json()
    assert {m["ref"] for m in data["models"]} == {"pinn@1", "other@1"} and len(data["published"]) == 2


@_needs("push")
@_needs("pull")
def test_push_then_pull(runs: dict[str, list[Run]]) -> None:
    pushed, pulled = (_ok(r) for r in runs["transfer"])
    data = pushed.json()
    assert [(v["name"], v["destination_version"]) for v in data["versions"]] == [("pinn", 1), ("pinn", 2)]
    assert data["bytes_sent"] <= data["bytes_total"] and data["blobs_sent"] >= 1
    assert [v["source_version"] for v in pulled.json()["versions"]] == [1]


@_needs("verify")
def test_verify(runs: dict[str, list[Run]], seeded: Seeded, cli: Callable[..., Run]) -> None:
    corrupt = runs["verify"][0]
    assert corrupt.rc == EXIT_INTEGRITY and seeded.shared_blob.hex in corrupt.out
    assert corrupt.json()["problems"]
    clean = cli("--store", str(seeded.store), "verify", "--json")
    assert clean.rc == 0 and clean.json()["problems"] == []


@_needs("gc")
def test_gc_dry_run(runs: dict[str, list[Run]]) -> None:
    assert isinstance(_ok(runs["gc"][0]).json(), dict)


@_needs("demo")
def test_demo(runs: dict[str, list[Run]], seeded: Seeded) -> None:
    run = _ok(runs["demo"][0])
    assert "best:" in run.out and "imported:" in run.out and "training" in run.err
    store = Store.open(seeded.root / "demo-store", create=False, cache_dir=seeded.root / "check-cache")
    assert len(store.list("fracstore-demo-pinn")) >= 1
    # What the demo printed, checked: three versions saved, the best named, the loaded model's error on new inputs
    # under a stated bound, and a bundle that round-trips into the second store unchanged.
    saved = re.findall(r"^fracstore-demo-pinn@(\d+)\s", run.out, flags=re.MULTILINE)
    assert len(saved) == 3
    best = re.search(r"^best:\s+(fracstore-demo-pinn@\d+) \(val_error ([0-9.e+-]+)", run.out, flags=re.MULTILINE)
    assert best is not None and best.group(1) in {f"fracstore-demo-pinn@{v}" for v in saved}
    assert store.resolve("fracstore-demo-pinn:best").ref == best.group(1)
    applied = re.search(r"^applied to:\s+1000 new inputs, max error ([0-9.e+-]+)", run.out, flags=re.MULTILINE)
    assert applied is not None and float(applied.group(1)) < 0.05
    bundle = re.search(r"^bundle:\s+(\S+\.zip) ", run.out, flags=re.MULTILINE)
    assert bundle is not None and Path(bundle.group(1)).is_file()
    imported = re.search(r"^imported:\s+.*\(max prediction difference ([0-9.e+-]+)\)", run.out, flags=re.MULTILINE)
    assert imported is not None and float(imported.group(1)) == 0.0


# -- in-process: options and error paths --------------------------------------------------------------------


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    def call(*argv: str) -> Run:
        capsys.readouterr()
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return Run(tuple(argv), rc, out, err)

    return call


@pytest.fixture
def work(seeded: Seeded, tmp_path: Path) -> Path:
    """A writable copy of the seeded store."""
    shutil.copytree(seeded.store, tmp_path / "store")
    return tmp_path / "store"


def test_init_twice_reports_the_existing_store(cli: Callable[..., Run], tmp_path: Path) -> None:
    first = cli("--store", str(tmp_path / "s"), "init", "--json").json()
    second = cli("--store", str(tmp_path / "s"), "init", "--json").json()
    assert first["created"] is True and second["created"] is False and first["id"] == second["id"]
    human = cli("init", "--store", str(tmp_path / "s"))  # global options after the verb too
    assert human.rc == 0 and human.out.split()[1] == first["id"] and "already a store" in human.err
    assert cli("-q", "init", "--store", str(tmp_path / "s")).err == ""


@pytest.mark.skipif(not commands.supports_offline(), reason="Store.open takes no offline= in this installation")
def test_offline_reads_a_local_store(cli: Callable[..., Run], seeded: Seeded) -> None:
    run = cli("--offline", "--store", str(seeded.store), "best", "--metric", "val_loss", "--json")
    assert run.rc == 0 and run.json()["ref"] == "pinn@2"


def test_default_store_comes_from_the_environment(
    cli: Callable[..., Run], seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRACSTORE_STORE", str(seeded.store))
    assert [r["ref"] for r in cli("ls", "--json").json()] == ["pinn@1", "pinn@2", "other@1"]


def test_save_options_and_hf_round_trip(cli: Callable[..., Run], seeded: Seeded, tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    config = tmp_path / "config.json"
    config.write_text('{"depth": 2}')
    history = tmp_path / "history.json"
    history.write_text('{"loss": [3, 2, 1]}')
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    saved = cli(
        "--store", store, "save", str(seeded.inputs / "m.safetensors"), "--name", "m", "--type", "mlp",
        "--config-file", str(config), "--metric", "val_loss=0.25", "--metric", "r2=0.9", "--tag", "a", "--tag", "b",
        "--description", "first try", "--file", f"notes.txt={notes}", "--history", str(history),
        "--training", '{"epochs": 3, "converged": true}', "--json",
    )  # fmt: skip
    assert saved.rc == 0, saved
    shown = cli("--store", store, "show", "m", "--json", "--history").json()
    assert shown["model_type"] == "mlp" and shown["config"] == {"depth": 2} and shown["tags"] == ["a", "b"]
    assert shown["metrics"] == {"val_loss": 0.25, "r2": 0.9} and shown["description"] == "first try"
    assert shown["history"] == {"loss": [3, 2, 1]} and shown["training"] == {"epochs": 3, "converged": True}
    assert [f["path"] for f in shown["files"]] == ["notes.txt"]
    child = cli("--store", store, "save", str(seeded.inputs / "hf"), "--name", "m", "--parent", "m@1", "--json")
    assert child.json()["ref"] == "m@2"
    hf = cli("--store", store, "show", "m@2", "--json").json()
    assert hf["config"] == {"hidden": 16} and hf["parent"] == saved.json()["digest"]
    assert [f["path"] for f in hf["files"]] == ["tokenizer.json"]
    # get as a sharded HF folder, then save that folder again: same weights, same config, same files
    out = tmp_path / "export"
    got = cli("--store", store, "get", "m@2", str(out), "--max-shard-size", "1MB", "--json").json()
    assert got["format"] == "hf" and {Path(p).name for p in got["files"]} >= {
        "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "tokenizer.json",
    }  # fmt: skip
    again = cli("--store", store, "save", str(out), "--name", "m", "--json").json()
    assert again["bytes_written"] < 4096  # every tensor blob deduplicated; only a new manifest
    assert cli("--store", store, "diff", "m@2", "m@3", "--json").json()["changed"] == []
    # the inline-JSON and @FILE forms of --config
    inline = cli("--store", store, "save", str(seeded.inputs / "m.safetensors"), "--name", "n", "--config", '{"k": 1}')
    assert inline.rc == 0 and cli("--store", store, "show", "n", "--json").json()["config"] == {"k": 1}
    at_file = cli(
        "--store", store, "save", str(seeded.inputs / "m.safetensors"), "--name", "n", "--config", f"@{config}"
    )
    assert at_file.rc == 0 and cli("--store", store, "show", "n@2", "--json").json()["config"] == {"depth": 2}


def test_save_errors(cli: Callable[..., Run], seeded: Seeded, tmp_path: Path) -> None:
    store = str(tmp_path / "s")
    m = str(seeded.inputs / "m.safetensors")
    assert cli("--store", store, "save", m).rc == EXIT_USAGE  # --name is required
    assert cli("--store", store, "save", m, "--name", "x", "--metric", "loss").rc == EXIT_USAGE
    assert cli("--store", store, "save", m, "--name", "x", "--config", "{bad").rc == EXIT_USAGE
    assert cli("--store", store, "save", m, "--name", "x", "--config", "[1]").rc == EXIT_USAGE
    both = cli("--store", store, "save", m, "--name", "x", "--config", "{}", "--config-file", m)
    assert both.rc == EXIT_USAGE and "not both" in both.err
    missing = cli("--store", store, "save", str(tmp_path / "nope.safetensors"), "--name", "x")
    assert missing.rc == EXIT_NOT_FOUND and "nope.safetensors" in missing.err
    bad_name = cli("--store", store, "save", m, "--name", "bad name")
    assert bad_name.rc == EXIT_ERROR and "invalid model name" in bad_name.err
    no_parent = cli("--store", store, "save", m, "--name", "x", "--parent", "ghost")
    assert no_parent.rc == EXIT_NOT_FOUND
    assert not (tmp_path / "s" / "log").exists() or not any((tmp_path / "s" / "log").iterdir())


def test_ls_filters(cli: Callable[..., Run], seeded: Seeded) -> None:
    s = str(seeded.store)

    def refs(*argv: str) -> list[str]:
        run = cli("--store", s, "ls", "--json", *argv)
        assert run.rc == 0, run
        return [r["ref"] for r in run.json()]

    assert refs("--name", "pinn") == ["pinn@1", "pinn@2"]
    assert refs("--type", "mlp") == ["other@1"]
    assert refs("--tag", "prod") == refs("--tag", "base") == ["pinn@1"]
    assert refs("--where", "val_loss<0.3") == ["pinn@2"]
    assert refs("--where", "val_loss>0", "--where", "val_loss>=0.5") == ["pinn@1"]
    assert refs("--latest") == ["pinn@2", "other@1"]
    assert refs("--sort", "val_loss", "--limit", "1") == ["pinn@2"]
    assert refs("--sort", "val_loss", "--mode", "max") == ["pinn@1", "pinn@2", "other@1"]
    assert refs("--name", "ghost") == []
    empty = cli("--store", s, "ls", "--name", "ghost")
    assert empty.rc == 0 and empty.out == "" and "no models match" in empty.err
    assert cli("--store", s, "ls", "--limit", "0").rc == EXIT_USAGE
    assert cli("--store", s, "ls", "--mode", "median").rc == EXIT_USAGE


def test_ls_table_is_aligned_and_sorted(cli: Callable[..., Run], seeded: Seeded) -> None:
    run = cli("--store", str(seeded.store), "ls", "--sort", "val_loss")
    lines = run.out.splitlines()
    assert lines[0].split() == ["REF", "TYPE", "SIZE", "CREATED", "TAGS", "VAL_LOSS", "ACCURACY", "DIGEST"]
    assert [line.split()[0] for line in lines[1:]] == ["pinn@2", "pinn@1", "other@1"]  # best val_loss first
    assert "1.1 MiB" in lines[1] and "ago" in lines[1] and ":prod base" in lines[2]
    column = lines[0].index("DIGEST")
    assert all(line[column : column + 7] == "sha256:" for line in lines[1:])
    assert cli("--store", str(seeded.store), "ls", "--where", "val_loss<<1").rc == EXIT_USAGE
    bad_ref = cli("--store", str(seeded.store), "show", "a@b@c")
    assert bad_ref.rc == EXIT_USAGE and "A ref is NAME" in bad_ref.err


def test_show_and_log_json(cli: Callable[..., Run], seeded: Seeded) -> None:
    data = cli("--store", str(seeded.store), "show", "pinn:prod", "--json").json()
    assert data["ref"] == "pinn@1" and data["config"] == {"w": 4} and data["environment"]["torch"]
    assert {t["name"] for t in data["tensors"]} == {"w", "b"} and data["has_history"] is False
    w = next(t for t in data["tensors"] if t["name"] == "w")
    assert w["blob"] == str(seeded.shared_blob) and w["shape"] == [BIG] and w["dtype"] == "F32"
    entries = cli("--store", str(seeded.store), "log", "--json").json()
    assert [(e["op"], e["name"], e["version"]) for e in entries] == [
        ("publish", "pinn", 1),
        ("publish", "pinn", 2),
        ("publish", "other", 1),
        ("tag", "pinn", 1),
    ]
    assert entries[3]["tag"] == "prod" and entries[0]["manifest"].startswith("sha256:")


def test_show_human(cli: Callable[..., Run], seeded: Seeded) -> None:
    run = cli("--store", str(seeded.store), "show", "pinn@2", "--tensors", "--history")
    assert run.rc == 0
    text = run.out
    for expected in ("ref ", "pinn@2", "metric val_loss", "0.2", "training epochs", "parent", "env torch", "TENSOR"):
        assert expected in text
    assert re.search(r"created +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(.* ago\)", text)
    assert '"loss": [' in text.replace("\n", "").replace("  ", "")
    digest_ref = cli("--store", str(seeded.store), "show", run.out.split("sha256:")[1][:10], "--json")
    assert digest_ref.json()["ref"] == "pinn@2"  # a bare digest prefix


def test_log_best_compare_diff_human(cli: Callable[..., Run], seeded: Seeded) -> None:
    s = str(seeded.store)
    log = cli("--store", s, "log", "pinn", "--limit", "2")
    assert log.rc == 0 and log.out.splitlines()[0].split()[:4] == ["SEQ", "TIME", "OP", "WHAT"]
    assert "pinn@2" in log.out and "pinn:prod -> pinn@1" in log.out and "other" not in log.out
    assert len(cli("--store", s, "log", "--json", "--limit", "1").json()) == 1
    best = cli("--store", s, "best", "--metric", "accuracy")
    assert best.rc == 0 and best.out.startswith("other@1  accuracy=0.9") and "highest wins" in best.err
    assert cli("--store", s, "best", "--metric", "val_loss", "--mode", "max", "--json").json()["ref"] == "pinn@1"
    assert cli("--store", s, "best", "--metric", "val_loss", "--name", "pinn", "--where", "val_loss>0.3").rc == 0
    none = cli("--store", s, "best", "--metric", "bleu")
    assert none.rc == EXIT_NOT_FOUND and "bleu" in none.err
    data = cli("--store", s, "compare", "pinn@1", "pinn@2", "other", "--json").json()
    assert data["models"] == ["pinn@1", "pinn@2", "other@1"]
    assert data["metrics"]["val_loss"] == [0.5, 0.2, None] and data["metrics"]["accuracy"] == [None, None, 0.9]
    assert data["best"]["val_loss"] == "pinn@2" and data["best"]["accuracy"] == "other@1"
    assert data["metrics"]["training_duration"] == [None, 12.5, None]
    compare = cli("--store", s, "compare", "pinn@1", "pinn:prod", "pinn@2")
    assert compare.rc == 0 and "0.2*" in compare.out and compare.out.splitlines()[0].split()[0] == "METRIC"
    diff = cli("--store", s, "diff", "pinn@1", "pinn@2")
    assert diff.rc == 0 and "1 changed" in diff.out and "~ b" in diff.out and "MiB shared" in diff.out
    assert cli("--store", s, "compare").rc == EXIT_USAGE
    assert cli("--store", s, "diff", "pinn@1").rc == EXIT_USAGE


def test_tag_untag_rm_in_detail(cli: Callable[..., Run], work: Path) -> None:
    s = str(work)
    assert cli("--store", s, "tag", "pinn", "stable").out == "pinn:stable -> pinn@2\n"
    conflict = cli("--store", s, "tag", "pinn@1", "stable", "--expect", "1")
    assert conflict.rc == EXIT_ERROR and "points at 2" in conflict.err
    assert cli("--store", s, "tag", "pinn@1", "stable", "--expect", "2").rc == 0
    assert cli("--store", s, "tag", "pinn@1", "fresh", "--expect", "none").rc == 0
    assert cli("--store", s, "tag", "pinn@1", "x", "--expect", "two").rc == EXIT_USAGE
    assert cli("--store", s, "tag", "pinn@9", "x").rc == EXIT_NOT_FOUND
    missing = cli("--store", s, "untag", "pinn", "nosuch")
    assert missing.rc == EXIT_NOT_FOUND and "no tag 'nosuch'" in missing.err
    assert cli("--store", s, "show", "pinn:stable", "--json").json()["ref"] == "pinn@1"
    assert cli("--store", s, "rm", "pinn", "--all").out == "pinn@1\npinn@2\n"
    gone = cli("--store", s, "show", "pinn")
    assert gone.rc == EXIT_NOT_FOUND and "deleted" in gone.err
    assert cli("--store", s, "rm", "pinn@1").rc == EXIT_NOT_FOUND


def test_get_in_detail(cli: Callable[..., Run], seeded: Seeded, tmp_path: Path) -> None:
    s = str(seeded.store)
    target = tmp_path / "w.safetensors"
    data = cli("--store", s, "get", "pinn:prod", str(target), "--json").json()
    assert data == {
        "ref": "pinn@1", "digest": data["digest"], "format": "safetensors", "files": [str(target)],
        "bytes": target.stat().st_size,
    }  # fmt: skip
    from fracstore.interop import read_weights

    back = read_weights(target)
    assert torch.equal(back.state_dict["w"], _weights(0)["w"]) and back.metadata["fracstore_ref"] == "pinn@1"
    target.unlink()
    assert cli("--store", s, "get", "pinn:prod", str(target)).out == f"{target}\n"
    exists = cli("--store", s, "get", "pinn:prod", str(target))
    assert exists.rc == EXIT_ERROR and "--force" in exists.err
    assert cli("--store", s, "get", "pinn:prod", str(target), "--force").rc == 0
    folder = tmp_path / "folder"
    assert cli("--store", s, "get", "other", str(folder), "--format", "hf").rc == 0
    assert json.loads((folder / "config.json").read_text()) == {}
    assert (folder / "model.safetensors").is_file()
    assert cli("--store", s, "get", "other", str(tmp_path / "f2.st"), "--format", "safetensors").rc == 0
    shard_on_file = cli("--store", s, "get", "other", str(tmp_path / "x.safetensors"), "--max-shard-size", "1MB")
    assert shard_on_file.rc == EXIT_USAGE
    assert cli("--store", s, "get", "other", str(tmp_path / "y"), "--max-shard-size", "lots").rc == EXIT_USAGE
    assert cli("--store", s, "get", "ghost", str(tmp_path / "z.safetensors")).rc == EXIT_NOT_FOUND


def test_remote_errors_and_precedence(
    cli: Callable[..., Run], seeded: Seeded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    assert cli("remote", "ls").err.startswith("no remotes")
    assert cli("remote", "add", "bad/name", "x").rc == EXIT_USAGE
    assert cli("remote", "add", "rel", "relative/store").rc == 0
    listed = cli("remote", "ls", "--json").json()
    assert listed[0]["url"] == str(tmp_path / "relative" / "store")  # stored absolute
    duplicate = cli("remote", "add", "rel", "elsewhere")
    assert duplicate.rc == EXIT_ERROR and "exists" in duplicate.err
    assert cli("remote", "add", "rel", str(seeded.store), "--replace").rc == 0
    assert cli("--store", "rel", "best", "--metric", "val_loss", "--json").json()["ref"] == "pinn@2"
    assert cli("remote", "add", "cloud", "s3://key:secret@bucket/models").rc == 0
    shown = cli("remote", "ls")
    assert "secret" not in shown.out and "s3://bucket/models" in shown.out
    assert cli("remote", "rm", "ghost").rc == EXIT_NOT_FOUND
    removed = cli("remote", "rm", "cloud")
    assert removed.rc == 0 and "removed remote cloud" in removed.err
    assert [r["name"] for r in cli("remote", "ls", "--json").json()] == ["rel"]
    (tmp_path / "config" / "fracstore" / "remotes.json").write_text("not json")
    broken = cli("remote", "ls")
    assert broken.rc == EXIT_ERROR and "remotes file" in broken.err


@_needs("cache")
def test_cache_prune(cli: Callable[..., Run], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    listed = cli("--cache-dir", str(cache), "cache", "ls")
    assert listed.rc == 0 and "0 cached blob(s)" in listed.err
    dry = cli("--cache-dir", str(cache), "cache", "prune", "--max-size", "10GiB", "--dry-run", "--json").json()
    assert dry == {"dry_run": True, "removed": [], "bytes_freed": 0, "bytes_kept": 0}
    real = cli("--cache-dir", str(cache), "cache", "prune", "--max-size", "0")
    assert real.rc == 0 and "freed 0 B" in real.err
    assert cli("cache", "prune").rc == EXIT_USAGE  # --max-size is required
    assert cli("cache", "prune", "--max-size", "huge").rc == EXIT_USAGE


def test_guarded_verbs_are_absent_without_their_api(
    cli: Callable[..., Run], monkeypatch: pytest.MonkeyPatch, seeded: Seeded
) -> None:
    groups = {path.split()[0] for path in _verbs(build_parser())}
    for verb, present in APIS.items():
        assert (verb in groups) == present, verb
    monkeypatch.setattr(commands, "available_apis", lambda: dict.fromkeys(APIS, False))
    assert not {"push", "pull", "export", "import", "verify", "gc", "cache", "demo"} & set(_verbs(build_parser()))
    assert cli("--store", str(seeded.store), "verify").rc == EXIT_USAGE


def test_errors_map_to_exit_codes_and_debug_shows_tracebacks(
    cli: Callable[..., Run], seeded: Seeded, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert exit_code_for(IntegrityError("x")) == EXIT_INTEGRITY
    assert exit_code_for(NotFoundError("x")) == EXIT_NOT_FOUND
    assert exit_code_for(AmbiguousRefError("ab", ["a", "b"])) == EXIT_ERROR
    assert exit_code_for(ConflictError("x")) == exit_code_for(FormatError("x")) == EXIT_ERROR
    assert exit_code_for(commands.UsageError("x")) == EXIT_USAGE
    assert exit_code_for(OSError("x")) == EXIT_ERROR
    quiet = cli("--store", str(tmp_path / "none"), "ls")
    assert quiet.rc == EXIT_NOT_FOUND and "Traceback" not in quiet.err
    monkeypatch.setenv("FRACSTORE_DEBUG", "1")
    loud = cli("--store", str(tmp_path / "none"), "ls")
    assert loud.rc == EXIT_NOT_FOUND and "Traceback" in loud.err
    assert not (tmp_path / "none").exists()
    monkeypatch.delenv("FRACSTORE_DEBUG")

    def boom(ctx: commands.Context, args: argparse.Namespace) -> int:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(commands, "cmd_log", boom)
    crashed = cli("--store", str(seeded.store), "log")
    assert crashed.rc == EXIT_ERROR and "internal error: RuntimeError: unexpected" in crashed.err
    assert cli("--version").rc == 0 and cli("--help").rc == 0


def test_render_helpers() -> None:
    assert [format_size(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
    assert parse_size("10GiB") == 10 << 30 and parse_size("500MB") == 500_000_000 and parse_size("4096") == 4096
    assert parse_size("1.5 MiB") == 3 << 19
    for bad in ("", "ten", "5 parsecs", "-1"):
        with pytest.raises(FormatError):
            parse_size(bad)
    assert parse_duration("7d") == timedelta(days=7) and parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("0") == timedelta(0) and parse_duration("90s") == timedelta(seconds=90)
    for bad in ("7", "1 fortnight", "d"):
        with pytest.raises(FormatError):
            parse_duration(bad)
    now = datetime(2024, 1, 2, tzinfo=UTC)
    ages = [format_age(now - timedelta(seconds=s), now=now) for s in (0, 42, 300, 7300, 3 * 86400, 800 * 86400)]
    assert ages == ["just now", "42 s ago", "5 min ago", "2 h ago", "3 d ago", "2.2 y ago"]
    assert table(["A", "NUM"], [["xx", "1"], ["y", "100"]], right=[False, True]) == "A   NUM\nxx    1\ny   100"


# -- the reference page and the packaging ---------------------------------------------------------------------


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every verb path ("ls", "cache prune") -> its parser; groups such as "cache" are not verbs themselves."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix}{name}"
                nested = _verbs(sub, f"{path} ")
                found.update(nested or {path: sub})
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    every = {opt for action in parser._actions for opt in action.option_strings}
    return every - {"-h", "--help"} - _options_of_group(parser, "global options")


def _doc_sections(text: str) -> dict[str, str]:
    """``### `fracstore cache prune --max-size SIZE``` -> {"cache prune": the section's text}."""
    sections = {}
    for match in re.finditer(r"^### `fracstore ([^`]*)`\n(.*?)(?=^#{2,3} |\Z)", text, re.M | re.S):
        words = []
        for word in match.group(1).split():
            if not re.fullmatch(r"[a-z]+", word):
                break
            words.append(word)
        sections[" ".join(words)] = match.group(2)
    return sections


def test_docs_describe_every_verb_and_option() -> None:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = _doc_sections(text)
    parser = build_parser()
    verbs = _verbs(parser)
    assert set(verbs) <= set(sections), f"undocumented verbs: {set(verbs) - set(sections)}"
    documented_guarded = {"push", "pull", "export", "import", "verify", "gc", "cache ls", "cache prune", "demo"}
    assert set(sections) <= set(verbs) | documented_guarded, f"documented but unknown: {set(sections) - set(verbs)}"
    for verb, sub in verbs.items():
        missing = sorted(opt for opt in _options(sub) if f"`{opt}" not in sections[verb])
        assert not missing, f"docs/cli.md, fracstore {verb}: options not described: {missing}"
    global_section = text.split("## Global options", 1)[1].split("\n## ", 1)[0]
    for opt in _options_of_group(parser, "global options") | {"--version"}:
        assert f"`{opt}" in global_section, opt
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |"):
        assert code in text


def _options_of_group(parser: argparse.ArgumentParser, title: str) -> set[str]:
    return {
        opt
        for group in parser._action_groups
        if group.title == title
        for action in group._group_actions
        for opt in action.option_strings
    }


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["fracstore"].partition(":")
    assert (module, attr) == ("fracstore.cli", "main")


@pytest.fixture(autouse=True)
def _no_store_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process runs must not pick up a developer's FRACSTORE_STORE or FRACSTORE_DEBUG."""
    monkeypatch.delenv("FRACSTORE_STORE", raising=False)
    monkeypatch.delenv("FRACSTORE_DEBUG", raising=False)
    yield
