"""The monitoring flow end to end: real MQTT in, real Kafka and DuckDB out, exact detections.

"Summer afternoon": four devices in two zones report a sine wave every 10 s
for five minutes; the south zone warms one degree a minute, the north stays
cool; two readings are spiked. "Surge of anomalous readings": many devices of
one zone spike at once. Both run as a real ``python -m bytewax.run`` subprocess.
"""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import yaml

from connectors.kafka import read_topic
from infra.flowproc import FlowProcess
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, MqttTopics

T0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z, a minute boundary
DIMS = {
    "h1": {"zone": "south"},
    "h2": {"zone": "south"},
    "c1": {"zone": "north"},
    "c2": {"zone": "north"},
}
DEPLOYMENT = {
    "aggregation": {
        "window": {"kind": "tumbling", "length": "1m"},
        "allowed_lateness": "30s",
        "stats": ["avg", "max", "device_count"],
        "group_by": [["device"], ["zone"]],
    },
    "anomalies": [{"kind": "zscore", "metric": "temperature", "window": 10, "k": 6.0}],
    "patterns": {
        # window results of different shards close at different times: hold the
        # watermark back by more than the span a replay can skew them
        "allowed_lateness": "5m",
        "patterns": [
            {
                "name": "overheating",
                "kind": "threshold",
                "input": "windows",
                "condition": "temperature_avg > 30",
                "times": 3,
            },
            {
                "name": "zone_surge",
                "kind": "correlation",
                "input": "readings",
                "condition": "temperature > 60",
                "group_by": "zone",
                "min_keys": 3,
                "within": "30s",
            },
        ],
    },
    "dimensions": DIMS,
}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def run(
    settings: Settings,
    tmp_path: Path,
    messages: list[tuple[str, bytes]],
    mqtt_publish,
    deployment: dict | None = None,
) -> Settings:
    path = tmp_path / "monitoring.yaml"
    path.write_text(yaml.safe_dump(deployment or DEPLOYMENT))
    settings = settings.model_copy(
        update={
            "monitoring": path,
            "mqtt_idle_stop_s": 2.0,
            "max_future_skew_s": 1e9,
            "mqtt_client_id": f"monitoring-{settings.topic_prefix}",
        }
    )
    with FlowProcess.start(
        "dataflows.monitoring:flow", settings, log=tmp_path / "flow.log"
    ) as proc:
        proc.wait_online()
        mqtt_publish(settings.require_mqtt_url(), messages)
        assert proc.wait(120) == 0, proc.log.read_text()
    return settings


def afternoon() -> list[tuple[str, int, float]]:
    rows = []
    for device, base0, slope in (
        ("h1", 29.0, 1.0),
        ("h2", 29.0, 1.0),
        ("c1", 20.0, 0.0),
        ("c2", 20.0, 0.0),
    ):
        for i in range(30):
            minute, k = divmod(i, 6)
            value = base0 + slope * minute + 0.5 * math.sin(2 * math.pi * k / 6)
            rows.append((device, T0 + i * 10_000, round(value, 6)))
    spikes = {("c1", T0 + 150_000): 15.0, ("h2", T0 + 200_000): 15.0}
    return [(d, ts, round(v + spikes.get((d, ts), 0.0), 6)) for d, ts, v in rows]


def test_summer_afternoon_gives_exact_windows_and_detections(
    settings: Settings, tmp_path: Path, mqtt_publish
) -> None:
    topics = MqttTopics(settings.mqtt_base)
    # in time order, as devices report concurrently (the watermark is shared by a shard)
    rows = sorted(afternoon(), key=lambda r: r[1])
    messages = [
        (topics.telemetry(d), json.dumps({"ts": ts, "temperature": v}).encode())
        for d, ts, v in rows
    ]
    messages.append((topics.telemetry("h1"), b'{"ts": "yesterday", "temperature": 1}'))
    deployment = copy.deepcopy(DEPLOYMENT)
    deployment["aggregation"]["kpis"] = {"avg_share": "temperature_avg / temperature_device_count"}
    settings = run(settings, tmp_path, messages, mqtt_publish, deployment)

    kafka = KafkaTopics(settings.topic_prefix)
    bootstrap = settings.require_kafka_bootstrap()
    aggregates = [json.loads(r.value) for r in read_topic(bootstrap, kafka.aggregates)]
    # 5 minutes x (4 devices + 2 zones), statistics and the KPI
    assert len(aggregates) == 60
    south = sorted(
        (a["window_start"], a["avg"], a["device_count"])
        for a in aggregates
        if a["key"] == "zone=south" and a["metric"] == "temperature"
    )
    # south: 29, 30, 31, 32, 33 (the sine sums to zero over a minute), h2's +15 spike in minute 3
    expected = [29.0, 30.0, 31.0, 32.0 + 15.0 / 12, 33.0]
    assert [s[0] for s in south] == [iso(T0 + m * 60_000) for m in range(5)]
    assert all(math.isclose(s[1], e, abs_tol=1e-9) for s, e in zip(south, expected, strict=True))
    assert {s[2] for s in south} == {2}
    share = sorted(
        (a["window_start"], a["value"])
        for a in aggregates
        if a["key"] == "zone=south" and a["metric"] == "avg_share"
    )
    assert all(
        math.isclose(s[1], e / 2, abs_tol=1e-9) for s, e in zip(share, expected, strict=True)
    )

    detections = [json.loads(r.value) for r in read_topic(bootstrap, kafka.detections)]
    found = sorted((d["rule"], d["key"], d["ts"]) for d in detections)
    # z-score: exactly the two spikes; overheating: three consecutive windows above 30
    # (minutes 2, 3, 4) for h1 and south; h2's spiked minute 3 does not add a window
    assert found == sorted(
        [
            ("zscore:temperature", "c1", iso(T0 + 150_000)),
            ("zscore:temperature", "h2", iso(T0 + 200_000)),
            ("overheating", "h1", iso(T0 + 300_000)),
            ("overheating", "h2", iso(T0 + 300_000)),
            ("overheating", "zone=south", iso(T0 + 300_000)),
        ]
    ), detections
    spike = next(d for d in detections if d["key"] == "c1")
    assert spike["value"] == 35.0 and abs(spike["baseline"] - 20.0) < 0.5 and spike["score"] > 6

    dead = [json.loads(r.value) for r in read_topic(bootstrap, kafka.deadletter)]
    assert len(dead) == 1 and "yesterday" in dead[0]["reason"]

    con = duckdb.connect(str(settings.duckdb), read_only=True)
    assert con.execute("SELECT count(*) FROM aggregates").fetchone() == (60,)
    shares = con.execute(
        "SELECT value FROM aggregates WHERE key = 'zone=south' AND metric = 'avg_share' "
        "ORDER BY window_start"
    ).fetchall()
    assert [round(v, 9) for (v,) in shares] == [round(e / 2, 9) for e in expected]
    assert con.execute("SELECT count(*) FROM detections").fetchone() == (5,)
    con.close()


def test_surge_of_anomalous_readings_in_one_zone(
    settings: Settings, tmp_path: Path, mqtt_publish
) -> None:
    topics = MqttTopics(settings.mqtt_base)
    devices = {f"s{i}": {"zone": "lab"} for i in range(5)} | {
        f"o{i}": {"zone": "office"} for i in range(5)
    }
    DEPLOYMENT["dimensions"] = devices
    try:
        # lab: four devices cross 60 five seconds apart (T0+40..55 s): three within 30 s.
        # office: three cross 60 twenty seconds apart (T0+10, 30, 50 s): never three within 30 s.
        spikes = {
            ("s0", T0 + 40_000): 70.0,
            ("s1", T0 + 45_000): 71.0,
            ("s2", T0 + 50_000): 72.0,
            ("s3", T0 + 55_000): 73.0,
            ("o0", T0 + 10_000): 65.0,
            ("o1", T0 + 30_000): 65.0,
            ("o2", T0 + 50_000): 65.0,
        }
        rows = [
            (d, T0 + i * 5_000, spikes.get((d, T0 + i * 5_000), 21.0))  # in time order
            for i in range(14)
            for d in devices
        ]
        messages = [
            (topics.telemetry(d), json.dumps({"ts": ts, "temperature": v}).encode())
            for d, ts, v in rows
        ]
        settings = run(settings, tmp_path, messages, mqtt_publish)
    finally:
        DEPLOYMENT["dimensions"] = DIMS
    bootstrap = settings.require_kafka_bootstrap()
    detections = [
        json.loads(r.value)
        for r in read_topic(bootstrap, KafkaTopics(settings.topic_prefix).detections)
    ]
    surges = [d for d in detections if d["rule"] == "zone_surge"]
    # the third lab device completes the surge; then the group starts afresh and the
    # fourth is alone
    assert [(d["key"], d["ts"]) for d in surges] == [("lab", iso(T0 + 50_000))], surges


def test_peer_rule_groups_devices_by_registry_building_and_floor(
    settings: Settings, tmp_path: Path, mqtt_publish
) -> None:
    # no dimensions in the deployment: building and floor come from the registry file
    registry = {
        "models": {"temp": {"properties": {"temperature": {"type": "float"}}}},
        "devices": {
            f"a{i}": {"model": "temp", "building": "A", "floor": 1 if i <= 4 else 2}
            for i in range(1, 9)
        },
    }
    registry_path = tmp_path / "registry.yaml"
    registry_path.write_text(yaml.safe_dump(registry))
    deployment = {
        "aggregation": {
            "window": {"kind": "tumbling", "length": "1m"},
            "allowed_lateness": "30s",
            "stats": ["avg", "device_count"],
            "group_by": [["device"], ["building", "floor"]],
        },
        "anomalies": [
            {"kind": "peer", "column": "temperature_avg", "dimension": ["building", "floor"]}
        ],
    }
    # floor 1 at 20 degrees but a4 at 26; floor 2 at 26: only a4 deviates from its floor
    level = {"a1": 20.0, "a2": 20.2, "a3": 20.4, "a4": 26.0}
    level |= {"a5": 26.0, "a6": 26.2, "a7": 26.4, "a8": 26.6}
    topics = MqttTopics(settings.mqtt_base)
    messages = [
        (topics.telemetry(d), json.dumps({"ts": T0 + i * 10_000, "temperature": v}).encode())
        for i in range(6)
        for d, v in level.items()
    ]
    settings = run(
        settings.model_copy(update={"registry": registry_path}),
        tmp_path,
        messages,
        mqtt_publish,
        deployment,
    )
    bootstrap = settings.require_kafka_bootstrap()
    kafka = KafkaTopics(settings.topic_prefix)
    groups = sorted(
        (a["key"], a["device_count"])
        for a in (json.loads(r.value) for r in read_topic(bootstrap, kafka.aggregates))
        if a["group_by"] == "building+floor"
    )
    assert groups == [("building=A|floor=1", 4), ("building=A|floor=2", 4)]
    detections = [json.loads(r.value) for r in read_topic(bootstrap, kafka.detections)]
    assert [
        (d["rule"], d["key"], d["details"]["group"], d["details"]["peers"]) for d in detections
    ] == [("peer:building+floor:temperature_avg", "a4", "building=A|floor=1", 3)], detections


def test_aggregate_records_carry_iso_window_times_in_key_and_value() -> None:
    """Each result row is one record keyed group_by|key|metric|start|end; rows of different
    windows (and a bound that is not a whole second) each get their own times."""
    import polars as pl

    from dataflows.monitoring import aggregate_messages

    t0 = 1_767_268_800_000
    results = pl.DataFrame(
        {
            "group_by": ["device", "device", "zone"],
            "key": ["d1", "d2", "z1"],
            "metric": ["t", "t", "t"],
            "window_start_ms": [t0, t0 + 60_000, t0],
            "window_end_ms": [t0 + 60_000, t0 + 120_000, t0 + 60_500],
            "count": [2, 1, 3],
            "avg": [1.5, 2.0, None],
        }
    )
    records = aggregate_messages("iot.aggregates", results)
    assert [(topic, key.decode()) for topic, key, _ in records] == [
        ("iot.aggregates", "device|d1|t|2026-01-01T12:00:00Z|2026-01-01T12:01:00Z"),
        ("iot.aggregates", "device|d2|t|2026-01-01T12:01:00Z|2026-01-01T12:02:00Z"),
        ("iot.aggregates", "zone|z1|t|2026-01-01T12:00:00Z|2026-01-01T12:01:00.500000Z"),
    ]
    assert json.loads(records[2][2]) == {
        "group_by": "zone",
        "key": "z1",
        "metric": "t",
        "count": 3,
        "avg": None,
        "window_start": "2026-01-01T12:00:00Z",
        "window_end": "2026-01-01T12:01:00.500000Z",
    }
    assert aggregate_messages("iot.aggregates", results.clear()) == []
