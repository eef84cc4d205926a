"""Random state dicts through a real local store (files on disk) and a memory store: bit-identical, ties kept."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import torch
from hypothesis import given, settings

from fracstore import Store
from tests.strategies import state_dicts

_counter = itertools.count()


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_identical(loaded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(original)
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert raw_bytes(loaded[name]) == raw_bytes(tensor), name
    for name, tensor in original.items():
        # Zero-element tensors have no storage to share, so fracstore stores them apart (they cost nothing).
        if name.endswith(".tied") and tensor.numel():
            assert loaded[name] is loaded[name.removesuffix(".tied")]


@settings(max_examples=40)
@given(state_dicts())
def test_local_store_round_trip_is_bit_identical(tmp_path_factory: object, state_dict: dict[str, torch.Tensor]) -> None:
    root = Path(str(tmp_path_factory.mktemp("rt")))  # type: ignore[attr-defined]
    # A low threshold mixes single-tensor blobs with the packed blob.
    store = Store.open(root / "store", pack_threshold=24)
    saved = store.save(state_dict, name="m")
    assert_identical(store.load(saved.ref), state_dict)
    # A second process-like reader (new Store object, same cache) sees the same.
    assert_identical(Store.open(root / "store").load(str(saved.digest)), state_dict)


@settings(max_examples=20)
@given(state_dicts())
def test_memory_store_round_trip_is_bit_identical(state_dict: dict[str, torch.Tensor]) -> None:
    store = Store.open(f"memory://rt-{uuid.uuid4().hex}", pack_threshold=24)
    saved = store.save(state_dict, name=f"m{next(_counter)}")
    assert_identical(store.load(saved.ref), state_dict)


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(300, 1024)  # 1.2 MiB: its own blob
        self.mid = torch.nn.Linear(1024, 1024)
        self.lm_head = torch.nn.Linear(1024, 300, bias=False)
        self.lm_head.weight = self.embed.weight


def test_tied_module_weights_come_back_tied(store: Store) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    saved = store.save(model, name="lm")
    manifest = store.info(saved.ref).manifest
    (alias,) = [t for t in manifest.tensors if t.alias is not None]
    assert alias.name == "lm_head.weight" and alias.alias == "embed.weight"
    assert len(manifest.tensor_blobs) == 1 + 1 + 1  # embed, mid.weight, packed(mid.bias)

    state = store.load(saved.ref)
    assert state["lm_head.weight"] is state["embed.weight"]
    fresh = TiedLM()
    store.load(saved.ref, into=fresh)
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert torch.equal(fresh.mid.weight, model.mid.weight)


def test_device_argument_moves_tensors(store: Store) -> None:
    saved = store.save({"w": torch.randn(3, 3)}, name="d")
    state = store.load(saved.ref, device="cpu")
    assert state["w"].device.type == "cpu"
    meta = store.load(saved.ref, device="meta")
    assert meta["w"].device.type == "meta"
