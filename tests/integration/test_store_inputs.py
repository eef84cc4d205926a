"""Inputs a save must refuse or repair, on a real local store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fracstore import FormatError, NotFoundError, Store
from fracstore.digest import Digest
from fracstore.layout import blob_key


def test_metrics_must_be_numbers_not_numeric_strings(store: Store) -> None:
    with pytest.raises(FormatError, match="val_loss"):
        store.save({"w": torch.ones(1)}, name="m", metrics={"val_loss": "0.5"})
    saved = store.save({"w": torch.ones(1)}, name="m", metrics={"val_loss": np.float32(0.5), "n": torch.tensor(3)})
    assert store.resolve(saved.ref).metrics == {"val_loss": 0.5, "n": 3.0}


def test_parent_by_digest_must_be_a_manifest_of_this_store(store: Store) -> None:
    saved = store.save({"w": torch.ones(1)}, name="m", files={"notes.txt": b"hello"})
    child = store.save({"w": torch.zeros(1)}, name="m", parent=saved.digest)
    assert store.resolve(child.ref).parent == saved.digest
    file_blob = store.info(saved.ref).manifest.files[0].blob
    with pytest.raises(FormatError, match="not a manifest"):
        store.save({"w": torch.zeros(1)}, name="m", parent=file_blob)
    with pytest.raises(NotFoundError, match="is not in"):
        store.save({"w": torch.zeros(1)}, name="m", parent=Digest("0" * 64))


def test_a_symlink_planted_under_a_blob_name_is_replaced_by_the_next_save(
    store: Store, store_path: Path, tmp_path: Path
) -> None:
    weight = torch.randn(512, 512)
    saved = store.save({"w": weight}, name="m")
    (blob,) = store.info(saved.ref).manifest.tensor_blobs
    path = store_path / blob_key(blob.digest)
    decoy = tmp_path / "decoy"
    decoy.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(decoy)
    again = store.save({"w": weight.clone()}, name="m")  # dedup must not count the link as the blob
    assert not path.is_symlink()
    assert torch.equal(Store.open(store_path).load(again.ref)["w"], weight)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"config": ["lr", 0.1]}, "config= takes a mapping"),
        ({"metrics": 0.5}, "metrics= takes a mapping"),
        ({"training": 5}, "training= takes"),
        ({"files": ["a.txt"]}, "files= takes a mapping"),
    ],
)
def test_wrong_option_types_are_format_errors(store: Store, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(FormatError, match=needle):
        store.save({"w": torch.ones(1)}, name="m", **kwargs)  # type: ignore[arg-type]
    assert store.list().records == []


def test_none_tags_mean_no_tags_and_where_must_be_a_list(store: Store) -> None:
    store.save({"w": torch.ones(1)}, name="m", tags=None)  # type: ignore[arg-type]
    assert len(store.list(tags=None)) == 1  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="not a single string"):
        store.list(where="val_loss<1")  # type: ignore[arg-type]


def test_an_unusable_device_is_a_config_error(store: Store) -> None:
    from fracstore import ConfigError

    store.save({"w": torch.ones(1)}, name="m")
    with pytest.raises(ConfigError, match="device"):
        store.load("m", device="cuda:7" if not torch.cuda.is_available() else "nosuchdevice")
    with pytest.raises(ConfigError, match="device"):
        store.load("m", device="nosuchdevice")


def test_returned_records_and_infos_are_copies(store: Store) -> None:
    store.save({"w": torch.ones(1)}, name="m", config={"sizes": [1, 2]}, metrics={"val_loss": 0.5})
    record = store.resolve("m")
    record.metrics["val_loss"] = 99.0  # type: ignore[index]
    record.config["sizes"].append(3)
    store.info("m").manifest.config["sizes"].append(4)
    again = store.resolve("m")
    assert again.metrics == {"val_loss": 0.5}
    assert again.config == {"sizes": [1, 2]}


def test_a_blob_file_replaced_between_verification_and_mapping_is_caught(
    store: Store, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from fracstore import IntegrityError
    from fracstore.blobs import BlobStore

    saved = store.save({"w": torch.zeros(512, 512)}, name="m")
    (blob,) = store.info(saved.ref).manifest.tensor_blobs
    path = store_path / blob_key(blob.digest)
    forged = torch.ones(512, 512)
    from fracstore.codec import single_tensor_bytes

    original = BlobStore.verified_file

    def verify_then_swap(self: BlobStore, *args: object, **kwargs: object) -> object:
        verified = original(self, *args, **kwargs)  # type: ignore[arg-type]
        replacement = path.with_name(".swap")
        replacement.write_bytes(single_tensor_bytes(forged))  # same size, other bytes: what rsync's rename does
        os.replace(replacement, path)
        return verified

    monkeypatch.setattr(BlobStore, "verified_file", verify_then_swap)
    with pytest.raises(IntegrityError, match="replaced while it was being loaded"):
        Store.open(store_path).load(saved.ref)
