"""Dropping the ingest bridge's redelivered duplicates: the logic, its horizon and its
snapshots, and the Bytewax input that runs it, resumed from a real recovery store."""

from __future__ import annotations

import pickle
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.bridge import IngestBatch, ingest_record, topic_matcher, unwrap_records
from connectors.ingest import DedupedIngest
from connectors.reading_dedupe import RedeliveryFilter, message_digests
from iotflow.errors import ConfigError
from iotflow.events import DeviceMessage


def reading(device: int, n: int, received_ms: int = 0) -> DeviceMessage:
    return DeviceMessage(f"b/devices/d{device}/telemetry", b'{"n": %d}' % n, received_ms)


def feed(f: RedeliveryFilter, stream: list[tuple[DeviceMessage, bool]], cuts: list[int]) -> list:
    """Pass (message, marked) pairs through ``f`` in batches split at ``cuts``."""
    kept: list[DeviceMessage] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]
    for lo, hi in pairwise(bounds):
        batch = stream[lo:hi]
        kept += f.keep([m for m, _ in batch], [i for i, (_, marked) in enumerate(batch) if marked])
    return kept


@st.composite
def redelivered_streams(draw: st.DrawFn) -> tuple[list[tuple[DeviceMessage, bool]], list]:
    """Unique readings from a few devices; after some of them, marked copies (a broker
    resending them, received later), and some marked readings whose original never
    reached Kafka. Returns the stream and the readings a duplicate-free run would hold."""
    n = draw(st.integers(1, 60))
    devices = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    unique = [reading(d, i, received_ms=i) for i, d in enumerate(devices)]
    lost_original = draw(st.sets(st.integers(0, n - 1)))  # bridge died before producing it
    stream: list[tuple[DeviceMessage, bool]] = []
    for i, msg in enumerate(unique):
        stream.append((msg, i in lost_original))
    # Insert each redelivered copy anywhere after its first appearance.
    for i in draw(st.lists(st.integers(0, n - 1), max_size=40)):
        first = next(k for k, (m, _) in enumerate(stream) if m.payload == unique[i].payload)
        at = draw(st.integers(first + 1, len(stream)))
        copy = DeviceMessage(unique[i].topic, unique[i].payload, 10_000 + at)
        stream.insert(at, (copy, True))
    return stream, unique


@given(redelivered_streams(), st.lists(st.integers(0, 200), max_size=8))
def test_any_interleaving_of_redeliveries_yields_exactly_the_unique_readings_in_order(
    case: tuple[list[tuple[DeviceMessage, bool]], list[DeviceMessage]], cuts: list[int]
) -> None:
    stream, unique = case
    f = RedeliveryFilter(capacity=1000)
    kept = feed(f, stream, cuts)
    # The first copy of each reading, in the order they came: the original where it
    # reached Kafka (same receive time as a run without duplicates).
    assert kept == unique
    assert f.counts["duplicates"] == len(stream) - len(unique)
    assert f.counts["messages"] == len(stream)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=50), st.lists(st.integers(0, 60)))
def test_unmarked_messages_are_never_dropped_even_byte_for_byte_equal(
    devices: list[int], cuts: list[int]
) -> None:
    """Heartbeats without a timestamp repeat their bytes on purpose: all are kept."""
    stream = [(reading(d, 0, received_ms=i), False) for i, d in enumerate(devices)]
    f = RedeliveryFilter(capacity=4)
    assert feed(f, stream, cuts) == [m for m, _ in stream]
    assert f.counts["duplicates"] == 0


def test_the_key_is_topic_and_payload_never_the_receive_time() -> None:
    f = RedeliveryFilter(capacity=100)
    f.keep([reading(1, 7, received_ms=1)])
    state_topic = DeviceMessage("b/devices/d1/state", b'{"n": 7}', 2)  # same bytes, other topic
    other_device = reading(2, 7, received_ms=3)
    resent = reading(1, 7, received_ms=99_999)
    kept = f.keep([state_topic, other_device, resent], redelivered=[0, 1, 2])
    assert kept == [state_topic, other_device]
    assert message_digests([resent]) == message_digests([reading(1, 7)])
    assert [len(d) for d in message_digests([resent, state_topic])] == [8, 8]


def test_a_marked_first_delivery_of_repeated_bytes_is_kept_a_resend_of_it_is_not() -> None:
    """A heartbeat without a timestamp repeats its bytes; the broker marks whatever it had
    sent to a dead bridge, delivered or not. Only the same delivery again is a duplicate."""
    beat = reading(1, 0)
    f = RedeliveryFilter(capacity=100)
    assert f.keep([beat, beat], deliveries=[b"bridge/1", b"bridge/2"]) == [beat, beat]
    # Packet 3 reached the dead bridge but never Kafka: its marked resend is the first copy.
    assert f.keep([beat], redelivered=[0], deliveries=[b"bridge/3"]) == [beat]
    # Packet 2 did reach Kafka: its resend is dropped, and so is a second resend of 3.
    assert f.keep([beat, beat], redelivered=[0, 1], deliveries=[b"bridge/2", b"bridge/3"]) == []
    # The same packet id from another bridge's session is another delivery.
    assert f.keep([beat], redelivered=[0], deliveries=[b"other/2"]) == [beat]


@given(capacity=st.integers(1, 300), batch=st.integers(1, 50), total=st.integers(0, 2000))
@settings(max_examples=60, deadline=None)
def test_the_horizon_holds_capacity_messages_and_memory_stays_bounded(
    capacity: int, batch: int, total: int
) -> None:
    f = RedeliveryFilter(capacity=capacity)
    stream = [reading(0, i) for i in range(total)]
    for lo in range(0, total, batch):
        f.keep(stream[lo : lo + batch])
        # Never less than the last `capacity` messages, never more than that plus one
        # chunk (capacity / 16) plus the batch that filled it.
        assert min(capacity, lo + batch, total) <= f.remembered
        assert f.remembered <= capacity + max(1, capacity // 16) + batch
    # Every one of the last `capacity` messages is still recognised when resent...
    recent = stream[-capacity:]
    assert f.keep(recent, redelivered=range(len(recent))) == []
    # ...and one resent long past the horizon gets through (kept, as documented).
    if total > 2 * capacity + batch + capacity // 16 + 1:
        ancient = stream[0]
        assert f.keep([ancient], redelivered=[0]) == [ancient]


@given(
    capacity=st.integers(1, 40),
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=6),
        max_size=80,
    ),
)
@settings(max_examples=300, deadline=None)
def test_the_index_kept_during_redeliveries_answers_like_one_rebuilt_from_the_digests(
    capacity: int, batches: list[list[tuple[int, bool]]]
) -> None:
    """Payloads repeat (the same bytes again and again), marks come and go, the horizon
    turns over: the incrementally kept index never disagrees with the remembered digests."""
    kept_by = {}
    for rebuild in (False, True):
        f = RedeliveryFilter(capacity=capacity)
        kept: list[DeviceMessage] = []
        for batch in batches:
            if rebuild:
                f._index = None  # the reference: built afresh from the digests every time
            marked = [i for i, (_, mark) in enumerate(batch) if mark]
            kept += f.keep([reading(0, n) for n, _ in batch], marked)
        kept_by[rebuild] = kept
    assert kept_by[False] == kept_by[True]


@given(redelivered_streams(), st.integers(0, 200), st.lists(st.integers(0, 200), max_size=6))
def test_a_filter_restored_from_its_snapshot_drops_exactly_what_it_would_have(
    case: tuple[list[tuple[DeviceMessage, bool]], list[DeviceMessage]],
    cut: int,
    cuts: list[int],
) -> None:
    stream, unique = case
    cut = min(cut, len(stream))
    first = RedeliveryFilter(capacity=1000)
    before = feed(first, stream[:cut], cuts)
    # Through pickle, as Bytewax's recovery store keeps it.
    restored = RedeliveryFilter(
        capacity=1000, resume_state=pickle.loads(pickle.dumps(first.snapshot()))
    )
    after = feed(restored, stream[cut:], cuts)
    assert before + after == unique
    assert restored.counts["duplicates"] == len(stream) - len(unique)


def test_a_snapshot_is_not_changed_by_what_comes_after_it() -> None:
    f = RedeliveryFilter(capacity=64)
    f.keep([reading(0, 1)])
    snap = f.snapshot()
    f.keep([reading(0, 2), reading(0, 3)])
    restored = RedeliveryFilter(capacity=64, resume_state=snap)
    assert restored.remembered == 1
    assert restored.keep([reading(0, 2)], redelivered=[0]) == [reading(0, 2)]


def test_a_smaller_capacity_on_resume_forgets_the_oldest_first() -> None:
    f = RedeliveryFilter(capacity=1000)
    for i in range(100):
        f.keep([reading(0, i)])
    smaller = RedeliveryFilter(capacity=16, resume_state=f.snapshot())
    assert smaller.remembered == 16
    assert smaller.keep([reading(0, 99)], redelivered=[0]) == []
    assert smaller.keep([reading(0, 0)], redelivered=[0]) == [reading(0, 0)]


def test_bad_capacity_and_foreign_state_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="capacity 0 must be at least 1"):
        RedeliveryFilter(capacity=0)
    with pytest.raises(ConfigError, match=r"layout 7.*IOTFLOW_RECOVERY_DIR"):
        RedeliveryFilter(resume_state={"layout": 7, "capacity": 1, "digests": [], "counts": {}})
    with pytest.raises(ConfigError, match="layout None"):
        RedeliveryFilter(resume_state={"seen": []})


def test_on_batch_unwraps_records_and_counts_the_duplicates() -> None:
    def rec(n: int, marked: bool, topic: str = "b/devices/d1/telemetry") -> KafkaSourceMessage:
        key, value, headers = ingest_record(
            topic, b'{"n": %d}' % n, 1000 + n, delivery=b"br/%d" % n, redelivered=marked
        )
        return KafkaSourceMessage(key, value, headers=headers, timestamp=(1, 1000 + n))

    accept = topic_matcher(["b/devices/+/telemetry"])
    f = RedeliveryFilter(capacity=100, accept=accept)
    (first,) = f.on_batch([rec(1, False), rec(2, False), rec(3, False, "b/devices/d1/state")])
    assert [m.payload for m in first.messages] == [b'{"n": 1}', b'{"n": 2}']
    assert first.skipped == 1 and first.duplicates == 0
    (second,) = f.on_batch([rec(2, True), rec(4, True), rec(1, True)])
    assert [m.payload for m in second.messages] == [b'{"n": 4}']
    assert second.duplicates == 2 and second.redelivered == second.deliveries == []
    unwrapped = unwrap_records([rec(5, True), rec(6, False)])
    assert unwrapped.redelivered == [0] and unwrapped.deliveries == [b"br/5", b"br/6"]


# -- the Bytewax input, resumed from a real recovery store ---------------------------------


def _records(readings: list[tuple[int, int, bool]]) -> list[KafkaSourceMessage]:
    out = []
    for device, n, marked in readings:
        key, value, headers = ingest_record(
            f"b/devices/d{device}/telemetry",
            b'{"n": %d}' % n,
            5000 + n,
            delivery=b"br/%d" % n,
            redelivered=marked,
        )
        out.append(KafkaSourceMessage(key, value, headers=headers, timestamp=(1, 5000 + n)))
    return out


def _run(records: list[KafkaSourceMessage], store: Path, out: list[IngestBatch]) -> None:
    flow = Dataflow("dedupe")
    source = DedupedIngest(
        TestingSource(records, batch_size=7), topic_matcher(["b/devices/+/telemetry"]), 64
    )
    op.output("out", op.input("in", flow, source), TestingSink(out))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(store)))


def test_the_input_keeps_dropping_after_a_restart_from_the_recovery_store(tmp_path: Path) -> None:
    """Run 1 sees 40 readings of 8 devices and ends; run 2 resumes from its store and its
    input then brings the broker's resent copies (and two new readings): only the new pass."""
    init_db_dir(tmp_path, 1)
    originals = [(i % 8, i, False) for i in range(40)]
    first: list[IngestBatch] = []
    _run(_records(originals), tmp_path, first)
    assert [m.payload for b in first for m in b.messages] == [
        b'{"n": %d}' % n for _, n, _ in originals
    ]

    resent = [(i % 8, i, True) for i in range(20, 40)] + [(1, 100, True), (2, 101, False)]
    second: list[IngestBatch] = []
    _run(_records(originals + resent), tmp_path, second)  # resumes after the originals
    assert [m.payload for b in second for m in b.messages] == [b'{"n": 100}', b'{"n": 101}']
    assert sum(b.duplicates for b in second) == 20


def test_a_store_from_before_the_filter_resumes_its_source_with_an_empty_memory() -> None:
    source = DedupedIngest(TestingSource(_records([(0, 1, False), (0, 2, True)])), None, 64)
    (part,) = source.list_parts()
    resumed = source.build_part("in", part, 1)  # TestingSource's own state: the next index
    (batch,) = resumed.next_batch()
    assert [m.payload for m in batch.messages] == [b'{"n": 2}']  # nothing remembered: kept
    assert set(resumed.snapshot()) == {"source", "dedupe"}
    with pytest.raises(ConfigError, match="capacity 0"):
        DedupedIngest(TestingSource([]), None, 0)
