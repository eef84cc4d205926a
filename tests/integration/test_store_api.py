"""The Store facade end to end on real stores: refs, list/best, tags, deletes, diff, artifacts, config, loading into
modules, registered model types, tied weights, memory:// stores and the recorded environment."""

from __future__ import annotations

import dataclasses
import math
import platform
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import safetensors
import torch
from torch import nn

import fracstore
from fracstore import (
    AmbiguousRefError,
    ConflictError,
    Digest,
    FormatError,
    NotFoundError,
    Store,
)
from fracstore.model_types import unregister_model_type
from tests.helpers import blob_bytes_on_disk

# A 1-D float32 tensor of this many elements is 1.2 MB: over the 1 MiB pack threshold, so it gets its own blob.
BIG = 300_000


def _small(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


def _refs(table: Any) -> list[str]:
    return [r.ref for r in table]


def _unique_prefix(digest: Digest, others: list[Digest]) -> str:
    """The shortest prefix (at least 4 hex digits) of ``digest`` that no other digest shares."""
    for n in range(4, 65):
        prefix = digest.hex[:n]
        if not any(o != digest and o.hex.startswith(prefix) for o in others):
            return prefix
    raise AssertionError("two digests are equal")


# -- ref resolution ------------------------------------------------------------------------------------------------


@pytest.fixture
def three_versions(store: Store) -> list[fracstore.SavedModel]:
    saved = [store.save(_small(i), name="pinn", metrics={"val_loss": 1.0 / (i + 1)}) for i in range(3)]
    store.save(_small(99), name="other")
    return saved


def test_name_and_latest_resolve_to_newest_version(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    assert [s.version for s in three_versions] == [1, 2, 3]
    assert store.resolve("pinn").ref == "pinn@3"
    assert store.resolve("pinn@latest").digest == three_versions[2].digest
    assert store.resolve("pinn").digest == three_versions[2].digest


def test_name_at_version_resolves_that_version(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    for saved in three_versions:
        record = store.resolve(f"pinn@{saved.version}")
        assert (record.name, record.version, record.digest) == ("pinn", saved.version, saved.digest)
        loaded = store.load(saved.ref)
        expected = _small(saved.version - 1)
        assert set(loaded) == set(expected)
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_tag_ref_resolves_to_tagged_version(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    store.tag("pinn@2", "prod")
    record = store.resolve("pinn:prod")
    assert record.ref == "pinn@2"
    assert record.tags == ("prod",)
    with pytest.raises(NotFoundError, match=r"pinn has no tag 'staging'.*\(tags: prod\)"):
        store.resolve("pinn:staging")


def test_full_digest_and_prefixes_resolve(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    digests = [r.digest for r in store.list()]
    target = three_versions[1]
    assert store.resolve(str(target.digest)).ref == "pinn@2"
    prefix = _unique_prefix(target.digest, digests)
    assert store.resolve(f"sha256:{prefix}").ref == "pinn@2"
    # A bare hex prefix (8+ digits) is tried as a digest when no model has that name.
    bare = target.digest.hex[: max(8, len(prefix))]
    assert store.resolve(bare).ref == "pinn@2"
    assert store.resolve(target.digest.hex).ref == "pinn@2"


def test_bare_hex_prefix_shorter_than_8_is_only_a_name(
    store: Store, three_versions: list[fracstore.SavedModel]
) -> None:
    short = three_versions[0].digest.hex[:7]
    with pytest.raises(NotFoundError, match="no model named"):
        store.resolve(short)


def test_a_model_named_like_a_hex_prefix_wins_over_the_digest(store: Store) -> None:
    first = store.save(_small(1), name="a")
    hex_name = first.digest.hex[:8]
    named = store.save(_small(2), name=hex_name)
    assert store.resolve(hex_name).digest == named.digest
    assert store.resolve(f"sha256:{hex_name}").digest == first.digest


def test_digest_prefix_of_deleted_version_is_not_found(
    store: Store, three_versions: list[fracstore.SavedModel]
) -> None:
    store.delete("pinn@1")
    with pytest.raises(NotFoundError):
        store.resolve(str(three_versions[0].digest))


def test_ambiguous_digest_prefix_lists_every_match(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Craft two real versions whose manifest digests share their first 4 hex digits.

    With the clock fixed, a save is a pure function of its inputs, so the digest of ``save(..., description=d)`` can
    be predicted from the first manifest with only the description replaced; a birthday search over descriptions
    finds two that collide in 4 hex digits after a few hundred tries (microseconds each, no saves).
    """
    fixed = "2024-01-02T03:04:05.000000Z"
    monkeypatch.setattr("fracstore.manifest.now", lambda: fixed)
    monkeypatch.setattr("fracstore.store.now", lambda: fixed, raising=False)
    weights = _small(0)
    base = store.save(weights, name="amb", description="d0")
    base_manifest = store.info(base.ref).manifest
    assert base_manifest.created_at == fixed

    def predicted(description: str) -> Digest:
        return Digest.of(dataclasses.replace(base_manifest, description=description).to_bytes())

    assert predicted("d0") == base.digest
    seen = {base.digest.hex[:4]: "d0"}
    pair = None
    for i in range(1, 20_000):
        description = f"d{i}"
        prefix = predicted(description).hex[:4]
        if prefix in seen:
            pair = (seen[prefix], description, prefix)
            break
        seen[prefix] = description
    assert pair is not None
    first_description, second_description, prefix = pair
    saved = [base] if first_description == "d0" else [store.save(weights, name="amb", description=first_description)]
    saved.append(store.save(weights, name="amb", description=second_description))
    digests = [s.digest for s in saved]
    assert digests == [predicted(first_description), predicted(second_description)], "save is no longer predictable"
    store.save(_small(5), name="unrelated")  # a live model that must not be listed unless it matches too

    matching = [r for r in store.list() if r.digest.hex.startswith(prefix)]
    assert len(matching) >= 2
    with pytest.raises(AmbiguousRefError) as info:
        store.resolve(f"sha256:{prefix}")
    error = info.value
    assert error.ref == f"sha256:{prefix}"
    assert len(error.candidates) == len(matching)
    for record in matching:
        assert any(record.ref in c and str(record.digest) in c for c in error.candidates)
        assert record.ref in str(error)
        assert str(record.digest) in str(error)
    with pytest.raises(AmbiguousRefError):
        store.load(f"sha256:{prefix}")
    # A longer prefix picks one of them again.
    one = saved[1].digest
    assert store.resolve(f"sha256:{_unique_prefix(one, [r.digest for r in store.list()])}").digest == one


def test_unknown_name_suggests_close_names(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    with pytest.raises(NotFoundError) as info:
        store.resolve("pinm")
    assert "did you mean" in str(info.value)
    assert "pinn" in str(info.value)
    assert isinstance(info.value, LookupError)
    with pytest.raises(NotFoundError, match="no model named 'zzzz-nothing'"):
        store.load("zzzz-nothing")


def test_deleted_version_says_it_was_deleted(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    store.delete("pinn@2")
    with pytest.raises(NotFoundError, match="pinn@2 was deleted"):
        store.resolve("pinn@2")
    with pytest.raises(NotFoundError, match="pinn@7 does not exist"):
        store.resolve("pinn@7")


def test_version_of_fully_deleted_name_says_it_was_deleted(store: Store) -> None:
    store.save(_small(0), name="gone")
    store.delete("gone", all_versions=True)
    with pytest.raises(NotFoundError, match="gone@1 was deleted"):
        store.resolve("gone@1")


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "sha256:abc",  # under 4 hex digits
        "sha256:ABCD",  # uppercase
        "sha256:xyz1",
        "sha256:" + "a" * 65,
        "pinn@0",
        "pinn@-1",
        "pinn@x",
        "pinn@",
        "pinn:",
        "pinn:bad tag",
        "bad name",
        "-leading-dash",
        "a/b",
    ],
)
def test_invalid_refs_raise_format_error(store: Store, three_versions: list[fracstore.SavedModel], ref: str) -> None:
    with pytest.raises(FormatError):
        store.resolve(ref)


def test_non_string_ref_raises_format_error(store: Store) -> None:
    with pytest.raises(FormatError):
        store.resolve(3)  # type: ignore[arg-type]


# -- list and best -------------------------------------------------------------------------------------------------


@pytest.fixture
def catalogue(store: Store) -> Store:
    store.save(_small(1), name="a", model_type="mlp", metrics={"val_loss": 0.5, "accuracy": 0.7},
               training={"epochs": 5, "duration_s": 30.0}, tags=["baseline"])  # fmt: skip
    store.save(_small(2), name="a", model_type="mlp", metrics={"val_loss": 0.05, "accuracy": 0.9},
               training={"epochs": 2, "duration_s": 10.0})  # fmt: skip
    store.save(_small(3), name="a", model_type="mlp", metrics={"val_loss": 0.08, "accuracy": 0.8},
               training={"epochs": 4, "duration_s": 20.0}, tags=["baseline", "gpu"])  # fmt: skip
    store.save(_small(4), name="b", model_type="cnn", metrics={"val_loss": 0.01, "error": 0.3},
               training={"epochs": 9, "duration_s": 5.0})  # fmt: skip
    store.save(_small(5), name="c", model_type="cnn")  # no metrics at all
    return store


def test_list_all_in_publish_order(catalogue: Store) -> None:
    assert _refs(catalogue.list()) == ["a@1", "a@2", "a@3", "b@1", "c@1"]


def test_list_by_name_and_model_type(catalogue: Store) -> None:
    assert _refs(catalogue.list("a")) == ["a@1", "a@2", "a@3"]
    assert _refs(catalogue.list(model_type="cnn")) == ["b@1", "c@1"]
    assert _refs(catalogue.list("b", model_type="mlp")) == []
    assert _refs(catalogue.list("nope")) == []


def test_list_by_tags_matches_labels_and_registry_tags(catalogue: Store) -> None:
    assert _refs(catalogue.list(tags=["baseline"])) == ["a@1", "a@3"]
    assert _refs(catalogue.list(tags=["baseline", "gpu"])) == ["a@3"]
    catalogue.tag("a@2", "prod")
    catalogue.tag("b@1", "prod")
    assert _refs(catalogue.list(tags=["prod"])) == ["a@2", "b@1"]
    catalogue.tag("a@1", "prod")  # a tag is per name: moving a's prod leaves b's alone
    assert _refs(catalogue.list(tags=["prod"])) == ["a@1", "b@1"]
    # A registry tag and a saved label together.
    assert _refs(catalogue.list(tags=["prod", "baseline"])) == ["a@1"]


def test_tags_must_be_a_list_not_a_single_string(catalogue: Store) -> None:
    # A plain string would otherwise be iterated into characters and silently match nothing.
    with pytest.raises(FormatError, match=r"tags=\['baseline'\]"):
        catalogue.list(tags="baseline")
    with pytest.raises(FormatError, match="not a single string"):
        catalogue.best("val_loss", tags="baseline")
    with pytest.raises(FormatError, match="not a single string"):
        catalogue.save({"w": torch.ones(1)}, name="a", tags="baseline")


def test_list_where_thresholds_exclude_records_without_the_metric(catalogue: Store) -> None:
    assert _refs(catalogue.list(where=["val_loss<0.1"])) == ["a@2", "a@3", "b@1"]
    assert _refs(catalogue.list(where=["val_loss<0.1", "epochs>=3"])) == ["a@3", "b@1"]
    assert _refs(catalogue.list(where=["error>=0"])) == ["b@1"]  # only b has error; c has no metrics at all
    assert _refs(catalogue.list(where=["accuracy>0.75", "training_duration<=20"])) == ["a@2", "a@3"]
    assert _refs(catalogue.list(where=[fracstore.MetricFilter("val_loss", "==", 0.5)])) == ["a@1"]


@pytest.mark.parametrize("bad", ["val_loss", "val_loss<<1", "val_loss<abc", "<0.1", ""])
def test_malformed_where_raises_format_error(catalogue: Store, bad: str) -> None:
    with pytest.raises(FormatError):
        catalogue.list(where=[bad])


def test_list_latest_only(catalogue: Store) -> None:
    assert _refs(catalogue.list(latest_only=True)) == ["a@3", "b@1", "c@1"]
    catalogue.delete("a@3")
    assert _refs(catalogue.list(latest_only=True)) == ["a@2", "b@1", "c@1"]


def test_best_infers_min_for_losses_errors_durations(catalogue: Store) -> None:
    assert catalogue.best("val_loss").ref == "b@1"
    assert catalogue.best("val_loss", name="a").ref == "a@2"
    assert catalogue.best("error").ref == "b@1"
    assert catalogue.best("training_duration").ref == "b@1"  # from training={"duration_s": ...}
    assert catalogue.best("training_duration", name="a").ref == "a@2"


def test_best_infers_max_for_accuracy_and_honours_explicit_mode(catalogue: Store) -> None:
    assert catalogue.best("accuracy").ref == "a@2"
    assert catalogue.best("accuracy", mode="min").ref == "a@1"
    assert catalogue.best("val_loss", mode="max").ref == "a@1"
    with pytest.raises(FormatError):
        catalogue.best("val_loss", mode="lowest")


def test_best_ties_go_to_newest(store: Store) -> None:
    for i in range(3):
        store.save(_small(i), name="t", metrics={"score": 1.0})
    store.save(_small(9), name="t", metrics={"score": 0.5})
    assert store.best("score").ref == "t@3"
    assert store.best("score", mode="min").ref == "t@4"


def test_best_is_none_when_nothing_has_the_metric(catalogue: Store) -> None:
    assert catalogue.best("bleu") is None
    assert catalogue.best("error", name="a") is None


def test_best_filters_combine(catalogue: Store) -> None:
    assert catalogue.best("val_loss", tags=["baseline"]).ref == "a@3"
    assert catalogue.best("val_loss", model_type="mlp", where=["epochs>=3"]).ref == "a@3"
    assert catalogue.best("val_loss", name="a", where=["epochs>=5"]).ref == "a@1"
    assert catalogue.best("val_loss", name="a", tags=["gpu"], where=["epochs>=5"]) is None
    catalogue.delete("b@1")
    assert catalogue.best("val_loss").ref == "a@2"  # deleted versions never win


# -- tags, deletes, version numbers --------------------------------------------------------------------------------


def test_tag_compare_and_set(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    record = store.tag("pinn@1", "prod", expected=None)  # create-only
    assert record.ref == "pinn@1"
    with pytest.raises(ConflictError):
        store.tag("pinn@2", "prod", expected=None)  # exists already
    log_len = len(store.log())
    with pytest.raises(ConflictError):
        store.tag("pinn@2", "prod", expected=3)  # points at 1, not 3
    assert len(store.log()) == log_len  # a refused CAS writes nothing
    assert store.resolve("pinn:prod").ref == "pinn@1"
    assert store.tag("pinn@2", "prod", expected=1).ref == "pinn@2"
    assert store.resolve("pinn:prod").ref == "pinn@2"


def test_moving_a_tag(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    store.tag("pinn@1", "prod")
    store.tag("pinn", "prod")  # a plain name means the newest version
    assert store.resolve("pinn:prod").ref == "pinn@3"
    assert store.resolve("pinn@1").tags == ()
    assert store.resolve("pinn@3").tags == ("prod",)
    before = len(store.log())
    store.tag("pinn@3", "prod")  # already there: no new entry
    assert len(store.log()) == before
    ops = [(e.op, e.tag, e.version) for e in store.log("pinn") if e.op == "tag"]
    assert ops == [("tag", "prod", 1), ("tag", "prod", 3)]


def test_untag(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    store.tag("pinn@2", "prod")
    store.untag("pinn", "prod")
    with pytest.raises(NotFoundError):
        store.resolve("pinn:prod")
    assert store.list(tags=["prod"]).empty
    with pytest.raises(NotFoundError, match="pinn has no tag 'prod'"):
        store.untag("pinn", "prod")


def test_tag_on_deleted_version_is_removed(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    store.tag("pinn@2", "prod")
    store.tag("pinn@3", "gpu")
    store.delete("pinn@2")
    with pytest.raises(NotFoundError):
        store.resolve("pinn:prod")
    assert _refs(store.list(tags=["prod"])) == []
    assert store.resolve("pinn:gpu").ref == "pinn@3"
    with pytest.raises(NotFoundError, match="pinn@2 was deleted"):
        store.tag("pinn@2", "again")
    # Re-opening the store replays the log from disk and agrees.
    reopened = Store.open(store.url)
    with pytest.raises(NotFoundError):
        reopened.resolve("pinn:prod")


def test_delete_one_version_vs_all(store: Store, three_versions: list[fracstore.SavedModel]) -> None:
    assert store.delete("pinn@2") == ["pinn@2"]
    assert _refs(store.list("pinn")) == ["pinn@1", "pinn@3"]
    assert store.delete("pinn") == ["pinn@3"]  # a plain name deletes the newest version
    assert store.resolve("pinn").ref == "pinn@1"
    store.save(_small(7), name="pinn")
    assert store.delete("pinn", all_versions=True) == ["pinn@1", "pinn@4"]
    assert _refs(store.list("pinn")) == []
    assert _refs(store.list()) == ["other@1"]
    with pytest.raises(NotFoundError):
        store.load("pinn")


def test_version_numbers_never_reused_after_deletes(store: Store) -> None:
    for i in range(3):
        store.save(_small(i), name="v")
    store.delete("v@3")
    assert store.save(_small(3), name="v").version == 4
    store.delete("v", all_versions=True)
    assert store.save(_small(4), name="v").version == 5
    assert _refs(Store.open(store.url).list("v")) == ["v@5"]


# -- diff ----------------------------------------------------------------------------------------------------------


def test_diff_of_two_versions(store: Store, store_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(BIG, generator=g), torch.randn(BIG, generator=g)
    a = store.save({"w1": w1, "w2": w2, "b": torch.ones(3)}, name="m", metrics={"val_loss": 0.2, "acc": 0.8})
    before = blob_bytes_on_disk(store_path)
    b = store.save({"w1": w1, "w2": w2 + 1, "c": torch.ones(3)}, name="m", metrics={"val_loss": 0.1, "f1": 0.5})
    growth = blob_bytes_on_disk(store_path) - before

    diff = store.diff("m@1", "m@2")
    assert (diff.a, diff.b) == ("m@1", "m@2")
    assert diff.changed == ("w2",)
    assert diff.added == ("c",)
    assert diff.removed == ("b",)
    assert diff.unchanged == ("w1",)
    w1_blob = next(t for t in store.info(a.ref).manifest.tensors if t.name == "w1").blob
    w1_size = (store_path / "blobs" / "sha256" / w1_blob.hex[:2] / w1_blob.hex).stat().st_size
    assert diff.bytes_shared == w1_size
    manifest_size = (store_path / "blobs" / "sha256" / b.digest.hex[:2] / b.digest.hex).stat().st_size
    assert diff.bytes_new == growth - manifest_size  # the new w2 blob and the new packed blob
    assert diff.metrics == {"acc": (0.8, None), "f1": (None, 0.5), "val_loss": (0.2, 0.1)}

    same = store.diff("m@2", "m@2")
    assert same.changed == same.added == same.removed == ()
    assert set(same.unchanged) == {"w1", "w2", "c"}
    assert same.bytes_new == 0


# -- history, files, config ----------------------------------------------------------------------------------------


def test_history_and_files_round_trip(store: Store, tmp_path: Path) -> None:
    history = {"loss": [1.0, 0.5, 0.25], "lr": [1e-3, 1e-3, 5e-4], "phase": ["warmup", "main", "main"]}
    local = tmp_path / "README.md"
    local.write_bytes(b"# model card\n\xe2\x9c\x93\n")
    tokenizer = b'{"vocab": {"a": 0, "b": 1}}'
    saved = store.save(
        _small(0),
        name="m",
        history=history,
        files={"tokenizer.json": tokenizer, "docs/README.md": local},
    )
    fresh = Store.open(store.url)  # nothing from the writer's memory
    assert fresh.history(saved.ref) == history
    assert fresh.read_file("m", "tokenizer.json") == tokenizer
    assert fresh.read_file("m@1", "docs/README.md") == local.read_bytes()
    files = {f.path: f for f in fresh.info("m").manifest.files}
    assert set(files) == {"tokenizer.json", "docs/README.md"}
    assert files["tokenizer.json"].size == len(tokenizer)
    assert files["tokenizer.json"].media_type == "application/json"
    with pytest.raises(NotFoundError) as info:
        fresh.read_file("m", "vocab.txt")
    assert "vocab.txt" in str(info.value)
    assert "tokenizer.json" in str(info.value)
    assert "docs/README.md" in str(info.value)
    assert fresh.history(store.save(_small(1), name="m").ref) is None


def test_missing_local_file_fails_the_save(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        store.save(_small(0), name="m", files={"x.bin": tmp_path / "does-not-exist"})
    with pytest.raises(FormatError):
        store.save(_small(0), name="m", files={"../escape": b"x"})
    assert _refs(store.list()) == []


def test_config_restored_exactly(store: Store) -> None:
    config = {
        "layers": [64, 64, {"kind": "attn", "heads": 8, "dropout": 0.1}],
        "lr": 3e-4,
        "tiny": 1e-300,
        "neg_zero": -0.0,
        "inf": math.inf,
        "whole_float": 2.0,
        "flag": True,
        "off": False,
        "nothing": None,
        "nested": {"a": {"b": {"c": [None, True, 1.5, "x"]}}},
        "empty": {"list": [], "dict": {}},
        "text": "ünïcode ✓",
    }
    store.save(_small(0), name="cfg", config=config)
    restored = Store.open(store.url).info("cfg").manifest.config
    assert restored == config

    def same_types(a: Any, b: Any) -> None:
        assert type(a) is type(b), (a, b)
        if isinstance(a, dict):
            assert set(a) == set(b)
            for k in a:
                same_types(a[k], b[k])
        elif isinstance(a, list):
            for x, y in zip(a, b, strict=True):
                same_types(x, y)

    same_types(restored, config)
    assert math.copysign(1.0, restored["neg_zero"]) == -1.0
    assert store.resolve("cfg").config == config


# -- loading into modules ------------------------------------------------------------------------------------------


def test_load_into_module(store: Store) -> None:
    torch.manual_seed(0)
    source = nn.Linear(3, 2)
    store.save(source, name="lin")
    target = nn.Linear(3, 2)
    assert store.load("lin", into=target) is target
    assert torch.equal(target.weight, source.weight)
    assert torch.equal(target.bias, source.bias)


def test_strict_mismatch_names_the_keys(store: Store) -> None:
    store.save({"weight": torch.ones(2, 3), "bias": torch.ones(2), "extra.scale": torch.ones(1)}, name="x")
    store.save(nn.Linear(3, 2, bias=False), name="nobias")
    store.save(nn.Linear(3, 2), name="lin")
    with pytest.raises(FormatError, match=r"not in the module: extra\.scale"):
        store.load("x", into=nn.Linear(3, 2))
    with pytest.raises(FormatError, match="missing from nobias@1: bias"):
        store.load("nobias", into=nn.Linear(3, 2))
    with pytest.raises(FormatError, match=r"weight.*\(2, 3\).*\(2, 4\)"):
        store.load("lin", into=nn.Linear(4, 2))


def test_non_strict_load_of_missing_and_unexpected_keys(store: Store) -> None:
    weight = torch.arange(6.0).reshape(2, 3)
    store.save({"weight": weight, "extra.scale": torch.ones(1)}, name="x")
    target = nn.Linear(3, 2)
    bias_before = target.bias.detach().clone()
    store.load("x", into=target, strict=False)
    assert torch.equal(target.weight.detach(), weight)
    assert torch.equal(target.bias.detach(), bias_before)


def test_non_strict_load_skips_shape_mismatches(store: Store) -> None:
    store.save({"weight": torch.ones(2, 4), "bias": torch.full((2,), 7.0)}, name="x")
    target = nn.Linear(3, 2)
    store.load("x", into=target, strict=False)
    assert torch.equal(target.bias.detach(), torch.full((2,), 7.0))


class _MLP(nn.Module):
    def __init__(self, width: int, depth: int, activation: str = "tanh") -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.activation = activation


class _Tied(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight


@pytest.fixture
def registered() -> Iterator[dict[str, type]]:
    names = {"test-mlp": _MLP, "test-tied": _Tied}
    for type_name, cls in names.items():
        fracstore.register_model_type(type_name)(cls)
    yield names
    for type_name in names:
        unregister_model_type(type_name)


def test_load_model_builds_registered_type(store: Store, registered: dict[str, type]) -> None:
    torch.manual_seed(1)
    source = _MLP(width=4, depth=2, activation="relu")
    saved = store.save(source, name="mlp", config={"width": 4, "depth": 2, "activation": "relu"})
    assert store.resolve(saved.ref).model_type == "test-mlp"  # the registered name of the class
    fresh = Store.open(store.url)
    model = fresh.load_model("mlp")
    assert isinstance(model, _MLP)
    assert model.activation == "relu"
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_load_model_of_unregistered_type_explains_registration(store: Store) -> None:
    store.save(_small(0), name="m", model_type="never-registered")
    with pytest.raises(NotFoundError) as info:
        store.load_model("m")
    message = str(info.value)
    assert "never-registered" in message
    assert "register_model_type" in message


def test_saving_a_module_records_its_class_name_as_default_type(store: Store) -> None:
    store.save(nn.Linear(2, 2), name="lin")
    store.save(nn.Linear(2, 2), name="lin2", model_type="custom")
    store.save(_small(0), name="sd")
    assert store.resolve("lin").model_type == "Linear"
    assert store.resolve("lin2").model_type == "custom"
    assert store.resolve("sd").model_type == ""


def test_tied_weights_round_trip(store: Store, registered: dict[str, type]) -> None:
    torch.manual_seed(2)
    source = _Tied(vocab=10, dim=6)
    saved = store.save(source, name="tied", config={"vocab": 10, "dim": 6})
    manifest = store.info(saved.ref).manifest
    aliases = {t.name: t.alias for t in manifest.tensors}
    assert aliases == {"emb.weight": None, "head.weight": "emb.weight"}
    assert store.resolve("tied").size == 10 * 6 * 4  # stored once

    fresh = Store.open(store.url)
    state = fresh.load("tied")
    assert state["head.weight"] is state["emb.weight"]
    assert torch.equal(state["emb.weight"], source.emb.weight.detach())

    model = fresh.load_model("tied")
    assert isinstance(model, _Tied)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight.detach(), source.emb.weight.detach())


# -- memory:// store, environment, open ----------------------------------------------------------------------------


@pytest.fixture
def memory_store() -> Iterator[Store]:
    path = f"/fracstore-test-{uuid.uuid4().hex}"
    yield Store.open(f"memory://{path}")
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_memory_store_full_flow(memory_store: Store) -> None:
    store = memory_store
    g = torch.Generator().manual_seed(3)
    big = torch.randn(BIG, generator=g)
    one = store.save({"big": big, "b": torch.ones(3)}, name="m", metrics={"val_loss": 0.3}, tags=["x"])
    two = store.save({"big": big, "b": torch.zeros(3)}, name="m", metrics={"val_loss": 0.1})
    assert two.bytes_written < one.bytes_written / 10  # the big tensor dedups in memory too
    store.save(_small(0), name="n", metrics={"val_loss": 0.2})
    assert _refs(store.list()) == ["m@1", "m@2", "n@1"]
    assert _refs(store.list(tags=["x"])) == ["m@1"]
    assert store.best("val_loss").ref == "m@2"
    store.tag("m@1", "prod")
    fresh = Store.open(store.url)
    state = fresh.load("m:prod")
    assert torch.equal(state["big"], big)
    assert torch.equal(state["b"], torch.ones(3))
    fresh.delete("m@2")
    assert fresh.best("val_loss").ref == "n@1"
    target = nn.Linear(3, 2)
    fresh.save(target, name="lin")
    assert torch.equal(store.load("lin", into=nn.Linear(3, 2)).weight, target.weight)


def test_environment_is_recorded(store: Store) -> None:
    saved = store.save(nn.Linear(2, 2), name="env")
    environment = store.info(saved.ref).manifest.environment
    assert environment["torch"] == torch.__version__
    assert environment["device"] == "cpu"
    assert environment["python"] == platform.python_version()
    assert environment["safetensors"] == safetensors.__version__
    assert environment["fracstore"] == fracstore.__version__


def test_open_without_create_on_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotFoundError) as info:
        Store.open(empty, create=False)
    assert "there is no fracstore store at" in str(info.value)
    assert list(empty.iterdir()) == []  # nothing was created
    with pytest.raises(NotFoundError):
        Store.open(tmp_path / "missing", create=False)
    Store.open(empty)  # create=True makes it a store
    assert Store.open(empty, create=False).id == Store.open(empty).id
