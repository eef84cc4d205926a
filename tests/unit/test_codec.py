"""The tensor codec: the exact safetensors bytes fracstore writes, packing, aliases, and decoding."""

from __future__ import annotations

import hashlib

import pytest
import safetensors.torch
import torch
from hypothesis import given

from fracstore.codec import (
    SINGLE_KEY,
    TORCH_TO_ST,
    decode_state_dict,
    plan_state_dict,
    single_tensor_bytes,
)
from fracstore.digest import Descriptor, Digest
from fracstore.errors import FormatError
from tests.strategies import state_dicts, tensors

# Pinned: the SHA-256 of the single-tensor blob of torch.arange(6, dtype=float32).reshape(2, 3). If this changes,
# every stored model's tensor digests would change: that is a format break, not a refactor.
GOLDEN_ARANGE_F32 = "sha256:aeb3ab214cff2143a07825b7ffd21ad02be237026ae43694cf949cda4e48e634"
GOLDEN_ARANGE_BYTES = (
    b"@\x00\x00\x00\x00\x00\x00\x00"
    b'{"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}       '
    + torch.arange(6, dtype=torch.float32).numpy().tobytes()
)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's data bytes (bit-exact comparison, NaN payloads included)."""
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _encode(state_dict: dict[str, torch.Tensor], threshold: int = 1 << 20) -> tuple[list[bytes], list[Descriptor]]:
    plan = plan_state_dict(state_dict, pack_threshold=threshold)
    blobs, descriptors = [], []
    for pending in plan.blobs:
        materialized = pending.materialize()
        descriptor, _ = materialized.hash()
        blobs.append(b"".join(bytes(c) for c in materialized.chunks))
        descriptors.append(descriptor)
    return blobs, descriptors


def test_single_tensor_blob_bytes_are_pinned() -> None:
    data = single_tensor_bytes(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert data == GOLDEN_ARANGE_BYTES
    assert str(Digest.of(data)) == GOLDEN_ARANGE_F32


@pytest.mark.parametrize("dtype", list(TORCH_TO_ST))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (1, 2, 3)])
def test_single_blob_matches_the_safetensors_library(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = (
        torch.zeros(shape, dtype=torch.float32).to(dtype)
        if dtype != torch.float8_e8m0fnu
        else torch.ones(shape).to(dtype)
    )
    assert single_tensor_bytes(tensor) == safetensors.torch.save({SINGLE_KEY: tensor})


@given(state_dicts())
def test_packed_blob_matches_the_safetensors_library(state_dict: dict[str, torch.Tensor]) -> None:
    # Everything is small, so everything lands in one packed blob keyed by name.
    untied = {k: v for k, v in state_dict.items() if not k.endswith(".tied")}
    if not untied:
        return
    blobs, _ = _encode(untied, threshold=1 << 30)
    assert len(blobs) == 1
    assert blobs[0] == safetensors.torch.save({k: v.contiguous() for k, v in untied.items()})


@given(state_dicts())
def test_decode_returns_bit_identical_tensors(state_dict: dict[str, torch.Tensor]) -> None:
    plan = plan_state_dict(state_dict, pack_threshold=16)  # a mix of single and packed blobs
    stored: dict[Digest, bytes] = {}
    hashed = {}
    for index, pending in enumerate(plan.blobs):
        materialized = pending.materialize()
        descriptor, members = materialized.hash()
        stored[descriptor.digest] = b"".join(bytes(c) for c in materialized.chunks)
        hashed[index] = (descriptor, members)
    entries = plan.entries(hashed)
    sizes = {d: len(b) for d, b in stored.items()}
    loaded = decode_state_dict(entries, sizes, lambda d: stored[d.digest])
    assert list(loaded) == list(state_dict)
    for name, tensor in state_dict.items():
        out = loaded[name]
        assert out.dtype == tensor.dtype and out.shape == tensor.shape
        assert raw_bytes(out) == raw_bytes(tensor)
    for entry in entries:
        if entry.alias is not None:
            assert loaded[entry.name] is loaded[entry.alias]


@given(tensors())
def test_tensor_digest_is_the_single_blob_digest_wherever_stored(tensor: torch.Tensor) -> None:
    expected = Digest.of(single_tensor_bytes(tensor))
    for threshold in (0, 1 << 30):  # stored alone, stored packed
        plan = plan_state_dict({"x": tensor, "other": torch.ones(3)}, pack_threshold=threshold)
        hashed = {i: p.materialize().hash() for i, p in enumerate(plan.blobs)}
        (entry,) = [e for e in plan.entries(hashed) if e.name == "x"]
        assert entry.digest == expected


def test_small_tensors_share_one_packed_blob_and_large_ones_get_their_own() -> None:
    state_dict = {f"layer{i}.bias": torch.ones(8) for i in range(50)}
    state_dict.update({f"layer{i}.weight": torch.ones(512, 512) for i in range(3)})  # 1 MiB each
    plan = plan_state_dict(state_dict, pack_threshold=1 << 20)
    assert len(plan.blobs) == 4
    assert sum(p.packed for p in plan.blobs) == 1


def test_a_renamed_large_tensor_has_the_same_blob() -> None:
    weight = torch.randn(512, 512)
    _, first = _encode({"encoder.w": weight})
    _, second = _encode({"renamed.w": weight.clone()})
    assert first == second


def test_tied_tensors_are_stored_once_and_views_are_not_ties() -> None:
    shared = torch.randn(600, 600)
    plan = plan_state_dict({"emb": shared, "head": shared, "half": shared[:300]}, pack_threshold=1 << 20)
    assert plan.aliases == {"head": "emb"}
    assert len(plan.blobs) == 1 + 1  # emb alone; the view half is its own (small) tensor


def test_non_contiguous_and_bool_tensors_round_trip_bytes() -> None:
    base = torch.arange(12, dtype=torch.int16).reshape(3, 4)
    assert single_tensor_bytes(base.t()) == safetensors.torch.save({SINGLE_KEY: base.t().contiguous()})
    flags = torch.tensor([True, False, True])
    assert single_tensor_bytes(flags) == safetensors.torch.save({SINGLE_KEY: flags})


@pytest.mark.parametrize(
    ("state_dict", "match"),
    [
        ({"w": torch.ones(2), "step": 3}, "'step' is a int"),
        ({"w": torch.ones(2, dtype=torch.complex128)}, "complex128"),
        ({"w": torch.ones(2, device="meta")}, "meta device"),
        ({"w": torch.ones(2).to_sparse()}, "to_dense"),
        ({"__metadata__": torch.ones(1)}, "reserved"),
        ({"": torch.ones(1)}, "non-empty strings"),
        ({3: torch.ones(1)}, "non-empty strings"),
        ([torch.ones(1)], "mapping"),
    ],
)
def test_bad_state_dicts_are_refused_with_the_key_named(state_dict: object, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        plan_state_dict(state_dict, pack_threshold=1 << 20)  # type: ignore[arg-type]


def test_decode_refuses_a_blob_that_disagrees_with_the_manifest() -> None:
    plan = plan_state_dict({"w": torch.ones(3)}, pack_threshold=0)
    materialized = plan.blobs[0].materialize()
    descriptor, members = materialized.hash()
    (entry,) = plan.entries({0: (descriptor, members)})
    wrong = single_tensor_bytes(torch.ones(4))
    with pytest.raises(FormatError, match="disagree"):
        decode_state_dict([entry], {descriptor.digest: len(wrong)}, lambda d: wrong)
    with pytest.raises(FormatError, match="not a valid safetensors"):
        decode_state_dict([entry], {descriptor.digest: 5}, lambda d: b"12345")
    assert hashlib.sha256(b"".join(bytes(c) for c in materialized.chunks)).hexdigest() == descriptor.digest.hex
