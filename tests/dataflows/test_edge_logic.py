"""The edge logic without brokers: bad input, ordering rules, checkpoints, commands, switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from connectors.buffer import UplinkRecord
from connectors.decode import TelemetryDecoder
from connectors.definitions import DefinitionOffer
from connectors.gateway import Checkpoint, GatewayStatus, Inbound
from connectors.mqtt import MqttMessage
from connectors.uplink import UplinkEnvelope, expand_aggregates
from dataflows.edge import DEFAULT_WORKFLOW, EdgeLogic, compile_edge, default_profile
from iotflow.errors import ConfigError
from iotflow.events import DeviceMessage, from_ms
from iotflow.placement import PlacementError
from iotflow.workflow import Workflow

T0 = 1_767_225_600_000
SMOKE = {
    "name": "smoke",
    "kind": "threshold",
    "condition": "smoke > 0",
    "actions": [{"type": "detect"}, {"type": "command", "device": "valve-{key}", "name": "close"}],
}


class Clock:
    def __init__(self) -> None:
        self.ms = T0 + 1000

    def __call__(self) -> Any:
        return from_ms(self.ms)


def make(
    components: list[dict[str, Any]], clock: Clock, state: bytes | None = None, **kw: Any
) -> EdgeLogic:
    wf = Workflow.from_dict({"name": "w", "version": 1, "components": components})
    return EdgeLogic(
        "gw", default_profile("gw"), wf, TelemetryDecoder(), resume_state=state, now=clock, **kw
    )


def msg(device: str, body: Any, at: int = T0) -> DeviceMessage:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return DeviceMessage(f"iotflow/devices/{device}/telemetry", raw, at)


def records(out: list[Any], kind: str) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in out if isinstance(r, UplinkRecord) and r.kind == kind]


STATS = {"name": "stats", "kind": "aggregate", "window": "10s", "placement": "edge"}
RAW = {"name": "raw", "kind": "forward"}


def test_bad_input_becomes_dead_letters_and_loses_nothing_valid() -> None:
    clock = Clock()
    logic = make([STATS, RAW], clock)
    out = logic.on_batch(
        Inbound(
            1,
            [
                msg("ok", {"ts": T0, "t": 1.5}),
                msg("bad", b"{not json"),
                msg("bad", {"ts": "yesterday", "t": 1}),
                msg("bad", {"ts": T0, "t": "warm"}),
                msg("bad", b'{"ts": %d, "t": NaN}' % T0),
                msg("bad", {"ts": T0 + 10**12, "t": 1}),  # far future
                msg("bad", b"x" * (300 * 1024)),  # over the payload limit
                msg("bad", [{"ts": T0, "t": 2.0}, "oops"]),  # one good reading, one bad
                DeviceMessage("iotflow/devices/ev\x01il/telemetry", b'{"t": 1}', T0),
            ],
        )
    )
    dead = records(out, "deadletter")
    reasons = " | ".join(d["reason"] for d in dead)
    for fragment in ("invalid JSON", "not ISO 8601", "no numeric metric", "in the future",
                     "the limit is", "item 1", "control characters"):  # fmt: skip
        assert fragment in reasons
    assert len(dead) == 8
    raw = records(out, "reading")
    assert sorted((r["device_id"], r["metrics"]["t"]) for r in raw) == [("bad", 2.0), ("ok", 1.5)]
    assert logic.counters["messages"] == 9 and logic.counters["readings"] == 2


def test_order_per_device_duplicates_and_readings_sharing_a_time() -> None:
    clock = Clock()
    logic = make([STATS, RAW], clock)
    first = logic.on_batch(Inbound(1, [msg("d", {"ts": T0 + 5, "t": 1.0})]))
    assert len(records(first, "reading")) == 1
    out = logic.on_batch(
        Inbound(
            2,
            [
                msg("d", {"ts": T0 + 5, "t": 1.0}),  # a redelivery: counted, dropped
                msg("d", {"ts": T0 + 5, "h": 40.0}),  # another sensor at the same time: kept
                msg("d", {"ts": T0 + 1, "t": 9.0}),  # older: a dead letter
            ],
        )
    )
    assert [r["metrics"] for r in records(out, "reading")] == [{"h": 40.0}]
    (dead,) = records(out, "deadletter")
    assert "older than device 'd'" in dead["reason"]
    assert (logic.counters["duplicates"], logic.counters["stale"]) == (1, 1)


def test_a_local_rule_commands_the_device_at_once_and_everything_goes_up() -> None:
    clock = Clock()
    logic = make(
        [{"name": "gas", "kind": "patterns", "placement": "edge", "patterns": [SMOKE]}], clock
    )
    out = logic.on_batch(Inbound(1, [msg("kitchen", {"ts": T0, "smoke": 1})]))
    (command,) = [o for o in out if isinstance(o, MqttMessage)]
    assert command.topic == "iotflow/devices/valve-kitchen/cmd" and command.qos == 1
    assert not command.retain and command.expiry_s == 60
    body = json.loads(command.payload)
    assert (body["command_id"], body["name"]) == (f"smoke|kitchen|{T0}|1", "close")
    assert records(out, "detection")[0]["rule"] == "smoke"
    assert records(out, "command")[0]["command"]["command_id"] == body["command_id"]
    assert out.index(command) < max(i for i, o in enumerate(out) if isinstance(o, UplinkRecord))


def test_commands_to_an_unusable_device_id_are_not_sent_but_reported() -> None:
    clock = Clock()
    rule = {**SMOKE, "actions": [{"type": "command", "device": "valve/{key}", "name": "close"}]}
    logic = make(
        [{"name": "gas", "kind": "patterns", "placement": "edge", "patterns": [rule]}], clock
    )
    out = logic.on_batch(Inbound(1, [msg("kitchen", {"ts": T0, "smoke": 1})]))
    assert not [o for o in out if isinstance(o, MqttMessage)]
    (dead,) = records(out, "deadletter")
    assert "not sent" in dead["reason"] and "contains '/'" in dead["reason"]


def test_command_sequences_and_filters() -> None:
    clock = Clock()
    logic = make(
        [
            {"name": "sane", "kind": "filter", "where": "smoke >= 0", "placement": "edge"},
            {"name": "gas", "kind": "patterns", "input": "sane", "placement": "edge",
             "patterns": [{**SMOKE, "actions": [{"type": "detect"}]}]},
            {"name": "evacuate", "kind": "command_sequence", "input": "gas", "on": ["smoke"],
             "placement": "edge", "steps": [{"device": "valve-{key}", "name": "close"},
                                            {"device": "fan-{key}", "name": "on", "params": {"speed": 3}}]},
        ],
        clock,
    )  # fmt: skip
    out = logic.on_batch(
        Inbound(1, [msg("k", {"ts": T0, "smoke": -1}), msg("k", {"ts": T0 + 1, "smoke": 2})])
    )
    sent = [json.loads(o.payload) for o in out if isinstance(o, MqttMessage)]
    assert [(c["device_id"], c["name"], c["params"]) for c in sent] == [
        ("valve-k", "close", {}),
        ("fan-k", "on", {"speed": 3}),
    ]
    assert [c["command_id"] for c in sent] == [f"evacuate|k|{T0 + 1}|0", f"evacuate|k|{T0 + 1}|1"]
    assert len(records(out, "detection")) == 1  # the filtered-out reading never reached the rule


def test_checkpoints_carry_the_tokens_and_the_state_resumes_exactly() -> None:
    clock = Clock()
    logic = make([STATS], clock, checkpoint_ms=1000, checkpoint_messages=3)
    assert not [
        o
        for o in logic.on_batch(Inbound(1, [msg("d", {"ts": T0, "t": 1.0})]))
        if isinstance(o, Checkpoint)
    ]
    out = logic.on_batch(
        Inbound(2, [msg("d", {"ts": T0 + 1, "t": 2.0}), msg("e", {"ts": T0 + 2, "t": 5.0})])
    )
    (cp,) = [o for o in out if isinstance(o, Checkpoint)]
    assert cp.tokens == [1, 2]
    clock.ms += 500
    resumed = make([STATS], clock, state=cp.state)
    out = resumed.on_batch(
        Inbound(3, [msg("d", {"ts": T0 + 1, "t": 2.0}), msg("d", {"ts": T0 + 3, "t": 3.0})])
    )
    assert resumed.counters["duplicates"] == 1  # the reading the broker sent again
    (agg,) = records(resumed.on_eof(), "aggregate")
    assert (agg["stats"], agg["metrics"]) == (["count", "sum", "min", "max"], ["t"])
    assert sorted(agg["rows"]) == [["d", [3, 6.0, 1.0, 3.0]], ["e", [1, 5.0, 5.0, 5.0]]]
    status = [o for o in resumed.on_eof() if isinstance(o, GatewayStatus)]
    assert status[0].counters["running_version"] == 1


def test_a_timer_checkpoints_a_quiet_gateway_and_closes_windows() -> None:
    clock = Clock()
    logic = make([STATS], clock, checkpoint_ms=50)
    logic.on_batch(Inbound(1, [msg("d", {"ts": T0, "t": 1.0})]))
    assert logic.next_timer() == from_ms(clock.ms + 50)
    clock.ms += 50
    assert [o.tokens for o in logic.on_timer() if isinstance(o, Checkpoint)] == [[1]]
    clock.ms = T0 + 1000 + 10_000  # the watermark: T0 plus the quiet time since it arrived
    out = logic.on_timer()
    assert [r["window_start_ms"] for r in records(out, "aggregate")] == [T0]


def offer(version: int, components: list[dict[str, Any]], offset: int = 0) -> DefinitionOffer:
    doc = {"version": version, "target": "*", "workflow": {"name": "w", "components": components}}
    return DefinitionOffer("*", msgspec.json.encode(doc), 0, offset)


def test_a_new_definition_switches_live_and_unchanged_windows_keep_their_state() -> None:
    clock = Clock()
    logic = make([STATS], clock)
    logic.on_batch(Inbound(1, [msg("d", {"ts": T0, "t": 1.0})]))
    kept = logic.windows["stats"]
    out = logic.on_batch(
        offer(
            2,
            [STATS, {"name": "gas", "kind": "patterns", "placement": "edge", "patterns": [SMOKE]}],
        )
    )
    assert logic.windows["stats"] is kept and "gas" in logic.engines
    (ack,) = records(out, "definition")
    assert (ack["version"], ack["status"], ack["running_version"]) == (2, "applied", 2)
    assert isinstance(out[-1], Checkpoint)
    retained = [o for o in out if isinstance(o, MqttMessage)]
    assert retained[0].retain and retained[0].topic == "iotflow/gateways/gw/definition"
    # a changed window: the old one's open windows close now, partial, under their own ids
    out = logic.on_batch(offer(3, [{**STATS, "window": "20s"}], 1))
    (flushed,) = records(out, "aggregate")
    assert flushed["rows"] == [["d", [1, 1.0, 1.0, 1.0]]]
    assert logic.windows["stats"].window.length == timedelta(seconds=20)
    # an invalid one is refused, the running version stays
    out = logic.on_batch(
        offer(4, [{"name": "bad", "kind": "filter", "where": "t >", "placement": "edge"}], 2)
    )
    (ack,) = records(out, "definition")
    assert (ack["status"], ack["running_version"]) == ("rejected", 3)
    assert "component 'bad'" in ack["reason"]


def test_what_the_gateway_cannot_host_is_refused_before_it_starts() -> None:
    big = Workflow.from_dict({"name": "w", "components": [{**STATS, "needs": {"memory_mb": 4096}}]})
    with pytest.raises(PlacementError, match="cannot host it"):
        compile_edge(big, default_profile("gw"))
    seq = Workflow.from_dict(
        {"name": "w", "components": [{"name": "p", "kind": "patterns", "placement": "edge",
                                      "patterns": [{"name": "x", "kind": "threshold", "condition": "t >> 1"}]}]}
    )  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"workflow 'w' component 'p': pattern declaration is invalid: patterns\[0\]\.threshold\.condition: expression 't >> 1': operator '>>' is not allowed",
    ):
        compile_edge(seq, default_profile("gw"))
    assert [c.name for c in compile_edge(DEFAULT_WORKFLOW, default_profile("gw")).plan.edge] == [
        "stats"
    ]


def test_aggregate_records_expand_to_the_window_results_the_cloud_computes() -> None:
    clock = Clock()
    logic = make([STATS], clock)
    logic.on_batch(
        Inbound(
            1,
            [
                msg("a", {"ts": T0, "t": 1.0, "h": 40.0}),
                msg("b", {"ts": T0 + 1, "h": 50.0}),
                msg("a", {"ts": T0 + 2, "t": 3.0}),
            ],
        )
    )
    (record,) = [o for o in logic.on_eof() if isinstance(o, UplinkRecord) and o.kind == "aggregate"]
    envelope = UplinkEnvelope(
        record.rid, "gw", 1, "aggregate", record.key, 0, False, msgspec.Raw(record.body)
    )
    got = {
        (w.key, w.metric): (w.count, w.sum, w.avg, w.min, w.max)
        for w in expand_aggregates(envelope)
    }
    assert got == {
        ("a", "h"): (1, 40.0, 40.0, 40.0, 40.0),
        ("a", "t"): (2, 4.0, 2.0, 1.0, 3.0),
        ("b", "h"): (1, 50.0, 50.0, 50.0, 50.0),
    }
    assert json.loads(record.body)["rows"][1] == ["b", [1, 50.0, 50.0, 50.0], None]


def test_the_edge_process_imports_neither_polars_numpy_nor_duckdb() -> None:
    # nor PyYAML while its declarations are JSON (the default workflow is a dict)
    code = (
        "import sys, bytewax.run, dataflows.edge;"
        "print(sorted(m for m in ('numpy', 'polars', 'duckdb', 'bytewax.connectors.kafka', 'yaml')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


_WITHOUT_PYDANTIC = """
import json, os, sys
from connectors.decode import TelemetryDecoder
from connectors.definitions import DefinitionOffer
from connectors.gateway import Inbound
from dataflows.edge import EdgeLogic, build_flow, default_profile
from iotflow.events import DeviceMessage, from_ms
from iotflow.workflow_lean import load_workflow

build_flow()  # settings, workflow file, profile, buffer, sources and sinks (no broker needed yet)
wf = load_workflow(os.environ["IOTFLOW_EDGE_WORKFLOW"])
logic = EdgeLogic("gw", default_profile("gw"), wf, TelemetryDecoder(), now=lambda: from_ms(T0))
body = json.dumps({"ts": T0, "smoke": 1.0}).encode()
out = logic.on_batch(Inbound(1, [DeviceMessage("iotflow/devices/k/telemetry", body, T0)]))
doc = {"version": 2, "target": "*", "workflow": json.loads(open(os.environ["IOTFLOW_EDGE_WORKFLOW"]).read())}
out += logic.on_batch(DefinitionOffer("*", json.dumps(doc).encode(), 0, 1))
print(sorted(type(o).__name__ for o in out), logic.program.version)
print(sorted(m for m in ("pydantic", "pydantic_core") if m in sys.modules))
"""


def test_the_edge_reads_settings_and_declarations_and_runs_without_pydantic(tmp_path) -> None:
    # pydantic costs a gateway ~10 MiB (import and models): the edge holds the msgspec mirrors
    workflow = {
        "name": "w",
        "version": 1,
        "components": [
            {**STATS},
            {"name": "p", "kind": "patterns", "placement": "edge", "patterns": [SMOKE]},
        ],
    }
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(workflow))
    env = {
        **os.environ,
        "IOTFLOW_MQTT_URL": "mqtt://127.0.0.1:1",
        "IOTFLOW_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "IOTFLOW_EDGE_WORKFLOW": str(path),
        "IOTFLOW_EDGE_BUFFER": str(tmp_path / "buffer.db"),
        "IOTFLOW_EDGE_GATEWAY_ID": "gw-7",
    }
    code = f"T0 = {T0}\n" + _WITHOUT_PYDANTIC
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kinds, loaded = done.stdout.strip().splitlines()
    # the local command and the definition's status on MQTT; detection, command and the
    # definition's acknowledgment for the uplink; the checkpoint; running version 2
    assert kinds == (
        "['Checkpoint', 'MqttMessage', 'MqttMessage', 'UplinkRecord', 'UplinkRecord',"
        " 'UplinkRecord'] 2"
    )
    assert loaded == "[]"
