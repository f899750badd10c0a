"""The store-and-forward buffer: order, durability across a kill, the bound and its drop policy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.buffer import DROP_CLASS, StoreAndForward, UplinkRecord
from iotflow.errors import ConfigError


def rec(rid: str, kind: str = "reading", body: bytes = b"x" * 10) -> UplinkRecord:
    return UplinkRecord(rid, kind, "d1", body, 1)


def test_records_come_back_in_order_and_seq_is_never_reused(tmp_path: Path) -> None:
    buf = StoreAndForward(tmp_path / "b.db", 10_000)
    assert buf.put([rec("a"), rec("b"), rec("c")]) == 3
    got = buf.fetch()
    assert [(r.seq, r.rid) for r in got] == [(1, "a"), (2, "b"), (3, "c")]
    assert buf.remove([1, 3]) == 2
    buf.checkpoint()
    buf.close()
    again = StoreAndForward(tmp_path / "b.db", 10_000)
    assert again.next_seq() == 4
    again.put([rec("d")])
    assert [(r.seq, r.rid) for r in again.fetch()] == [(2, "b"), (4, "d")]
    assert [r.rid for r in again.fetch(after_seq=2)] == ["d"]
    assert [r.rid for r in again.fetch(before_seq=4)] == ["b"]
    assert [r.rid for r in again.fetch(limit=1)] == ["b"]
    assert again.stats().records == 2


def test_a_fetch_bounded_in_bytes_returns_what_fits_but_always_one(tmp_path: Path) -> None:
    buf = StoreAndForward(tmp_path / "b.db", 10_000_000)
    buf.put([UplinkRecord(f"r{i}", "aggregate", "gw", b"x" * 1000, 1) for i in range(10)])
    size = UplinkRecord("r0", "aggregate", "gw", b"x" * 1000, 1).size
    assert [r.rid for r in buf.fetch(max_bytes=3 * size)] == ["r0", "r1", "r2"]
    assert [r.rid for r in buf.fetch(after_seq=3, max_bytes=3 * size + 1)] == ["r3", "r4", "r5"]
    assert [r.rid for r in buf.fetch(max_bytes=1)] == ["r0"]  # larger than the bound: alone
    assert [r.rid for r in buf.fetch(limit=2, max_bytes=10 * size)] == ["r0", "r1"]


def test_a_buffered_record_id_is_not_added_twice(tmp_path: Path) -> None:
    buf = StoreAndForward(tmp_path / "b.db", 10_000)
    assert buf.put([rec("a"), rec("a")]) == 1
    assert buf.put([rec("a")]) == 0
    assert buf.stats().records == 1
    buf.remove([1])
    assert buf.put([rec("a")]) == 1  # delivered and gone: a replay sends it again


_WRITER = """
import os, signal, sys
from connectors.buffer import StoreAndForward, UplinkRecord
buf = StoreAndForward(sys.argv[1], 10_000_000)
buf.put([UplinkRecord(f"c{i}", "aggregate", "d", b"{}", 1) for i in range(100)])
buf.checkpoint(b"after-100")
buf.put([UplinkRecord(f"u{i}", "aggregate", "d", b"{}", 1) for i in range(50)])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_sigkilled_writer_keeps_exactly_what_it_checkpointed(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    done = subprocess.run([sys.executable, "-c", _WRITER, str(path)], check=False, timeout=60)
    assert done.returncode == -signal.SIGKILL
    buf = StoreAndForward(path, 10_000_000)
    assert buf.load_state() == b"after-100"
    assert [r.rid for r in buf.fetch(limit=1000)] == [f"c{i}" for i in range(100)]


def test_at_the_bound_raw_readings_go_first_then_dead_letters_and_drops_are_counted(
    tmp_path: Path,
) -> None:
    body = b"x" * 90
    sizes = {r: rec(r, body=body).size for r in "abcdefgh"}
    bound = sum(sizes.values()) - 1
    buf = StoreAndForward(tmp_path / "b.db", bound)
    buf.put(
        [
            rec("a", "aggregate", body),
            rec("b", "reading", body),
            rec("c", "detection", body),
            rec("d", "deadletter", body),
            rec("e", "reading", body),
            rec("f", "aggregate", body),
            rec("g", "command", body),
        ]
    )
    assert buf.stats().dropped == {}
    buf.put([rec("h", "reading", body)])  # one over: the oldest raw reading goes
    assert [r.rid for r in buf.fetch()] == ["a", "c", "d", "e", "f", "g", "h"]
    buf.put([rec("i", "aggregate", body), rec("j", "aggregate", body)])
    # two more over: the remaining raw readings go (oldest first), nothing else yet
    assert [r.rid for r in buf.fetch()] == ["a", "c", "d", "f", "g", "i", "j"]
    buf.put([rec("k", "detection", body)])  # no raw left: the dead letter goes
    assert [r.rid for r in buf.fetch()] == ["a", "c", "f", "g", "i", "j", "k"]
    buf.put([rec("l", "detection", body)])  # only aggregates and detections left: oldest aggregate
    assert [r.rid for r in buf.fetch()] == ["c", "f", "g", "i", "j", "k", "l"]
    stats = buf.stats()
    assert stats.dropped == {"reading": 3, "deadletter": 1, "aggregate": 1}
    assert stats.bytes <= bound
    buf.checkpoint()
    buf.close()
    assert StoreAndForward(tmp_path / "b.db", bound).stats().dropped == stats.dropped


def test_a_record_larger_than_the_bound_is_dropped_and_counted(tmp_path: Path) -> None:
    buf = StoreAndForward(tmp_path / "b.db", 50)
    buf.put([rec("small", "detection", b"{}"), rec("huge", "reading", b"x" * 1000)])
    assert [r.rid for r in buf.fetch()] == ["small"]
    assert buf.stats().dropped == {"reading": 1}


def test_bad_arguments_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_bytes 0 must be positive"):
        StoreAndForward(tmp_path / "b.db", 0)
    with pytest.raises(ConfigError, match="synchronous 'OFF'"):
        StoreAndForward(tmp_path / "b.db", 10, synchronous="OFF")  # type: ignore[arg-type]
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ConfigError, match=r"cannot open the store-and-forward buffer .*dir\.db"):
        StoreAndForward(tmp_path / "dir.db", 10)
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="cannot open the store-and-forward buffer"):
        StoreAndForward(tmp_path / "junk.db", 10)
    buf = StoreAndForward(tmp_path / "ok.db", 1000)
    with pytest.raises(ConfigError, match="kind 'telemetry' is unknown; use one of reading"):
        buf.put([rec("a", "telemetry")])


_KINDS = sorted(DROP_CLASS)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(1, 120)), min_size=1, max_size=8),
        min_size=1,
        max_size=12,
    ),
    st.integers(50, 600),
)
def test_the_bound_holds_and_drops_only_the_lowest_class_present(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[tuple[str, int]]], bound: int
) -> None:
    path = tmp_path_factory.mktemp("prop") / "b.db"
    buf = StoreAndForward(path, bound, synchronous="NORMAL")
    made = 0
    for batch in batches:
        before = buf.stats().dropped
        buf.put([rec(f"r{made + i}", kind, b"x" * n) for i, (kind, n) in enumerate(batch)])
        made += len(batch)
        after = buf.stats()
        assert after.bytes <= bound
        dropped_now = {k for k, v in after.dropped.items() if v > before.get(k, 0)}
        kept_classes = {DROP_CLASS[r.kind] for r in buf.fetch(limit=10_000)}
        for kind in dropped_now:  # nothing of a lower class survived a drop of this class
            assert all(c >= DROP_CLASS[kind] for c in kept_classes)
        # nothing is lost without being counted
        assert after.records + sum(after.dropped.values()) == made
        seqs = [r.seq for r in buf.fetch(limit=10_000)]
        assert seqs == sorted(seqs)
    buf.close()
    os.remove(path)
