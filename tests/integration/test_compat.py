"""The seed's ModelPersistenceManager calls, written exactly as its users write them (SEED_API.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fracstore
from fracstore.compat import ModelPersistenceManager
from fracstore.model_types import unregister_model_type


class TinyPinn(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyOde(TinyPinn):
    pass


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ModelPersistenceManager]:
    fracstore.register_model_type("pinn")(TinyPinn)
    fracstore.register_model_type("neural_ode")(TinyOde)
    yield ModelPersistenceManager(tmp_path / "saved_models")
    unregister_model_type("pinn")
    unregister_model_type("neural_ode")


def _save(manager: ModelPersistenceManager, cls: type, model_type: str, seed: int, **kwargs: object) -> str:
    torch.manual_seed(seed)
    return manager.save_model(cls(width=8), model_type, config={"width": 8}, **kwargs)  # type: ignore[arg-type]


def test_the_seed_flow(manager: ModelPersistenceManager) -> None:
    first = _save(
        manager,
        TinyPinn,
        "pinn",
        1,
        best_val_loss=0.3,
        final_loss=0.2,
        training_duration=12.0,
        tags=["demo", "fractional"],
        description="PINN model for fractional time series analysis",
        training_history={"loss": [1.0, 0.5, 0.2]},
    )
    second = _save(manager, TinyPinn, "pinn", 2, best_val_loss=0.1, training_duration=30.0, tags=["demo"])
    ode = _save(manager, TinyOde, "neural_ode", 3, best_val_loss=0.05, training_duration=5.0)

    models_df = manager.list_models()
    assert len(models_df) == 3
    ids = list(models_df["model_id"].values)
    assert ids == [first, second, ode]
    assert set(ids) == {"pinn@1", "pinn@2", "neural_ode@1"}
    assert {"model_id", "model_type", "created_at", "best_val_loss"} <= set(models_df.columns)
    assert len(manager.list_models().head(2)) == 2
    assert list(manager.list_models(model_type="pinn")["model_id"].values) == [first, second]
    assert list(manager.list_models(tags=["fractional"])["model_id"].values) == [first]

    assert manager.get_best_model("pinn", metric="best_val_loss") == second
    assert manager.get_best_model(metric="training_duration") == ode
    assert manager.get_best_model("pino") is None

    model, config, metadata = manager.load_model(first)
    assert isinstance(model, TinyPinn) and config == {"width": 8}
    model.eval()
    torch.manual_seed(1)
    reference = TinyPinn(width=8)
    x = torch.linspace(0, 1, 5).reshape(-1, 1)
    assert torch.equal(model(x), reference(x))
    assert metadata["description"] == "PINN model for fractional time series analysis"
    model_cpu, _, _ = manager.load_model(first, device="cpu")
    assert next(model_cpu.parameters()).device.type == "cpu"

    info = manager.get_model_info(first)
    assert info["metadata"]["description"].startswith("PINN model")
    assert info["metadata"]["training_duration"] == 12.0
    assert info["metadata"]["final_loss"] == 0.2
    assert info["metadata"]["best_val_loss"] == 0.3
    assert info["metadata"]["created_at"].endswith("Z")
    assert manager.get_training_history(first) == {"loss": [1.0, 0.5, 0.2]}

    assert manager.delete_model(first) is True
    assert manager.delete_model(first) is False
    assert first not in list(manager.list_models()["model_id"].values)


def test_ids_returned_by_list_are_accepted_everywhere(manager: ModelPersistenceManager) -> None:
    _save(manager, TinyPinn, "pinn", 1, best_val_loss=0.3)
    for model_id in manager.list_models()["model_id"].values:
        manager.load_model(model_id)
        manager.get_model_info(model_id)
        assert manager.compare_models([model_id])[0]["model_id"] == model_id
    assert manager.delete_model("pinn@1")


def test_loading_an_unregistered_type_explains_how_to_register(manager: ModelPersistenceManager) -> None:
    model_id = manager.save_model(torch.nn.Linear(2, 2), "linear_unregistered")
    with pytest.raises(fracstore.NotFoundError, match="register_model_type"):
        manager.load_model(model_id)


def test_list_models_is_a_pandas_dataframe_when_pandas_is_installed(manager: ModelPersistenceManager) -> None:
    import pandas

    first = _save(manager, TinyPinn, "pinn", 1, best_val_loss=0.3, tags=["demo"])
    second = _save(manager, TinyPinn, "pinn", 2, best_val_loss=0.1)
    models_df = manager.list_models()
    assert isinstance(models_df, pandas.DataFrame)
    assert list(models_df["model_id"].values) == [first, second]
    assert list(models_df.head(1)["model_id"]) == [first]
    assert models_df.loc[models_df["model_id"] == second, "best_val_loss"].item() == 0.1
    assert list(manager.list_models(tags=["demo"])["model_id"]) == [first]
    assert manager.list_models(model_type="pino").empty


def test_record_table_to_pandas(manager: ModelPersistenceManager) -> None:
    _save(manager, TinyPinn, "pinn", 1, best_val_loss=0.3)
    frame = manager.store.list().to_pandas()
    assert list(frame["ref"]) == ["pinn@1"]
    assert {"name", "version", "digest", "model_type", "created_at"} <= set(frame.columns)
