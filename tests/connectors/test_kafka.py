"""Kafka input and output (Bytewax's connectors) against the real Kafka-compatible broker."""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from confluent_kafka.admin import AdminClient, ConfigResource

from connectors.kafka import (
    COMPACTED,
    KafkaEpochOutput,
    KafkaInput,
    KafkaOutput,
    ensure_topics,
    message,
    read_topic,
)
from infra.stack import StackInfo


def test_output_creates_topics_and_input_reads_them_back(stack: StackInfo, names) -> None:
    a, b = f"{names.kafka_prefix}.a", f"{names.kafka_prefix}.b"
    out_flow = Dataflow("out")
    items = op.input(
        "in", out_flow, TestingSource([(a if i % 2 else b, f"k{i}", b"%d" % i) for i in range(100)])
    )
    op.output(
        "kafka",
        op.map("msg", items, lambda x: message(*x)),
        KafkaOutput(stack.kafka_bootstrap, [a, b]),
    )
    run_main(out_flow)

    assert sorted(int(r.value) for r in read_topic(stack.kafka_bootstrap, a)) == list(
        range(1, 100, 2)
    )
    got: list = []
    in_flow = Dataflow("in")
    msgs = op.input("kafka", in_flow, KafkaInput(stack.kafka_bootstrap, [a, b], tail=False))
    op.output("out", op.map("kv", msgs, lambda m: (m.key, int(m.value))), TestingSink(got))
    run_main(in_flow)
    assert sorted(got, key=lambda kv: kv[1]) == [(b"k%d" % i, i) for i in range(100)]


def test_input_on_a_missing_topic_creates_it_and_ends_empty(stack: StackInfo, names) -> None:
    topic = f"{names.kafka_prefix}.never-written"
    got: list = []
    flow = Dataflow("empty")
    op.output(
        "out",
        op.input("kafka", flow, KafkaInput(stack.kafka_bootstrap, [topic], tail=False)),
        TestingSink(got),
    )
    run_main(flow)
    assert got == []
    ensure_topics(stack.kafka_bootstrap, [topic])  # already there: no error


def test_topics_created_with_a_config_carry_it(stack: StackInfo, names) -> None:
    twins, plain = f"{names.kafka_prefix}.twins", f"{names.kafka_prefix}.plain"
    ensure_topics(stack.kafka_bootstrap, [twins, plain], configs={twins: COMPACTED})
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    described = admin.describe_configs(
        [ConfigResource(ConfigResource.Type.TOPIC, t) for t in (twins, plain)]
    )
    configs = {res.name: fut.result(10) for res, fut in described.items()}
    assert configs[twins]["cleanup.policy"].value == "compact"
    # a topic created without a config keeps the broker's default (delete), however reported
    assert "compact" not in (getattr(configs[plain].get("cleanup.policy"), "value", None) or "")


def test_epoch_output_takes_lists_of_records_beside_messages(stack: StackInfo, names) -> None:
    """A step that emits many records hands them over as one list; they arrive as sent."""
    topic = f"{names.kafka_prefix}.records"
    part = KafkaEpochOutput(stack.kafka_bootstrap, [topic]).build_part("kafka", "kafka", None)
    part.write_batch(
        [[(topic, b"k%d" % i, b"%d" % i) for i in range(50)], message(topic, "k50", b"50")]
    )
    part.snapshot()  # the epoch ends: every record is in the topic
    got = sorted((r.key, int(r.value)) for r in read_topic(stack.kafka_bootstrap, topic))
    assert got == sorted((b"k%d" % i, i) for i in range(51))
    part.close()


def test_epoch_output_without_recovery_delivers_everything_by_close(
    stack: StackInfo, names
) -> None:
    """Without a recovery store an epoch's end does not wait for the broker; closing the
    sink (end of input) still waits until every record is acknowledged."""
    topic = f"{names.kafka_prefix}.records"
    sink = KafkaEpochOutput(stack.kafka_bootstrap, [topic], recovery=False)
    part = sink.build_part("kafka", "kafka", None)
    for epoch in range(3):
        part.write_batch([[(topic, b"k%d-%d" % (epoch, i), b"%d" % i) for i in range(1000)]])
        part.snapshot()
    part.close()
    got = {r.key for r in read_topic(stack.kafka_bootstrap, topic)}
    assert got == {b"k%d-%d" % (e, i) for e in range(3) for i in range(1000)}


def test_epoch_output_creates_its_topics_at_start_up(stack: StackInfo, names) -> None:
    """Bytewax asks for the sink's parts at start-up and builds the part on the first
    item: the topics exist before any record, and the part built later is the producer
    started then, delivering as usual."""
    topic = f"{names.kafka_prefix}.early"
    sink = KafkaEpochOutput(stack.kafka_bootstrap, [topic])
    assert sink.list_parts() == ["kafka"]
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    assert topic in admin.list_topics(timeout=10).topics
    part = sink.build_part("kafka", "kafka", None)
    part.write_batch([message(topic, "k", b"1")])
    part.close()
    assert [(r.key, r.value) for r in read_topic(stack.kafka_bootstrap, topic)] == [(b"k", b"1")]
