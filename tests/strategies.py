"""Hypothesis strategies for fracstore values: state dicts over every dtype and odd shapes, JSON-like data."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from fracstore.codec import TORCH_TO_ST

DTYPES = tuple(TORCH_TO_ST)
NAME_CHARS = st.characters(codec="utf-8", exclude_characters='\x00"\\', min_codepoint=32)


def tensor_names() -> st.SearchStrategy[str]:
    """State-dict keys: dotted, slashed, unicode."""
    part = st.text(NAME_CHARS, min_size=1, max_size=8)
    return st.lists(part, min_size=1, max_size=3).map(".".join).filter(lambda n: n != "__metadata__")


def shapes() -> st.SearchStrategy[tuple[int, ...]]:
    """0-dim, zero-element and small odd shapes."""
    return st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor with random bytes (every bit pattern, NaNs included), possibly non-contiguous."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    shape = draw(shapes())
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for dim in shape:
        count *= dim
    raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)  # bool tensors hold 0 or 1
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape) if count else torch.empty(shape, dtype=dtype)
    if len(shape) >= 2 and draw(st.booleans()):
        tensor = tensor.transpose(0, 1)  # a non-contiguous view
    return tensor


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """State dicts with unique names and, sometimes, a tied entry."""
    names = draw(st.lists(tensor_names(), min_size=0, max_size=6, unique=True))
    out = {name: draw(tensors()) for name in names}
    if out and draw(st.booleans()):
        first = next(iter(out))
        alias = first + ".tied"
        if alias not in out:
            out[alias] = out[first]
    return out


json_like: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
