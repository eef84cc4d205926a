"""Weights in and out of safetensors files, HF-style folders and legacy .pt state dicts (fracstore.interop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fracstore import ConfigError, FormatError, NotFoundError
from fracstore.interop import (
    HF_CONFIG,
    HF_INDEX,
    HF_WEIGHTS,
    LegacyFormatWarning,
    read_hf_folder,
    read_legacy_state_dict,
    read_safetensors,
    read_weights,
    write_hf_folder,
    write_safetensors,
)


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.0.weight": torch.randn(8, 4, generator=g),
        "layer.0.bias": torch.randn(8, generator=g),
        "layer.1.weight": torch.randn(2, 8, generator=g),
        "steps": torch.tensor([3], dtype=torch.int64),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


class Opaque:
    """A class torch.load(weights_only=True) must refuse to rebuild."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_safetensors_file_round_trip_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    size = write_safetensors(_weights(), path, metadata={"fracstore_ref": "pinn@1"})
    assert size == path.stat().st_size
    read = read_weights(path)
    assert read.kind == "safetensors" and read.config is None
    assert read.metadata == {"fracstore_ref": "pinn@1"}
    _same(read.state_dict, _weights())
    _same(read_safetensors(path), _weights())
    with pytest.raises(ConfigError, match="exists"):
        write_safetensors(_weights(), path)
    write_safetensors({"x": torch.zeros(2)}, path, overwrite=True)
    assert set(read_safetensors(path)) == {"x"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_tied_and_strided_tensors_are_written_as_plain_copies(tmp_path: Path) -> None:
    shared = torch.randn(4, 4)
    state = {"embed": shared, "head": shared, "view": shared.t()}
    write_safetensors(state, tmp_path / "tied.safetensors")
    back = read_safetensors(tmp_path / "tied.safetensors")
    assert torch.equal(back["embed"], shared) and torch.equal(back["head"], shared)
    assert torch.equal(back["view"], shared.t())


def test_hf_folder_single_file_with_config_and_files(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    written = write_hf_folder(
        _weights(), folder, config={"width": 8}, files={"tokenizer.json": b"{}", "extra/notes.txt": b"hi"}
    )
    assert {p.name for p in written} == {HF_CONFIG, HF_WEIGHTS, "tokenizer.json", "notes.txt"}
    assert json.loads((folder / HF_CONFIG).read_text()) == {"width": 8}
    assert (folder / "extra" / "notes.txt").read_bytes() == b"hi"
    read = read_hf_folder(folder)
    assert read.kind == "hf-folder" and read.config == {"width": 8}
    assert read.metadata == {"format": "pt"}
    _same(read.state_dict, _weights())
    with pytest.raises(ConfigError, match="not empty"):
        write_hf_folder(_weights(), folder)
    write_hf_folder(_weights(), folder, overwrite=True)


def test_hf_folder_sharded_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    write_hf_folder(_weights(), folder, config={}, max_shard_bytes=64)
    index = json.loads((folder / HF_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _weights().values())
    assert not (folder / HF_WEIGHTS).exists()
    _same(read_weights(folder).state_dict, _weights())


def test_hf_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    with pytest.raises(NotFoundError, match=HF_CONFIG):
        read_hf_folder(folder)
    (folder / HF_CONFIG).write_text("[1, 2]")
    with pytest.raises(FormatError, match="JSON object"):
        read_hf_folder(folder)
    (folder / HF_CONFIG).write_text("{}")
    with pytest.raises(NotFoundError, match=HF_WEIGHTS):
        read_hf_folder(folder)
    # The index is outside data: a shard "name" must never become a path outside the folder.
    (folder / HF_INDEX).write_text(json.dumps({"weight_map": {"w": "../escape.safetensors"}}))
    with pytest.raises(FormatError, match=r"not a \.safetensors file name"):
        read_hf_folder(folder)
    save_file({"a": torch.zeros(1)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / HF_INDEX).write_text(json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(FormatError, match="lacks 'w'"):
        read_hf_folder(folder)
    (folder / HF_INDEX).write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_hf_folder(folder)


def test_write_hf_folder_refuses_artifact_paths_outside_the_folder(tmp_path: Path) -> None:
    for bad in ("../x", "/abs", "a//b", "a\\b"):
        with pytest.raises(FormatError, match="artifact path"):
            write_hf_folder(_weights(), tmp_path / "out", files={bad: b""})
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="max_shard_bytes"):
        write_hf_folder(_weights(), tmp_path / "out", max_shard_bytes=0)


def test_legacy_state_dict_flat_and_nested(tmp_path: Path) -> None:
    flat, nested = tmp_path / "flat.pt", tmp_path / "ckpt.pth"
    torch.save(_weights(), flat)
    torch.save({"model_state_dict": _weights(), "optimizer": {"lr": 0.1}, "epoch": 7}, nested)
    with pytest.warns(LegacyFormatWarning, match="weights_only=True"):
        read = read_weights(flat)
    assert read.kind == "legacy-pt"
    _same(read.state_dict, _weights())
    with pytest.warns(LegacyFormatWarning):
        _same(read_legacy_state_dict(nested), _weights())


def test_legacy_file_that_is_not_a_state_dict_or_not_plain_data(tmp_path: Path) -> None:
    other, opaque = tmp_path / "other.pt", tmp_path / "opaque.pt"
    torch.save({"epoch": 3, "lr": 0.1}, other)
    torch.save({"obj": Opaque()}, opaque)
    with pytest.warns(LegacyFormatWarning), pytest.raises(FormatError, match="holds no state dict"):
        read_legacy_state_dict(other)
    with pytest.warns(LegacyFormatWarning), pytest.raises(FormatError, match="weights_only=True"):
        read_legacy_state_dict(opaque)


def test_unknown_or_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        read_weights(tmp_path / "missing.safetensors")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(FormatError, match="cannot tell the format"):
        read_weights(tmp_path / "weights.onnx")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(FormatError, match="not a valid safetensors file"):
        read_weights(tmp_path / "broken.safetensors")
