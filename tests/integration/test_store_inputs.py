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
