"""Ref parsing, metric filters, best-model selection and the record table, without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from fracstore.digest import Digest
from fracstore.errors import FormatError
from fracstore.manifest import TrainingSummary
from fracstore.query import MetricFilter, ModelRecord, Query, RecordTable, Ref, best, infer_mode


def record(version: int, **fields: Any) -> ModelRecord:
    base: dict[str, Any] = {
        "name": "m",
        "version": version,
        "digest": Digest(f"{version:064x}"),
        "seq": version,
        "published_at": "2026-01-01T00:00:00.000000Z",
        "model_type": "pinn",
        "created_at": "2026-01-01T00:00:00.000000Z",
        "description": "",
        "labels": (),
        "tags": (),
        "metrics": {},
        "training": TrainingSummary(),
        "parent": None,
        "size": 0,
        "tensor_count": 0,
    }
    base.update(fields)
    return ModelRecord(**base)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pinn", Ref("pinn", name="pinn")),
        ("pinn@3", Ref("pinn@3", name="pinn", version=3)),
        ("pinn@latest", Ref("pinn@latest", name="pinn")),
        ("pinn:prod", Ref("pinn:prod", name="pinn", tag="prod")),
        ("sha256:abcd", Ref("sha256:abcd", digest_prefix="abcd")),
    ],
)
def test_ref_forms(text: str, expected: Ref) -> None:
    assert Ref.parse(text) == expected


@pytest.mark.parametrize("text", ["", "pinn@0", "pinn@x", "pinn@", "a b", "sha256:abc", "sha256:ABCD", "x:y:z", "/x"])
def test_bad_refs_explain_the_grammar(text: str) -> None:
    with pytest.raises(FormatError):
        Ref.parse(text)


def test_bare_hex_prefix_only_for_plain_long_hex_names() -> None:
    assert Ref.parse("deadbeef").bare_digest_prefix == "deadbeef"
    assert Ref.parse("deadbee").bare_digest_prefix is None
    assert Ref.parse("deadbeef@1").bare_digest_prefix is None


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val_loss", "min"), ("l2_error", "min"), ("training_duration", "min"), ("accuracy", "max"), ("r2", "max")],
)
def test_mode_inference(metric: str, mode: str) -> None:
    assert infer_mode(metric) == mode


def test_best_minimises_losses_and_breaks_ties_by_newest() -> None:
    records = [
        record(1, metrics={"val_loss": 0.2}),
        record(2, metrics={"val_loss": 0.1}),
        record(3, metrics={"val_loss": 0.1}),
    ]
    assert best(records, "val_loss").version == 3  # type: ignore[union-attr]
    assert best(records, "val_loss", mode="max").version == 1  # type: ignore[union-attr]
    assert best(records, "accuracy") is None
    with pytest.raises(FormatError):
        best(records, "val_loss", mode="lowest")


def test_best_reads_seed_names_from_the_training_summary() -> None:
    records = [record(1, training=TrainingSummary(duration_s=5.0)), record(2, training=TrainingSummary(duration_s=2.0))]
    assert best(records, "training_duration").version == 2  # type: ignore[union-attr]
    nan = record(3, metrics={"val_loss": float("nan")})
    assert best([nan], "val_loss") is None


def test_metric_filters() -> None:
    assert MetricFilter.parse("val_loss<0.1") == MetricFilter("val_loss", "<", 0.1)
    assert MetricFilter.parse(" epochs >= 3 ") == MetricFilter("epochs", ">=", 3.0)
    low = record(1, metrics={"val_loss": 0.05})
    assert MetricFilter.parse("val_loss<0.1").matches(low)
    assert not MetricFilter.parse("val_loss<0.01").matches(low)
    assert not MetricFilter.parse("accuracy>0").matches(low)  # missing metric never matches
    for bad in ("val_loss", "val_loss<x", "<3", "a<<3"):
        with pytest.raises(FormatError):
            MetricFilter.parse(bad)


def test_query_tags_match_labels_and_registry_tags() -> None:
    labelled = record(1, labels=("demo", "fractional"), tags=("prod",))
    assert Query(tags=("demo", "prod")).matches(labelled)
    assert not Query(tags=("demo", "missing")).matches(labelled)
    assert not Query(model_type="pino").matches(labelled)


def test_record_table_is_dataframe_like() -> None:
    table = RecordTable([record(1, metrics={"val_loss": 0.5}), record(2)])
    assert len(table) == 2
    assert table["ref"].values == ["m@1", "m@2"]
    assert table["val_loss"].values == [0.5, None]
    assert len(table.head(1)) == 1
    assert table[0].version == 1
    with pytest.raises(KeyError, match="columns"):
        table["nope"]


@pytest.mark.parametrize("text", ["m@\u00b2", "m@\u0661", "m@01", "m@-1", "sha256", "sha256@1"])
def test_versions_are_ascii_decimal_and_sha256_is_reserved(text: str) -> None:
    with pytest.raises(FormatError):
        Ref.parse(text)


@pytest.mark.parametrize(
    ("metric", "mode"),
    [
        ("lifetime_reward", "max"),
        ("terrain_accuracy", "max"),
        ("error_reduction", "max"),
        ("val_loss_improvement", "max"),
        ("uptime", "max"),
        ("train-time", "min"),
        ("best_val_loss", "min"),
        ("MSE", "min"),
    ],
)
def test_mode_inference_reads_whole_words(metric: str, mode: str) -> None:
    assert infer_mode(metric) == mode
