from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fracstore.digest import Descriptor, Digest
from fracstore.errors import FormatError
from fracstore.layout import (
    blob_key,
    checkpoint_key,
    digest_from_blob_key,
    log_key,
    probe_key,
    seq_from_key,
)

HEX = "ab" * 32


def test_digest_parse_format_round_trip() -> None:
    digest = Digest.parse(f"sha256:{HEX}")
    assert str(digest) == f"sha256:{HEX}"
    assert digest.short == "sha256:" + HEX[:12]
    assert Digest.of(b"") == Digest.parse("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize(
    "text",
    [
        HEX,  # no algorithm
        f"SHA256:{HEX}",
        f"sha256:{HEX.upper()}",
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX}0",
        f"sha512:{HEX}",
        f" sha256:{HEX}",
        f"sha256:{HEX}\n",
        "",
    ],
)
def test_digest_parse_rejects(text: str) -> None:
    with pytest.raises(FormatError, match="digest"):
        Digest.parse(text)


@given(st.binary(max_size=64))
def test_digest_of_chunks_equals_whole(data: bytes) -> None:
    half = len(data) // 2
    assert Digest.of_chunks([data[:half], memoryview(data[half:])]) == (Digest.of(data), len(data))
    assert Digest.parse(str(Digest.of(data))) == Digest.of(data)


def test_descriptor_validates() -> None:
    with pytest.raises(FormatError):
        Descriptor(Digest(HEX), -1)
    with pytest.raises(FormatError):
        Descriptor(HEX, 1)  # type: ignore[arg-type]


def test_layout_keys() -> None:
    digest = Digest(HEX)
    assert blob_key(digest) == f"blobs/sha256/ab/{HEX}"
    assert digest_from_blob_key(blob_key(digest)) == digest
    assert log_key(1) == "log/00000000000000000001.msgpack"
    assert checkpoint_key(1000) == "checkpoints/00000000000000001000.msgpack"
    assert seq_from_key(log_key(42), "log/") == 42
    assert sorted([log_key(10), log_key(9), log_key(100)]) == [log_key(9), log_key(10), log_key(100)]


@pytest.mark.parametrize("seq", [0, -1, 10**20, True, 1.0])
def test_log_key_rejects_bad_seq(seq: object) -> None:
    with pytest.raises(FormatError):
        log_key(seq)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key", [f"blobs/sha256/cd/{HEX}", f"blobs/sha256/ab/{HEX[:-2]}", "log/x", f"blobs/sha256/{HEX}"]
)
def test_digest_from_blob_key_rejects(key: str) -> None:
    with pytest.raises(FormatError):
        digest_from_blob_key(key)


def test_seq_from_key_rejects_foreign_names() -> None:
    with pytest.raises(FormatError):
        seq_from_key("log/1.msgpack", "log/")
    with pytest.raises(FormatError):
        seq_from_key("checkpoints/_last", "checkpoints/")
    with pytest.raises(FormatError):
        probe_key("../x")
