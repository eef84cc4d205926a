"""The training-loop Checkpointer against a real local store: schedule, best tag, retention, history, optimizer."""

from __future__ import annotations

import json

import pytest
import torch

from fracstore import Store
from fracstore.errors import ConfigError, FormatError, NotFoundError
from fracstore.training import (
    OPTIMIZER_STRUCTURE,
    OPTIMIZER_TENSORS,
    Checkpointer,
    optimizer_state_files,
    optimizer_state_from_files,
    restore_optimizer,
)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _live(store: Store, name: str = "m") -> list[int]:
    return [r.version for r in store.list(name)]


def test_saves_every_n_calls_and_records_history_and_duration(store: Store) -> None:
    model = _model()
    checkpointer = Checkpointer(store, "m", every=3, monitor="val_loss", config={"width": 4}, tags=["unit"])
    saved = [checkpointer.step(model, {"loss": 1.0 / i, "val_loss": 2.0 / i}) for i in range(1, 8)]
    assert [s is not None for s in saved] == [False, False, True, False, False, True, False]
    assert [s.ref for s in checkpointer.saved] == ["m@1", "m@2"]
    final = checkpointer.finish(model, converged=True)
    assert final is not None and final.ref == "m@3"
    assert checkpointer.finish(model) is None  # nothing new since

    history = store.history("m@3")
    assert history["epoch"] == list(range(1, 8))
    assert history["loss"] == pytest.approx([1.0 / i for i in range(1, 8)])
    assert store.history("m@1")["epoch"] == [1, 2, 3]  # each checkpoint carries the history up to it
    info = store.info("m@3")
    training = info.manifest.training
    assert training.epochs == 7 and training.steps is None and training.converged is True
    assert training.duration_s is not None and training.duration_s > 0
    assert training.final_loss == pytest.approx(1.0 / 7) and training.best_val_loss == pytest.approx(2.0 / 7)
    assert info.manifest.config == {"width": 4} and info.manifest.labels == ("unit",)
    assert info.record.metrics == {"loss": pytest.approx(1.0 / 7), "val_loss": pytest.approx(2.0 / 7)}
    assert store.info("m@1").manifest.training.duration_s <= training.duration_s


def test_metrics_reported_late_or_sometimes_are_padded(store: Store) -> None:
    checkpointer = Checkpointer(store, "m", every=None, monitor=None, counts="steps")
    model = _model()
    checkpointer.step(model, {"loss": torch.tensor(3.0)})
    checkpointer.step(model, {"loss": 2.0, "val_loss": 5.0})
    checkpointer.step(model, {"loss": 1.0})
    assert checkpointer.history == {"loss": [3.0, 2.0, 1.0], "step": [1, 2, 3], "val_loss": [None, 5.0, None]}
    saved = checkpointer.finish(model)
    assert saved is not None and store.info(saved.ref).manifest.training.steps == 3


def test_best_is_tagged_and_moves_only_when_a_better_checkpoint_arrives(store: Store) -> None:
    model = _model()
    checkpointer = Checkpointer(store, "m", every=1, monitor="val_loss", mode="min")
    for value in (5.0, 3.0, 4.0, 1.0, 2.0):
        checkpointer.step(model, {"val_loss": value})
        assert checkpointer.best is not None
        assert store.resolve("m:best").ref == checkpointer.best.ref
    assert checkpointer.best.ref == "m@4" and checkpointer.best_value == 1.0
    assert store.resolve("m:best").tags == ("best",)

    maximiser = Checkpointer(store, "acc", every=1, monitor="accuracy", mode="max", best_tag="top")
    for value in (0.5, 0.9, 0.7):
        maximiser.step(model, {"accuracy": value})
    assert store.resolve("acc:top").ref == "acc@2"


def test_keep_last_deletes_older_untagged_checkpoints_but_never_the_best(store: Store) -> None:
    model = _model()
    checkpointer = Checkpointer(store, "m", every=1, monitor="val_loss", keep_last=2)
    checkpointer.step(model, {"val_loss": 1.0})  # m@1 is the best and stays the best
    for value in (3.0, 4.0, 5.0, 6.0):
        checkpointer.step(model, {"val_loss": value})
    assert _live(store) == [1, 4, 5]
    assert checkpointer.deleted == ("m@2", "m@3")
    assert store.resolve("m:best").ref == "m@1"

    # A better checkpoint moves the tag; the old best is now untagged and beyond keep_last, so it goes.
    checkpointer.step(model, {"val_loss": 0.5})
    assert _live(store) == [5, 6]
    assert store.resolve("m:best").ref == "m@6"
    assert checkpointer.deleted == ("m@2", "m@3", "m@1", "m@4")


def test_keep_last_spares_versions_tagged_by_someone_else_and_other_runs(store: Store) -> None:
    model = _model()
    store.save(model, name="m", description="an earlier run")  # m@1: not this checkpointer's to delete
    checkpointer = Checkpointer(store, "m", every=1, monitor=None, keep_last=1)
    checkpointer.step(model, {"loss": 1.0})  # m@2
    store.tag("m@2", "prod")
    checkpointer.step(model, {"loss": 1.0})  # m@3
    checkpointer.step(model, {"loss": 1.0})  # m@4: m@3 goes, m@2 is tagged
    assert _live(store) == [1, 2, 4]
    assert checkpointer.deleted == ("m@3",)


def test_keep_last_without_a_best_tag_still_keeps_the_best(store: Store) -> None:
    model = _model()
    checkpointer = Checkpointer(store, "m", every=1, monitor="val_loss", best_tag=None, keep_last=1)
    for value in (1.0, 2.0, 3.0):
        checkpointer.step(model, {"val_loss": value})
    assert _live(store) == [1, 3]
    assert store.resolve("m@1").tags == ()


def test_refusals_say_what_to_do(store: Store) -> None:
    model = _model()
    with pytest.raises(ConfigError, match="monitor="):
        Checkpointer(store, "m", monitor="val_los").step(model, {"val_loss": 1.0})
    assert _live(store) == []  # refused before saving
    with pytest.raises(ConfigError, match="optimizer="):
        Checkpointer(store, "m", save_optimizer=True, monitor=None).step(model, {"loss": 1.0})
    with pytest.raises(ConfigError, match="number"):
        Checkpointer(store, "m").step(model, {"loss": "low"})
    with pytest.raises(ConfigError, match="every"):
        Checkpointer(store, "m", every=0)
    with pytest.raises(ConfigError, match="keep_last"):
        Checkpointer(store, "m", keep_last=0)
    with pytest.raises(ConfigError, match="mode"):
        Checkpointer(store, "m", mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="step"):
        Checkpointer(store, "m").finish(model)
    with pytest.raises(FormatError):
        Checkpointer(store, "not a name")


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 3, generator=generator)
    y = torch.randn(16, 1, generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda params: torch.optim.Adam(params, lr=1e-2, betas=(0.8, 0.95), amsgrad=True),
        lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True),
        lambda params: torch.optim.AdamW(params, lr=1e-2),
    ],
)
def test_optimizer_state_round_trip_continues_identically(store: Store, make: object) -> None:
    model = _model()
    optimizer = make(model.parameters())  # type: ignore[operator]
    checkpointer = Checkpointer(store, "m", every=3, monitor=None, save_optimizer=True)
    for step in range(3):
        _train_step(model, optimizer, step)
        saved = checkpointer.step(model, {"loss": 1.0}, optimizer=optimizer)
    assert saved is not None
    manifest = store.info(saved.ref).manifest
    assert {f.path for f in manifest.files} == {OPTIMIZER_TENSORS, OPTIMIZER_STRUCTURE}
    structure = json.loads(store.read_file(saved.ref, OPTIMIZER_STRUCTURE))  # plain JSON, nothing to unpickle
    assert structure["optimizer"] == type(optimizer).__qualname__

    restored_model = _model(seed=1)
    store.load(saved.ref, into=restored_model)
    restored = make(restored_model.parameters())  # type: ignore[operator]
    restore_optimizer(restored, store, saved.ref)
    for step in (3, 4):
        _train_step(model, optimizer, step)
        _train_step(restored_model, restored, step)
    for a, b in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_state_refusals(store: Store) -> None:
    model = _model()
    store.save(model, name="plain")
    with pytest.raises(NotFoundError, match="save_optimizer=True"):
        restore_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), store, "plain")
    files = optimizer_state_files(torch.optim.Adam(model.parameters()))
    with pytest.raises(FormatError, match="same optimizer class"):
        optimizer_state_from_files(files, optimizer="SGD")
    with pytest.raises(FormatError):
        optimizer_state_from_files({**files, OPTIMIZER_TENSORS: b"not safetensors"})
    with pytest.raises(FormatError):
        optimizer_state_from_files({**files, OPTIMIZER_STRUCTURE: b'{"format": "other"}'})
    assert optimizer_state_from_files(files)["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
