"""The four model-family examples run as a user would run them: a fresh process, a fresh store, output checked,
and the store then holds what the example says it saved."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fracstore import Store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# script, model type, live versions afterwards, the largest acceptable error on new inputs
FAMILIES = [
    ("fractional_pinn.py", "fractional-pinn", 2, 0.02),
    ("fractional_pino.py", "pino", 1, 0.05),
    ("neural_fode.py", "neural-fode", 2, 0.02),
    ("neural_fsde.py", "neural-fsde", 2, 0.03),
]


def _run(script: str, tmp_path: Path, *, argv: list[str], env: dict[str, str] | None = None) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "FRACSTORE_EXAMPLES_STORE"}
    environment.update({"FRACSTORE_CACHE_DIR": str(tmp_path / "cache"), **(env or {})})
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("script", "model_type", "versions", "tolerance"), FAMILIES)
def test_family_example_trains_saves_finds_and_applies(
    tmp_path: Path, script: str, model_type: str, versions: int, tolerance: float
) -> None:
    store_path = tmp_path / "store"
    out = _run(script, tmp_path, argv=[str(store_path)])
    best = re.search(r"best by val_loss: (\S+)", out)
    error = re.search(r"max error on new inputs: (\S+)", out)
    assert best is not None and error is not None, out
    assert float(error.group(1)) < tolerance, out

    store = Store.open(store_path, create=False)
    records = store.list(model_type=model_type)
    assert len(records) == versions, [r.ref for r in records]
    assert best.group(1) in [r.ref for r in records]
    best_record = store.best("val_loss", model_type=model_type)
    assert best_record is not None and best_record.ref == best.group(1)
    for record in records:
        assert record.description and "example" in record.labels
        assert record.training.duration_s is not None and record.training.duration_s > 0
        history = store.history(record.ref)
        assert history is not None and len(history["loss"]) == len(history["val_loss"]) > 0
    if model_type == "pino":  # checkpointed with keep_last=1: older checkpoints were deleted, the best is tagged
        assert "deleted pino@1, pino@2" in out
        assert store.resolve("pino:best").ref == best.group(1)
    if model_type == "neural-fsde":  # saved with its optimizer state
        assert {"optimizer/state.safetensors", "optimizer/structure.json"} <= {
            f.path for f in store.info(best.group(1)).manifest.files
        }


def test_family_example_takes_its_store_from_the_environment(tmp_path: Path) -> None:
    store_path = tmp_path / "from-env"
    out = _run("fractional_pinn.py", tmp_path, argv=[], env={"FRACSTORE_EXAMPLES_STORE": str(store_path)})
    assert f"store: {store_path}" in out
    assert len(Store.open(store_path, create=False).list(model_type="fractional-pinn")) == 2
