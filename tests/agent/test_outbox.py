"""The on-disk outbox: durable, ordered, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent._outbox import Outbox


def test_messages_survive_reopen_in_order(tmp_path: Path) -> None:
    # Prepare
    box = Outbox(tmp_path / "o.db")
    ids = [box.put("t", f"m{i}".encode()) for i in range(5)]
    box.remove(ids[1])
    box.close()
    # Execute
    reopened = Outbox(tmp_path / "o.db")
    # Assert
    assert [e.payload for e in reopened.peek(10)] == [b"m0", b"m2", b"m3", b"m4"]
    assert reopened.pending == 4
    assert reopened.pending_bytes == 8


def test_seq_is_monotonic_across_restarts(tmp_path: Path) -> None:
    # Prepare
    box = Outbox(tmp_path / "o.db")
    first = [box.next_seq() for _ in range(3)]
    box.close()
    # Execute
    second = Outbox(tmp_path / "o.db").next_seq()
    # Assert
    assert first == [1, 2, 3]
    assert second == 4


def test_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    # Prepare
    box = Outbox(tmp_path / "o.db", max_bytes=100)
    # Execute
    for i in range(15):
        box.put("t", bytes([i]) * 10)
    # Assert
    payloads = [e.payload[0] for e in box.peek(100)]
    assert payloads == list(range(5, 15))
    assert box.dropped == 5
    assert box.pending_bytes == 100
    box.close()
    assert Outbox(tmp_path / "o.db", max_bytes=100).dropped == 5


def test_message_larger_than_bound_is_refused(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=10)
    with pytest.raises(ValueError, match="exceeds the outbox bound"):
        box.put("t", b"x" * 11)


def test_peek_after_id_pages(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    ids = [box.put("t", b"x") for _ in range(6)]
    assert [e.id for e in box.peek(2, after_id=ids[2])] == ids[3:5]
