"""The uplink against the real Kafka-compatible broker, its link cut by a proxy (never by
killing the broker): store and forward, replayed flags, order, live before backlog."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connectors.buffer import StoreAndForward, UplinkRecord
from connectors.kafka import ensure_topics
from connectors.uplink import LinkState, Uplink, UplinkEnvelope, dedupe_uplink, read_uplink
from infra.proxy import TcpProxy
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    with TcpProxy.for_kafka(settings.require_kafka_bootstrap()) as p:
        yield p


def records(prefix: str, n: int, kind: str = "aggregate", start: int = 0) -> list[UplinkRecord]:
    return [
        UplinkRecord(f"{prefix}{i}", kind, f"d{i % 3}", b'{"i": %d}' % i, 1_000 + i)
        for i in range(start, start + n)
    ]


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def envelopes(settings: Settings) -> list[UplinkEnvelope]:
    topic = KafkaTopics(settings.topic_prefix).edge_uplink
    return dedupe_uplink(read_uplink(settings.require_kafka_bootstrap(), topic))


def make(settings: Settings, proxy: TcpProxy, buffer: StoreAndForward, **kw: object) -> Uplink:
    topic = KafkaTopics(settings.topic_prefix).edge_uplink
    ensure_topics(settings.require_kafka_bootstrap(), [topic])
    kw.setdefault("stall_s", 2.0)
    return Uplink(buffer, proxy.address, topic, "gw1", **kw)  # type: ignore[arg-type]


def test_live_records_arrive_once_in_order_and_leave_the_buffer(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    buffer = StoreAndForward(tmp_path / "b.db", 10_000_000)
    uplink = make(settings, proxy, buffer)
    uplink.start()
    try:
        wait_for(lambda: uplink.stats().link is LinkState.UP, 15, "the link")
        buffer.put(records("r", 300))
        wait_for(lambda: buffer.stats().records == 0, 15, "confirmations")
    finally:
        uplink.stop()
    got = envelopes(settings)
    assert [e.id for e in got] == [f"r{i}" for i in range(300)]
    assert not any(e.replayed for e in got)
    assert {e.gateway_id for e in got} == {"gw1"}
    assert bytes(got[0].body) == b'{"i": 0}' and got[0].kind == "aggregate"
    assert [e.seq for e in got] == sorted(e.seq for e in got)


def test_a_gateway_that_starts_with_the_link_down_buffers_then_replays_in_order(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.cut()
    buffer = StoreAndForward(tmp_path / "b.db", 10_000_000)
    # the outage is the one the test makes: a reconnect slowed by a loaded machine must not
    # count as a second one (it would turn the live records into backlog)
    uplink = make(settings, proxy, buffer, stall_s=10.0)
    uplink.start()
    try:
        buffer.put(records("early", 200))
        time.sleep(1.5)
        assert uplink.stats().link is LinkState.DOWN
        assert buffer.stats().records == 200  # kept on disk
        proxy.restore()
        wait_for(lambda: uplink.stats().link is LinkState.UP, 15, "the link")
        buffer.put(records("late", 50))
        wait_for(lambda: buffer.stats().records == 0, 20, "the backlog")
    finally:
        uplink.stop()
    got = envelopes(settings)
    early = [e for e in got if e.id.startswith("early")]
    late = [e for e in got if e.id.startswith("late")]
    assert [e.id for e in early] == [f"early{i}" for i in range(200)]
    assert all(e.replayed for e in early) and not any(e.replayed for e in late)
    assert len(late) == 50


def test_a_cut_mid_stream_loses_nothing_and_a_restarted_uplink_resends_the_rest(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    path = tmp_path / "b.db"
    buffer = StoreAndForward(path, 10_000_000)
    uplink = make(settings, proxy, buffer)
    uplink.start()
    try:
        wait_for(lambda: uplink.stats().link is LinkState.UP, 15, "the link")
        buffer.put(records("a", 100))
        wait_for(lambda: buffer.stats().records == 0, 15, "the first records")
        proxy.cut()
        buffer.put(records("b", 400))
        wait_for(lambda: uplink.stats().link is LinkState.DOWN, 10, "the link to drop")
        assert buffer.stats().records == 400  # none confirmed: all kept on disk
    finally:
        uplink.stop(timeout_s=0.5)  # a gateway going down while the link is cut
    buffer.close()
    proxy.restore()
    again = StoreAndForward(path, 10_000_000)
    assert again.stats().records > 0
    second = make(settings, proxy, again)
    second.start()
    try:
        wait_for(lambda: again.stats().records == 0, 20, "the resend")
    finally:
        second.stop()
    got = envelopes(settings)
    ids = [e.id for e in got]
    assert sorted(ids) == sorted([f"a{i}" for i in range(100)] + [f"b{i}" for i in range(400)])
    assert [i for i in ids if i.startswith("b")] == [f"b{i}" for i in range(400)]
    assert second.stats().sent_replayed > 0


def test_live_data_is_not_starved_by_a_large_backfill(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    proxy.cut()
    buffer = StoreAndForward(tmp_path / "b.db", 100_000_000)
    buffer.put(records("old", 6000, kind="reading"))
    uplink = make(settings, proxy, buffer, backfill_per_s=2000.0)
    uplink.start()
    try:
        proxy.restore()
        wait_for(lambda: uplink.stats().link is LinkState.UP, 15, "the link")
        time.sleep(0.3)
        buffer.put(records("now", 20, kind="detection"))
        wait_for(lambda: buffer.stats().records == 0, 30, "everything")
    finally:
        uplink.stop()
    ids = [e.id for e in envelopes(settings)]
    first_live = ids.index("now0")
    assert ids.index("old5999") > first_live  # live went out while the backlog was still going
    assert [i for i in ids if i.startswith("old")] == [f"old{i}" for i in range(6000)]


def test_a_backlog_of_large_records_goes_out_whole_in_slices(
    settings: Settings, proxy: TcpProxy, tmp_path: Path
) -> None:
    """40 MB of 200 KB aggregate records: read from disk 1 MiB and queued 4 MiB at a time
    (bounded memory), yet every one arrives once, whole, in order.

    Live records put meanwhile arrive too; whether they overtake the backlog depends on
    how fast it drains (all of it went out before them in one CI run), so live-first is
    the starvation test's claim, not this one's."""
    proxy.cut()
    buffer = StoreAndForward(tmp_path / "b.db", 100_000_000)
    big = b'{"rows": "%s"}' % (b"x" * 200_000)
    buffer.put([UplinkRecord(f"old{i}", "aggregate", "gw1", big, i) for i in range(200)])
    uplink = make(settings, proxy, buffer)
    uplink.start()
    try:
        proxy.restore()
        wait_for(lambda: uplink.stats().link is LinkState.UP, 15, "the link")
        buffer.put(records("now", 5, kind="detection"))
        wait_for(lambda: buffer.stats().records == 0, 60, "everything")
    finally:
        uplink.stop()
    got = envelopes(settings)
    ids = [e.id for e in got]
    assert [i for i in ids if i.startswith("old")] == [f"old{i}" for i in range(200)]
    assert [i for i in ids if i.startswith("now")] == [f"now{i}" for i in range(5)]
    assert all(len(bytes(e.body)) == len(big) for e in got if e.id.startswith("old"))
