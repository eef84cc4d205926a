"""The demo end to end: trains, saves versions into the default store, finds the best, applies it, ships a bundle."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fracstore import Store
from fracstore.config import default_store_url
from fracstore.demo import DemoReport, Problem, run_demo, train_pinn
from fracstore.demo.run import MODEL_NAME, VERSIONS


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # What `fracstore demo` does for its tiny tensors (see run_demo's docstring); restored for the other tests.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_report(report: DemoReport, *, store_url: str, first_version: int) -> None:
    assert report.store_url == store_url
    assert [v.ref for v in report.saved] == [f"{MODEL_NAME}@{first_version + i}" for i in range(len(VERSIONS))]
    assert [(v.width, v.steps) for v in report.saved] == list(VERSIONS)
    # The widest run reaches the L1 discretisation floor (about 2.1e-3 on 400 steps); none is far off.
    assert 1e-3 < report.scheme_error < 3e-3
    assert all(v.val_error < 0.05 and v.duration_s > 0 for v in report.saved)
    assert min(v.val_error for v in report.saved) < 2 * report.scheme_error
    assert report.best_val_error <= min(v.val_error for v in report.saved)
    assert report.test_error < 0.01
    assert len(report.samples) == 5
    assert all(abs(s.predicted - s.exact) <= report.test_error + 1e-12 for s in report.samples)
    assert report.duration_s < 60


def test_demo_runs_twice_on_the_default_store(tmp_path: Path) -> None:
    lines: list[str] = []
    first = run_demo(workdir=tmp_path / "work", say=lines.append)
    _check_report(first, store_url=default_store_url(), first_version=1)
    assert any(line.startswith("best by val_error") for line in lines)

    store = Store.open(default_store_url())
    assert [r.ref for r in store.list(MODEL_NAME)] == [v.ref for v in first.saved]
    best = store.resolve(f"{MODEL_NAME}:best")
    assert best.ref == first.best_ref
    info = store.info(first.saved[0].ref)
    assert info.manifest.description and info.manifest.training.duration_s
    assert set(info.manifest.labels) == {"demo", "fractional", "pinn"}
    history = store.history(first.saved[0].ref)
    assert len(history["loss"]) == first.saved[0].steps
    assert math.isclose(history["loss"][-1], first.saved[0].final_loss)

    # The bundle step: by default the second store lies in the workdir, next to the bundle.
    assert first.bundle_path.is_file() and first.bundle_path.stat().st_size == first.bundle_bytes
    assert first.bundle_path.parent == tmp_path / "work"
    assert first.second_store_url == str(tmp_path / "work" / "second-store")
    assert first.imported_refs == first.published_refs == (f"{MODEL_NAME}@1",)
    assert first.imported_difference == 0.0
    copy = Store.open(first.second_store_url).resolve(first.imported_refs[0])
    assert copy.digest == best.digest  # the same manifest: same weights, config, metrics and history
    assert copy.tags == ("best",)  # the bundle carries the registry tag

    elsewhere = str(tmp_path / "elsewhere")
    second = run_demo(workdir=tmp_path / "work", second_store_url=elsewhere, say=lines.append)
    _check_report(second, store_url=default_store_url(), first_version=len(VERSIONS) + 1)
    assert len(second.listed) == 2 * len(VERSIONS)
    assert store.resolve(f"{MODEL_NAME}:best").ref == second.best_ref  # training is seeded: ties go to the newest
    assert second.bundle_path != first.bundle_path  # the second run does not overwrite the first bundle
    assert second.second_store_url == elsewhere and second.imported_refs == (f"{MODEL_NAME}@1",)


def test_the_second_store_must_be_another_store(tmp_path: Path) -> None:
    from fracstore.errors import ConfigError

    with pytest.raises(ConfigError, match="itself"):
        run_demo(store_url=str(tmp_path / "s"), second_store_url=str(tmp_path / "s"), workdir=tmp_path)
    assert len(Store.open(tmp_path / "s").list()) == 0  # refused before anything was trained or saved


def test_training_is_reproducible_and_saved_config_rebuilds_the_model() -> None:
    problem = Problem(grid=50)
    a = train_pinn(problem, width=4, steps=20)
    b = train_pinn(problem, width=4, steps=20)
    assert a.history["loss"] == b.history["loss"]
    assert a.training.steps == 20 and len(a.history["val_error"]) == 1
    rebuilt = type(a.model).from_config(a.config)
    rebuilt.load_state_dict(a.model.state_dict())
    t = torch.linspace(0, 1, 7)
    assert torch.equal(rebuilt(t), a.model(t))
    with torch.no_grad():
        assert float(a.model(torch.zeros(1))[0]) == 1.0  # the initial condition holds exactly
