"""Replay of registry entries, without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from fracstore.digest import Digest
from fracstore.errors import FormatError, IntegrityError
from fracstore.registry_state import Entry, RegistryState, Writer

WRITER = Writer("h", 1, "c0ffee")


def manifest(i: int) -> Digest:
    return Digest(f"{i:064x}")


def replay(*ops: dict[str, Any]) -> RegistryState:
    state = RegistryState()
    for op in ops:
        entry = Entry(seq=state.seq + 1, time="2026-01-01T00:00:00.000000Z", writer=WRITER, prev=state.tip, **op)
        state.apply(entry, Digest.of(entry.to_bytes()))
    return state


def publish(name: str, i: int) -> dict[str, Any]:
    return {"op": "publish", "name": name, "manifest": manifest(i)}


def test_versions_are_the_nth_publish_per_name() -> None:
    state = replay(publish("a", 1), publish("b", 2), publish("a", 3))
    assert [v.version for v in state.names["a"].versions] == [1, 2]
    assert state.names["a"].versions[1].manifest == manifest(3)
    assert state.names["b"].versions[0].version == 1


def test_delete_keeps_numbers_and_drops_tags() -> None:
    state = replay(
        publish("a", 1),
        publish("a", 2),
        {"op": "tag", "name": "a", "tag": "prod", "version": 1},
        {"op": "tag", "name": "a", "tag": "dev", "version": 2},
        {"op": "delete", "name": "a", "version": 1},
        publish("a", 3),
    )
    named = state.names["a"]
    assert [v.version for v in named.live()] == [2, 3]
    assert named.tags == {"dev": 2}


def test_delete_whole_name_then_republish_continues_numbering() -> None:
    state = replay(publish("a", 1), publish("a", 2), {"op": "delete", "name": "a"}, publish("a", 4))
    assert [v.version for v in state.names["a"].live()] == [3]


def test_tags_on_missing_or_deleted_versions_have_no_effect() -> None:
    state = replay(
        publish("a", 1),
        {"op": "delete", "name": "a", "version": 1},
        {"op": "tag", "name": "a", "tag": "prod", "version": 1},
        {"op": "tag", "name": "a", "tag": "x", "version": 9},
        {"op": "untag", "name": "a", "tag": "never-set"},
    )
    assert state.names["a"].tags == {}


def test_broken_chain_is_an_integrity_error() -> None:
    state = replay(publish("a", 1))
    forged = Entry(seq=2, op="publish", time="t", writer=WRITER, prev=Digest("0" * 64), name="a", manifest=manifest(2))
    with pytest.raises(IntegrityError, match="rewritten"):
        state.apply(forged, Digest.of(b"x"))
    skipped = Entry(seq=3, op="publish", time="t", writer=WRITER, prev=state.tip, name="a", manifest=manifest(2))
    with pytest.raises(IntegrityError):
        state.apply(skipped, Digest.of(b"x"))


def test_checkpoint_form_round_trips() -> None:
    state = replay(publish("a", 1), publish("a", 2), {"op": "tag", "name": "a", "tag": "p", "version": 2})
    again = RegistryState.from_dict(state.to_dict())
    assert again.to_dict() == state.to_dict()
    assert again.names["a"].tags == {"p": 2}


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "publish", "name": "a"},  # no manifest
        {"op": "tag", "name": "a", "version": 1},  # no tag
        {"op": "bogus", "name": "a"},
        {"op": "gc-begin", "name": "a"},  # gc ops take no name
    ],
)
def test_malformed_entries_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        Entry(seq=1, time="t", writer=WRITER, prev=None, **fields)


def test_gc_entries_need_their_payload_and_begin() -> None:
    with pytest.raises(FormatError, match="payload"):
        Entry(seq=1, op="gc-begin", time="t", writer=WRITER, prev=None)
    with pytest.raises(FormatError, match="gc-begin"):
        Entry(seq=1, op="gc-end", time="t", writer=WRITER, prev=None)


def test_ops_on_unknown_names_leave_no_trace() -> None:
    state = replay({"op": "untag", "name": "ghost", "tag": "x"}, {"op": "delete", "name": "ghost"})
    assert state.names == {}


@pytest.mark.parametrize(
    "fields",
    [{"version": "1"}, {"version": True}, {"version": 0}, {"name": 3}, {"time": 1}],
)
def test_entry_field_types_are_checked(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {"op": "delete", "name": "a", "time": "t"}
    base.update(fields)
    with pytest.raises(FormatError):
        Entry(seq=1, writer=WRITER, prev=None, **base)


def test_checkpoints_that_replay_could_not_produce_are_refused() -> None:
    state = replay(publish("a", 1), publish("a", 2), {"op": "tag", "name": "a", "tag": "p", "version": 2})
    forged = state.to_dict()
    forged["names"]["a"]["tags"]["p"] = 7
    with pytest.raises(FormatError, match="no live version"):
        RegistryState.from_dict(forged)
    future = state.to_dict()
    future["seq"] = 1  # versions published after the checkpoint's own position
    with pytest.raises(FormatError, match="out of order"):
        RegistryState.from_dict(future)
