"""The gateway's MQTT source against the real broker: a burst waits in the broker, not in
the gateway, and still arrives whole and in order; the sink's disk queue is bounded in bytes."""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

import pytest

from connectors.gateway import AckChannel, ByteBoundedQueue, GatewaySource
from connectors.mqtt import connect_client
from infra.stack import StackInfo
from iotflow.topics import MqttTopics

BURST = 20_000
BATCH = 50
ONE_READ = 256 * 1024 // 50  # most messages one 256 KiB socket read holds (each is 55+ bytes)


def _burst(url: str, topics: MqttTopics) -> None:
    """``BURST`` QoS 0 readings from ten devices, published as fast as the client goes."""
    publisher = connect_client(url)
    infos = [
        publisher.publish(topics.telemetry(f"d{i % 10}"), b'{"ts": %d}' % (1767268800000 + i))
        for i in range(BURST)
    ]
    for info in infos:
        info.wait_for_publish(30)
    publisher.disconnect()
    publisher.loop_stop()


def _gateway(stack: StackInfo, names, topics: MqttTopics):
    source = GatewaySource(
        stack.mqtt_url, f"gw-{names.mqtt_base}", [topics.telemetry()], AckChannel(),
        base=names.mqtt_base, batch_size=BATCH,
    )  # fmt: skip
    return source.build("gateway", 0, 1)


def _wait_for_a_batch(partition) -> None:
    deadline = time.monotonic() + 10
    while partition.waiting < BATCH and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_burst_waits_in_the_broker_and_arrives_whole(stack: StackInfo, names) -> None:
    topics = MqttTopics(names.mqtt_base)
    partition = _gateway(stack, names, topics)
    try:
        _burst(stack.mqtt_url, topics)
        _wait_for_a_batch(partition)
        time.sleep(1.0)  # room for the client to read on, were it unbounded
        # the dataflow has not polled: the gateway holds a batch and one socket read at most
        assert BATCH <= partition.waiting <= BATCH + ONE_READ

        got: dict[str, list[int]] = defaultdict(list)
        received = 0
        deadline = time.monotonic() + 60
        while received < BURST and time.monotonic() < deadline:
            for inbound in partition.next_batch():
                assert len(inbound.messages) <= BATCH
                for m in inbound.messages:
                    got[m.topic].append(int(m.payload[7:-1]))
                received += len(inbound.messages)
        assert received == BURST
        for device, stamps in got.items():
            assert stamps == sorted(stamps), device
    finally:
        partition.close()


def test_closing_while_a_burst_waits_returns(stack: StackInfo, names) -> None:
    topics = MqttTopics(names.mqtt_base)
    partition = _gateway(stack, names, topics)
    _burst(stack.mqtt_url, topics)
    _wait_for_a_batch(partition)
    partition.close()  # the client's thread, held for room, lets go (else the test times out)
    assert partition.waiting >= BATCH


def test_the_disk_queue_is_bounded_in_bytes_and_keeps_order() -> None:
    q = ByteBoundedQueue(1000)
    assert q.put("small", 400)
    assert q.put("small2", 400)
    assert not q.put("checkpoint", 300, timeout_s=0.05)  # 1,100 bytes would wait
    got: list[str] = []

    def later() -> None:
        time.sleep(0.1)
        got.append(q.get())

    t = threading.Thread(target=later)
    t.start()
    assert q.put("checkpoint", 300, timeout_s=5)  # room once the first item is taken
    t.join()
    assert got == ["small"] and q.waiting_bytes == 700
    assert [q.get(), q.get()] == ["small2", "checkpoint"]
    # an item larger than the bound goes in alone, and nothing passes it
    assert q.put("huge", 5000, timeout_s=0)
    assert not q.put("next", 1, timeout_s=0.05)
    assert q.get() == "huge" and q.put("next", 1, timeout_s=0)
    assert q.get() == "next" and q.empty()
    with pytest.raises(queue.Empty):
        q.get(timeout_s=0.01)
