"""The "leaving home" routine as an example flow: a trigger -> the leaving-home saga.

Run it next to the orchestrator flow::

    python -m bytewax.run dataflows.orchestrator:flow     # executes sagas
    python -m bytewax.run dataflows.leaving_home:flow     # starts this one on a trigger

A trigger is any MQTT message on ``{base}/homes/{home_id}/leaving`` (a
button, a geofence, a CEP detection forwarded there). Its payload is empty or
a JSON object with ``ts`` (epoch ms or ISO 8601) naming the moment; the
receive time stands in when it is missing. For each trigger the flow puts
one saga request on ``{prefix}.commands.requests``:
``{"coordinator": {"type": "saga", "id": "leaving-home-{home_id}-{ts_ms}", ...}}``
with the routine of ``dataflows/leaving_home.yaml`` (``build_flow(routine=...)`` takes another).
The id is made from the trigger, so a trigger delivered twice starts the
routine once (the orchestrator ignores a known coordinator id).

The routine targets registry groups (``doors``, ``thermostats``, ``lights``,
``security``, ``notifiers``): the orchestrator's registry
(``IOTFLOW_REGISTRY``) must declare them; ``home_registry()`` builds one over
the simulator's devices. The routine is checked against the registry when the
flow is built (``ConfigError`` naming the step), so a wrong routine never
reaches the orchestrator. Triggers that cannot be used (a home id MQTT cannot
carry, a payload that is not JSON, a bad ``ts``) go to ``{prefix}.deadletter``
with the reason.

``commands.preview.preview(load_routine(), registry, twins).render()`` prints
which writes the routine would send, in order, without sending anything.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import bytewax.operators as op
import msgspec
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source

from commands.plans import run_id_problem
from commands.saga import SagaSpec, load_saga
from connectors.decode import dead_letter
from connectors.kafka import KafkaOutput, message
from connectors.mqtt import MqttSource
from iotflow.events import DeadLetter, DeviceMessage, to_ms
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics, check_device_id
from twins.registry import Registry, load_registry, simulator_registry

__all__ = [
    "CLIENT_ID",
    "ROUTINE_FILE",
    "build_flow",
    "home_registry",
    "load_routine",
    "routine_request",
    "trigger_topic",
]

ROUTINE_FILE = Path(__file__).with_name("leaving_home.yaml")
CLIENT_ID = "iotflow-leaving-home"
GROUPS = ("doors", "thermostats", "lights", "security", "notifiers")


def trigger_topic(base: str, home_id: str = "+") -> str:
    """``{base}/homes/{home_id}/leaving``."""
    return f"{base}/homes/{home_id}/leaving"


def load_routine(path: str | Path = ROUTINE_FILE) -> SagaSpec:
    """The routine declaration; ``ConfigError`` naming the field when it is wrong."""
    return load_saga(Path(path))


def home_registry(*, doors: int = 2, lights: int = 120, base: Registry | None = None) -> Registry:
    """A registry with the routine's groups over simulator device ids.

    ``doors`` locks ``lock-0001``.., one thermostat ``hvac-0001``, ``lights``
    lights ``light-0001``.., ``security-0001`` and ``notifier-0001``; devices
    are known by the simulator registry's id patterns (or ``base``'s).
    """
    registry = base or simulator_registry()
    width = max(4, len(str(max(doors, lights))))
    registry.add_group("doors", [f"lock-{i:0{width}d}" for i in range(1, doors + 1)])
    registry.add_group("thermostats", [f"hvac-{1:0{width}d}"])
    registry.add_group("lights", [f"light-{i:0{width}d}" for i in range(1, lights + 1)])
    registry.add_group("security", [f"security-{1:0{width}d}"])
    registry.add_group("notifiers", [f"notifier-{1:0{width}d}"])
    return registry


class _Trigger(msgspec.Struct):
    ts: int | datetime | None = None


_trigger = msgspec.json.Decoder(_Trigger)


def routine_request(routine: SagaSpec, home_id: str, ts_ms: int) -> bytes:
    """The orchestrator request that starts ``routine`` for a home, as JSON bytes."""
    spec: dict[str, Any] = routine.model_dump(mode="json", exclude_defaults=True)
    run_id = f"{routine.name}-{home_id}-{ts_ms}"
    return msgspec.json.encode({"coordinator": {"type": "saga", "id": run_id, **spec}})


def _request(routine: SagaSpec, base: str, msg: DeviceMessage) -> tuple[str, bytes] | DeadLetter:
    """(run id, request) for a trigger message, or a dead letter saying why not."""
    parts = msg.topic.split("/")
    home_id = parts[-2] if len(parts) >= 4 else ""
    why = check_device_id(home_id)
    if why is not None or msg.topic != trigger_topic(base, home_id):
        reason = f"trigger topic {msg.topic[:80]!r} is not {trigger_topic(base, '<home_id>')}"
        return dead_letter(
            "leaving_home",
            f"{reason}: {why or 'wrong layout'}",
            msg.payload,
            msg.received_ms,
            msg.topic,
        )
    ts_ms = msg.received_ms
    if msg.payload.strip():
        try:
            ts = _trigger.decode(msg.payload).ts
        except msgspec.DecodeError as exc:
            reason = f"trigger payload must be empty or a JSON object with ts: {exc}"
            return dead_letter("leaving_home", reason, msg.payload, msg.received_ms, msg.topic)
        if isinstance(ts, datetime):
            try:
                ts_ms = to_ms(ts)
            except ValueError as exc:
                return dead_letter(
                    "leaving_home", f"trigger ts: {exc}", msg.payload, msg.received_ms, msg.topic
                )
        elif ts is not None:
            ts_ms = ts
    if ts_ms < 0:
        reason = f"trigger ts {ts_ms} is negative; give epoch milliseconds"
        return dead_letter("leaving_home", reason, msg.payload, msg.received_ms, msg.topic)
    run_id = f"{routine.name}-{home_id}-{ts_ms}"
    problem = run_id_problem(run_id)
    if problem is not None:
        reason = f"home id {home_id[:60]!r} cannot name a run: {problem}"
        return dead_letter("leaving_home", reason, msg.payload, msg.received_ms, msg.topic)
    return run_id, routine_request(routine, home_id, ts_ms)


def build_flow(
    settings: Settings | None = None,
    *,
    triggers: Source[list[DeviceMessage]] | None = None,
    routine: SagaSpec | None = None,
    registry: Registry | None = None,
) -> Dataflow:
    """Wire the trigger flow; ``triggers`` replaces the MQTT input (tests).

    The routine is expanded against ``registry`` (default: ``IOTFLOW_REGISTRY``)
    once here, so a routine that does not fit fails now with a ``ConfigError``.
    """
    settings = settings or Settings()
    routine = routine or load_routine()
    registry = registry or load_registry(settings.registry)
    routine.expand(registry, f"{routine.name}-check")
    topics = KafkaTopics(settings.topic_prefix)
    base = settings.mqtt_base
    if triggers is None:
        client_id = (
            settings.mqtt_client_id if "mqtt_client_id" in settings.model_fields_set else CLIENT_ID
        )
        triggers = MqttSource(
            settings.require_mqtt_url(),
            [trigger_topic(base)],
            client_id=client_id,
            status_base=base,
        )
    flow = Dataflow("leaving_home")
    batches = op.input("triggers", flow, triggers)
    decided = op.flat_map(
        "requests", batches, lambda batch: [_request(routine, base, m) for m in batch]
    )
    split = op.branch("ok", decided, lambda item: isinstance(item, tuple))
    out = op.merge(
        "to_kafka",
        op.map("request_msgs", split.trues, lambda r: message(topics.command_requests, r[0], r[1])),
        op.map(
            "dead_msgs",
            split.falses,
            lambda d: message(topics.deadletter, d.topic or d.source, msgspec.json.encode(d)),
        ),
    )
    op.output(
        "kafka",
        out,
        KafkaOutput(
            settings.require_kafka_bootstrap(), [topics.command_requests, topics.deadletter]
        ),
    )
    return flow


def __getattr__(name: str) -> Dataflow:
    # Built on first access so importing the module needs no broker.
    if name == "flow":
        return build_flow()
    raise AttributeError(name)
