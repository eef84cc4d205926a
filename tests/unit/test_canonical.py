from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fracstore import canonical
from fracstore.errors import FormatError
from tests.strategies import json_like


def _shuffled(value: Any, rng: Any) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@given(json_like, st.randoms())
def test_encoding_is_independent_of_insertion_order(value: Any, rng: Any) -> None:
    assert canonical.encode(_shuffled(value, rng)) == canonical.encode(value)


@given(json_like)
def test_decode_encode_round_trip(value: Any) -> None:
    data = canonical.encode(value)
    assert canonical.decode(data, what="x", max_bytes=1 << 20) == canonical.normalize(value)
    assert canonical.encode(canonical.decode(data, what="x", max_bytes=1 << 20)) == data


def test_floats_are_float64_and_nan_is_canonical() -> None:
    assert canonical.encode(1.5) == b"\xcb" + struct.pack(">d", 1.5)
    negative_nan = struct.unpack(">d", bytes.fromhex("fff8000000000001"))[0]
    assert math.isnan(negative_nan)
    assert canonical.encode(negative_nan) == b"\xcb" + bytes.fromhex("7ff8000000000000")


def test_str_and_bytes_are_distinct() -> None:
    assert canonical.encode("a") == b"\xa1a"
    assert canonical.encode(b"a") == b"\xc4\x01a"
    assert canonical.encode((1, 2)) == canonical.encode([1, 2])


def test_numpy_and_torch_scalars_and_arrays_become_numbers_and_lists() -> None:
    assert canonical.encode({"lr": np.float32(0.5), "n": torch.tensor(3)}) == canonical.encode({"lr": 0.5, "n": 3})
    assert canonical.encode({"loss": np.array([1.0, 0.5]), "t": torch.tensor([[1, 2]])}) == canonical.encode(
        {"loss": [1.0, 0.5], "t": [[1, 2]]}
    )


@pytest.mark.parametrize(
    ("value", "where"),
    [({1: "x"}, "keys must be strings"), ({"a": {1, 2}}, r"value\['a'\]"), (2**64, "64 bits"), (object(), "object")],
)
def test_unstorable_values_are_named(value: Any, where: str) -> None:
    with pytest.raises(FormatError, match=where):
        canonical.encode(value)


def test_decode_refuses_ext_types_oversize_and_garbage() -> None:
    with pytest.raises(FormatError, match="ext type"):
        canonical.decode(msgpack.packb(msgpack.ExtType(5, b"x")), what="x", max_bytes=100)
    with pytest.raises(FormatError, match="limit"):
        canonical.decode(b"\x00" * 101, what="x", max_bytes=100)
    with pytest.raises(FormatError, match="not valid msgpack"):
        canonical.decode(b"\xc1", what="x", max_bytes=100)
    with pytest.raises(FormatError, match="not valid msgpack"):
        canonical.decode(b"\x01\x02", what="x", max_bytes=100)


def test_decode_refuses_duplicate_and_non_string_keys_and_timestamps() -> None:
    duplicate = b"\x82\xa1a\x01\xa1a\x02"  # {"a": 1, "a": 2}
    with pytest.raises(FormatError, match="duplicate"):
        canonical.decode(duplicate, what="x", max_bytes=100)
    bin_key = b"\x81\xc4\x01a\x01"  # {b"a": 1}
    with pytest.raises(FormatError):
        canonical.decode(bin_key, what="x", max_bytes=100)
    timestamp = msgpack.packb(msgpack.Timestamp(1, 0))
    with pytest.raises(FormatError, match="ext type"):
        canonical.decode(timestamp, what="x", max_bytes=100)


def test_lone_surrogates_are_format_errors() -> None:
    with pytest.raises(FormatError, match="Unicode"):
        canonical.encode({"k": "\ud800"})
