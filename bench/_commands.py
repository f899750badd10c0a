"""What the command benchmarks share: the orchestrator flow on private brokers, and its events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Producer

from bench._latency import KafkaWatch, tail_log
from bench.harness import BenchError
from connectors.kafka import ensure_topics, producer_config
from infra.flowproc import FlowProcess
from infra.stack import StackInfo
from iotflow.errors import StackError
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics

__all__ = ["CommandWatch", "Outcome", "orchestrator_flow", "producer"]


@contextmanager
def orchestrator_flow(
    info: StackInfo, tmp: Path, config: dict[str, Any]
) -> Iterator[tuple[FlowProcess, Settings]]:
    """The orchestrator flow with ``config`` (an OrchestratorConfig declaration), online."""
    path = tmp / "orchestrator.yaml"
    path.write_text(yaml.safe_dump(config))
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        _env_file=None,
        mqtt_url=info.mqtt_url,
        kafka_bootstrap=info.kafka_bootstrap,
        mqtt_base=f"bench{tag}",
        topic_prefix=f"bench{tag}",
        mqtt_client_id=f"bench-orchestrator-{tag}",
        duckdb=tmp / "bench.duckdb",
        orchestrator=path,
    )
    topics = KafkaTopics(settings.topic_prefix)
    ensure_topics(
        info.kafka_bootstrap, [topics.command_requests, topics.command_events, topics.deadletter]
    )
    log = tmp / "flow.log"
    with FlowProcess.start("dataflows.orchestrator:flow", settings, log=log) as flow:
        try:
            flow.wait_online(90)
        except StackError as exc:
            raise BenchError(f"{exc}\n{tail_log(log)}") from exc
        yield flow, settings


def producer(bootstrap: str) -> Producer:
    """A low-latency producer for command requests (all on one key: one partition, in order)."""
    return Producer({**producer_config(bootstrap), "linger.ms": 0})


@dataclass(frozen=True)
class Outcome:
    """A command's events as the flow reported them."""

    sent_ts: datetime | None
    done_ts: datetime | None
    done_seen_at: float | None  # time.time() when the DONE event was consumed
    kinds: tuple[str, ...]


class CommandWatch:
    """Follows ``{prefix}.commands.events`` and gathers each command's events."""

    def __init__(self, settings: Settings) -> None:
        self._watch = KafkaWatch(
            settings.require_kafka_bootstrap(), [KafkaTopics(settings.topic_prefix).command_events]
        )
        self._read = 0
        self._events: dict[str, list[tuple[float, dict[str, Any]]]] = {}

    def _drain(self) -> None:
        seen = self._watch.seen
        end = len(seen)
        for item in seen[self._read : end]:
            event = json.loads(item.value)
            if "command_id" in event:
                self._events.setdefault(event["command_id"], []).append((item.at, event))
        self._read = end

    def count(self, kind: str) -> int:
        """Commands with at least one event of ``kind`` so far."""
        self._drain()
        return sum(any(e["kind"] == kind for _, e in evs) for evs in self._events.values())

    def wait(self, kind: str, count: int, timeout_s: float) -> None:
        """Until ``count`` commands have a ``kind`` event; BenchError with the tally otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.count(kind) >= count:
                return
            time.sleep(0.005)
        tally: dict[str, int] = {}
        for evs in self._events.values():
            last = evs[-1][1]["kind"]
            tally[last] = tally.get(last, 0) + 1
        msg = f"{self.count(kind)} of {count} commands reached {kind} within {timeout_s}s; last kinds {tally}"
        raise BenchError(msg)

    def outcome(self, command_id: str) -> Outcome:
        self._drain()
        evs = self._events.get(command_id, [])
        sent = next((e for _, e in evs if e["kind"] == "sent"), None)
        done = next(((at, e) for at, e in evs if e["kind"] == "done"), None)
        return Outcome(
            None if sent is None else datetime.fromisoformat(sent["ts"]),
            None if done is None else datetime.fromisoformat(done[1]["ts"]),
            None if done is None else done[0],
            tuple(e["kind"] for _, e in evs),
        )

    def command_ids(self) -> list[str]:
        self._drain()
        return list(self._events)

    def close(self) -> None:
        self._watch.close()
