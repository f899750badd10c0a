"""The project's Kafka-protocol broker, driven by confluent-kafka (librdkafka) over loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.kafka_broker import EmbeddedKafka
from infra.kafka_broker.log import AppendError, PartitionLog
from infra.stack import LocalStack
from iotflow.errors import StackError
from iotflow.settings import Settings


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka().start() as running:
        yield running


def _topic() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _create(bootstrap: str, name: str, partitions: int = 1, **configs: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1, config=configs)])[name].result(10)


def _consume(bootstrap: str, topic: str, partitions: int, expected: int, **conf: object) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test", **conf})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    got: list = []
    deadline = time.monotonic() + 20
    while len(got) < expected and time.monotonic() < deadline:
        for message in consumer.consume(1000, 0.2):
            assert message.error() is None, message.error()
            got.append(message)
    consumer.close()
    return got


def test_round_trip_keeps_keys_headers_order_and_dense_offsets(broker: EmbeddedKafka) -> None:
    topic = _topic()
    _create(broker.bootstrap, topic, partitions=3)
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 2}
    )
    for i in range(3000):
        producer.produce(
            topic, f"v{i}".encode(), key=f"k{i % 7}", headers={"n": str(i)}, partition=i % 3
        )
    assert producer.flush(10) == 0
    got = _consume(broker.bootstrap, topic, 3, 3000)
    assert len(got) == 3000
    for p in range(3):
        mine = [m for m in got if m.partition() == p]
        assert [m.offset() for m in mine] == list(range(1000))
        assert [int(m.value()[1:]) for m in mine] == list(range(p, 3000, 3))
        assert all(dict(m.headers())["n"] == m.value()[1:] for m in mine)
        assert all(m.key() == f"k{int(m.value()[1:]) % 7}".encode() for m in mine)


def test_compressed_batches_come_back_byte_for_byte(broker: EmbeddedKafka) -> None:
    topic = _topic()
    _create(broker.bootstrap, topic)
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "compression.type": "zstd", "linger.ms": 5}
    )
    values = [uuid.uuid4().bytes * 20 for _ in range(500)]
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(10) == 0
    assert [m.value() for m in _consume(broker.bootstrap, topic, 1, 500)] == values


def test_watermarks_and_offsets_for_times(broker: EmbeddedKafka) -> None:
    topic = _topic()
    _create(broker.bootstrap, topic)
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
    for i in range(10):
        producer.produce(topic, b"x", timestamp=1_000_000 + i * 1000)
        producer.flush(10)
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "times"})
    assert consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10) == (0, 10)
    found = consumer.offsets_for_times([TopicPartition(topic, 0, 1_004_500)], timeout=10)
    assert found[0].offset == 5
    consumer.close()


def test_committed_offsets_of_an_assigned_consumer(broker: EmbeddedKafka) -> None:
    topic = _topic()
    _create(broker.bootstrap, topic, partitions=2)
    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    consumer.commit(
        offsets=[TopicPartition(topic, 0, 42), TopicPartition(topic, 1, 7)], asynchronous=False
    )
    committed = consumer.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
    assert [tp.offset for tp in committed] == [42, 7]
    consumer.close()


def test_topic_admin_and_configs(broker: EmbeddedKafka) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    topic = _topic()
    _create(broker.bootstrap, topic, partitions=4, **{"cleanup.policy": "compact"})
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 4
    described = admin.describe_configs([ConfigResource("topic", topic)])
    configs = next(iter(described.values())).result(10)
    assert configs["cleanup.policy"].value == "compact"
    assert configs["max.message.bytes"].value == "1048588"
    with pytest.raises(KafkaException) as exists:
        _create(broker.bootstrap, topic)
    assert exists.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
    admin.delete_topics([topic])[topic].result(10)
    assert topic not in admin.list_topics(timeout=10).topics


@pytest.mark.parametrize(
    ("name", "partitions", "configs", "code", "words"),
    [
        ("bad/name", 1, {}, KafkaError.TOPIC_EXCEPTION, "bad/name"),
        ("x" * 250, 1, {}, KafkaError.TOPIC_EXCEPTION, "1-249"),
        ("..", 1, {}, KafkaError.TOPIC_EXCEPTION, "'..'"),
        ("ok-name", 1, {"cleanup.policy": "shred"}, KafkaError.INVALID_CONFIG, "shred"),
        ("ok-name2", 1, {"max.message.bytes": "NaN"}, KafkaError.INVALID_CONFIG, "NaN"),
    ],
)
def test_bad_topics_are_refused_with_the_reason(
    broker: EmbeddedKafka, name: str, partitions: int, configs: dict, code: int, words: str
) -> None:
    with pytest.raises(KafkaException) as refused:
        _create(broker.bootstrap, name, partitions, **configs)
    assert refused.value.args[0].code() == code
    assert words in refused.value.args[0].str()
    assert (
        name
        not in AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    )


def test_a_batch_over_max_message_bytes_is_refused_and_the_rest_kept(broker: EmbeddedKafka) -> None:
    topic = _topic()
    _create(broker.bootstrap, topic, **{"max.message.bytes": "2000"})
    errors: list = []
    producer = Producer(
        {"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "message.max.bytes": 100_000}
    )
    producer.produce(topic, b"small")
    producer.flush(10)
    producer.produce(topic, b"x" * 5000, on_delivery=lambda err, _m: errors.append(err))
    producer.flush(10)
    producer.produce(topic, b"after")
    producer.flush(10)
    assert errors[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    assert [m.value() for m in _consume(broker.bootstrap, topic, 1, 2)] == [b"small", b"after"]


def test_unknown_topic_without_auto_create() -> None:
    with EmbeddedKafka(auto_create_topics=False).start() as strict:
        errors: list = []
        producer = Producer(
            {"bootstrap.servers": strict.bootstrap, "message.timeout.ms": 1500, "linger.ms": 0}
        )
        producer.produce("never-made", b"x", on_delivery=lambda err, _m: errors.append(err))
        producer.flush(10)
        assert errors and errors[0] is not None
        assert errors[0].code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._MSG_TIMED_OUT)


def test_auto_created_on_a_producers_metadata_request(broker: EmbeddedKafka) -> None:
    topic = _topic()
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, b"first")
    assert producer.flush(10) == 0
    assert [m.value() for m in _consume(broker.bootstrap, topic, 1, 1)] == [b"first"]


def test_garbage_on_a_connection_closes_only_that_connection(broker: EmbeddedKafka) -> None:
    for junk in (
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x09" + b"\x00" * 9,
        struct.pack(">i", 10) + b"\x00\x03" * 5,
    ):
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
            sock.sendall(junk)
            sock.settimeout(5)
            assert sock.recv(64) == b""  # closed by the broker
    topic = _topic()
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(topic, b"still serving")
    assert producer.flush(10) == 0


def test_a_long_poll_fetch_returns_when_a_batch_arrives(broker: EmbeddedKafka) -> None:
    """The consumer waits up to 10 s per fetch, yet gets a record produced later at once."""
    topic = _topic()
    _create(broker.bootstrap, topic)
    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": "poll", "fetch.wait.max.ms": 10_000}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    assert consumer.poll(1.0) is None  # the fetch is now parked at the broker
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
    producer.produce(topic, b"wake")
    producer.flush(10)
    started = time.monotonic()
    message = consumer.poll(8.0)
    assert message is not None and message.value() == b"wake"
    assert time.monotonic() - started < 8.0  # not held for the fetch's 10 s
    consumer.close()


def test_retention_moves_the_log_start_and_readers_resume_there() -> None:
    with EmbeddedKafka(retention_bytes=20_000).start() as small:
        topic = _topic()
        _create(small.bootstrap, topic)
        producer = Producer({"bootstrap.servers": small.bootstrap, "linger.ms": 0})
        for i in range(200):
            producer.produce(topic, f"{i:04d}".encode() * 50)
            producer.flush(10)
        consumer = Consumer(
            {"bootstrap.servers": small.bootstrap, "group.id": "r", "auto.offset.reset": "earliest"}
        )
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        assert 0 < low < high == 200
        consumer.assign([TopicPartition(topic, 0, 0)])  # below the log start: out of range
        got: list[int] = []
        deadline = time.monotonic() + 20
        while len(got) < high - low and time.monotonic() < deadline:
            got += [m.offset() for m in consumer.consume(500, 0.2) if m.error() is None]
        consumer.close()
        assert got == list(range(low, high))


def test_the_stack_starts_it_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLOW_KAFKA_BROKER", "embedded")
    settings = Settings(mqtt_url="mqtt://127.0.0.1:1")  # only Kafka is started
    with LocalStack.start(tmp_path, settings, write_state=False) as stack:
        assert [p.name for p in stack.info.processes] == ["embedded-kafka"]
        producer = Producer({"bootstrap.servers": stack.info.kafka_bootstrap})
        producer.produce("via-stack", b"x")
        assert producer.flush(10) == 0
    monkeypatch.setenv("IOTFLOW_KAFKA_BROKER", "redpanda")
    with pytest.raises(StackError, match="'redpanda' is not understood"):
        LocalStack.start(tmp_path, settings, write_state=False)


# -- the log on its own: batches built by hand --------------------------------------


def _batch(
    count: int, producer_id: int = -1, epoch: int = 0, seq: int = -1, ts_ms: int = 0
) -> bytes:
    """A record batch header (magic 2) for ``count`` records with an empty body."""
    body = struct.pack(">hiqqqhii", 0, count - 1, ts_ms, ts_ms, producer_id, epoch, seq, count)
    return struct.pack(">qii", 0, 4 + 1 + 4 + len(body), -1) + b"\x02" + b"\x00" * 4 + body


def test_idempotent_resend_is_not_appended_twice_and_gaps_are_refused() -> None:
    log = PartitionLog(retention_bytes=1 << 20)
    assert log.append(memoryview(_batch(3, producer_id=7, seq=0)), 1 << 20) == 0
    assert log.append(memoryview(_batch(2, producer_id=7, seq=3)), 1 << 20) == 3
    assert log.append(memoryview(_batch(3, producer_id=7, seq=0)), 1 << 20) == 0  # resend
    assert log.next_offset == 5
    with pytest.raises(AppendError, match="sequence 9, expected 5") as gap:
        log.append(memoryview(_batch(1, producer_id=7, seq=9)), 1 << 20)
    assert gap.value.code == 45
    assert log.append(memoryview(_batch(1, producer_id=7, epoch=1, seq=0)), 1 << 20) == 5
    with pytest.raises(AppendError, match="fenced") as fenced:
        log.append(memoryview(_batch(1, producer_id=7, epoch=0, seq=5)), 1 << 20)
    assert fenced.value.code == 47
    assert log.next_offset == 6


@pytest.mark.parametrize(
    ("records", "words"),
    [
        (b"", "no record batch"),
        (b"\x00" * 20, "trailing bytes"),
        (_batch(1)[:8] + struct.pack(">i", 500) + _batch(1)[12:], "overruns"),
        (_batch(1)[:16] + b"\x01" + _batch(1)[17:], "message format 1"),
    ],
)
def test_malformed_batches_are_refused(records: bytes, words: str) -> None:
    log = PartitionLog(retention_bytes=1 << 20)
    with pytest.raises(AppendError, match=words):
        log.append(memoryview(records), 1 << 20)
    assert log.next_offset == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.data())
def test_offsets_are_dense_and_a_read_starts_at_the_batch_holding_the_offset(
    counts: list[int], data: st.DataObject
) -> None:
    log = PartitionLog(retention_bytes=1 << 30)
    bases = [log.append(memoryview(_batch(n)), 1 << 20) for n in counts]
    assert bases == [sum(counts[:i]) for i in range(len(counts))]
    assert log.next_offset == sum(counts)
    offset = data.draw(st.integers(0, sum(counts) - 1))
    first = log.read(offset, 1)[0]
    (base,) = struct.unpack_from(">q", first, 0)
    (last_delta,) = struct.unpack_from(">i", first, 23)
    assert base <= offset <= base + last_delta
    assert log.read(sum(counts), 1 << 20) == []


def test_a_waiting_fetch_is_woken_by_an_append() -> None:
    async def scenario() -> bool:
        log = PartitionLog(retention_bytes=1 << 20)
        woken = asyncio.get_running_loop().create_future()
        log.waiter(woken)
        log.append(memoryview(_batch(1)), 1 << 20)
        return woken.done()

    assert asyncio.run(scenario())


def _poll_all(
    consumers: list[Consumer], seen: dict[int, set[bytes]], until: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(s) for s in seen.values()) < until and time.monotonic() < deadline:
        for i, consumer in enumerate(consumers):
            for message in consumer.consume(500, 0.1):
                if message.error() is None:
                    seen.setdefault(i, set()).add(message.value())


def test_a_consumer_group_shares_partitions_and_rebalances_when_a_member_leaves(
    broker: EmbeddedKafka,
) -> None:
    topic, group = _topic(), f"g-{uuid.uuid4().hex[:6]}"
    _create(broker.bootstrap, topic, partitions=4)
    conf = {
        "bootstrap.servers": broker.bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 200,
    }
    first, second = Consumer(conf), Consumer(conf)
    first.subscribe([topic])
    second.subscribe([topic])
    # the group settles with both members before anything is produced: a member that
    # joins late would otherwise find every record consumed by the other
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (first.assignment() and second.assignment()):
        for consumer in (first, second):
            consumer.consume(10, 0.1)
    assert first.assignment() and second.assignment(), (
        "the group never gave both members partitions"
    )
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(400):
        producer.produce(topic, f"a{i}".encode(), partition=i % 4)
    producer.flush(10)
    seen: dict[int, set[bytes]] = {}
    _poll_all([first, second], seen, 400, 30)
    assert set().union(*seen.values()) == {f"a{i}".encode() for i in range(400)}
    assert (
        seen[0].isdisjoint(seen[1]) and seen[0] and seen[1]
    )  # each member got partitions of its own
    assert sorted(tp.partition for tp in first.assignment() + second.assignment()) == [0, 1, 2, 3]

    first.commit(asynchronous=False)
    second.commit(asynchronous=False)
    second.close()  # LeaveGroup: the first member takes every partition
    for i in range(400):
        producer.produce(topic, f"b{i}".encode(), partition=i % 4)
    producer.flush(10)
    after: dict[int, set[bytes]] = {}
    _poll_all([first], after, 400, 30)
    assert after[0] == {f"b{i}".encode() for i in range(400)}  # nothing of the first round again
    assert sorted(tp.partition for tp in first.assignment()) == [0, 1, 2, 3]
    first.close()


def test_a_silent_member_is_dropped_after_its_session_timeout() -> None:
    async def scenario() -> tuple[list[str], list[str], int]:
        from infra.kafka_broker.groups import GroupCoordinator

        now = [0.0]
        groups = GroupCoordinator(clock=lambda: now[0])
        one = await groups.join("g", "", "consumer", [("range", b"m1")], 1000, 1000)
        assert (one.error, one.leader, one.members) == (0, one.member_id, ((one.member_id, b"m1"),))
        assert await groups.sync("g", one.generation, one.member_id, [(one.member_id, b"all")]) == (
            0,
            b"all",
        )
        two = asyncio.ensure_future(
            groups.join("g", "", "consumer", [("range", b"m2")], 1000, 1000)
        )
        await asyncio.sleep(0)
        assert groups.heartbeat("g", one.generation, one.member_id) == 27  # rejoin, please
        before = groups.describe("g")[2]
        now[0] = 5.0  # the first member never rejoins and goes silent
        groups.expire()
        joined = await two
        return before, groups.describe("g")[2], joined.generation - one.generation

    before, after, generations = asyncio.run(scenario())
    assert len(before) == 2 and len(after) == 1 and generations == 1
