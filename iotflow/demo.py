"""``iotflow demo`` and ``iotflow simulate``: the whole path on one machine.

The demo starts its own brokers (unless ``IOTFLOW_MQTT_URL`` and
``IOTFLOW_KAFKA_BOOTSTRAP`` name real ones, where it uses a run-specific
topic prefix), runs the telemetry flow as ``python -m bytewax.run`` and a
simulated fleet for the given duration, prints a live progress line, then a
summary that checks itself: every valid reading reached Kafka, every
malformed payload is a dead letter, every device has aggregates in DuckDB.
It exits 1 when one of those checks fails.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from pydantic import SecretStr

from iotflow.settings import Settings, redact_url

__all__ = ["run_demo", "run_simulator"]

DEMO_WINDOW_S = 5.0
DEMO_LATENESS_S = 2.0
DEMO_IDLE_STOP_S = 3.0
DEMO_MALFORMED_RATE = 0.005


def _count_live(bootstrap: str, topics: list[str], counts: Counter, stop: threading.Event) -> None:
    from connectors.kafka import tail

    for record in tail(bootstrap, topics, stop=stop):
        counts[record.topic] += 1


def run_demo(duration_s: float, devices: int, rate_hz: float, duckdb_path: Path, seed: int) -> int:
    """Run the demo; return the process exit code."""
    import duckdb

    from connectors.kafka import read_topic
    from infra.flowproc import FlowProcess
    from infra.simulator import FaultConfig, Fleet, FleetConfig
    from infra.stack import LocalStack
    from iotflow.topics import KafkaTopics

    base = Settings()
    run_id = uuid.uuid4().hex[:6]
    with contextlib.ExitStack() as cleanup:
        work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="iotflow-demo-")))
        mqtt_url, bootstrap = base.resolved_mqtt_url(), base.resolved_kafka_bootstrap()
        prefix = base.topic_prefix
        if mqtt_url is None or bootstrap is None:
            stack = cleanup.enter_context(LocalStack.start(work, base, write_state=False))
            mqtt_url, bootstrap = stack.info.mqtt_url, stack.info.kafka_bootstrap
            print(
                f"brokers: mosquitto/mqtt {redact_url(mqtt_url)}, tansu/kafka {bootstrap} (started for this demo)"
            )
        else:
            prefix = f"{prefix}-demo-{run_id}"
            print(f"brokers: mqtt {redact_url(mqtt_url)}, kafka {bootstrap}; topics {prefix}.*")
        if duckdb_path.exists():
            duckdb_path.unlink()
        settings = base.model_copy(
            update={
                "mqtt_url": SecretStr(mqtt_url),
                "kafka_bootstrap": bootstrap,
                "topic_prefix": prefix,
                "duckdb": duckdb_path,
                "window_s": DEMO_WINDOW_S,
                "lateness_s": DEMO_LATENESS_S,
                "mqtt_idle_stop_s": DEMO_IDLE_STOP_S,
                "mqtt_client_id": f"iotflow-demo-{run_id}",
            }
        )
        topics = KafkaTopics(prefix)
        flow = cleanup.enter_context(
            FlowProcess.start("dataflows.telemetry:flow", settings, log=work / "flow.log")
        )
        flow.wait_online()
        print(
            f"flow: python -m bytewax.run dataflows.telemetry:flow ({DEMO_WINDOW_S:g}s tumbling windows)"
        )

        live: Counter = Counter()
        stop_live = threading.Event()
        counter = threading.Thread(
            target=_count_live,
            args=(
                bootstrap,
                [topics.telemetry, topics.aggregates, topics.deadletter],
                live,
                stop_live,
            ),
            daemon=True,
        )
        counter.start()
        cleanup.callback(stop_live.set)

        config = FleetConfig(
            devices=devices,
            rate_hz=rate_hz,
            seed=seed,
            base=settings.mqtt_base,
            faults=FaultConfig(malformed_rate=DEMO_MALFORMED_RATE, clock_skew_ms=500),
        )
        fleet = Fleet(config, mqtt_url)
        print(
            f"fleet: {devices} simulated devices at {rate_hz:g} readings/s each for {duration_s:g}s"
        )
        started = time.monotonic()
        # One line rewritten in place on a terminal; a line per second in a log.
        line_start, line_end = ("\r", "") if sys.stdout.isatty() else ("", "\n")
        fleet.start()
        try:
            last_events, last_t = 0, started
            while (elapsed := time.monotonic() - started) < duration_s:
                time.sleep(min(1.0, duration_s - elapsed))
                now, events = time.monotonic(), live[topics.telemetry]
                rate = (events - last_events) / max(now - last_t, 1e-9)
                last_events, last_t = events, now
                print(
                    f"{line_start}  {now - started:5.1f}s  {rate:8.0f} events/s  "
                    f"{live[topics.aggregates]:7d} window results  {live[topics.deadletter]:5d} dead letters",
                    end=line_end,
                    flush=True,
                )
            if line_end == "":
                print()
        finally:
            stats = fleet.stop()
        print("fleet stopped; waiting for the flow to drain and flush its windows ...")
        code = flow.wait(120)
        sent_s = time.monotonic() - started
        if code != 0:
            print(f"the flow failed with exit code {code}; its log: {flow.log}", file=sys.stderr)
            print(flow.log.read_text()[-3000:], file=sys.stderr)
            return 1

        telemetry = len(read_topic(bootstrap, topics.telemetry))
        dead = [json.loads(r.value) for r in read_topic(bootstrap, topics.deadletter)]
        rejected = sum(1 for d in dead if d["source"] != "window")
        late = len(dead) - rejected
        con = duckdb.connect(str(duckdb_path), read_only=True)
        windows, keys = con.execute(
            "SELECT count(*), count(DISTINCT key) FROM aggregates"
        ).fetchone()
        con.close()

        checks = [
            ("valid readings published", stats.readings_sent, None),
            ("readings on Kafka telemetry", telemetry, stats.readings_sent),
            ("malformed payloads published", stats.malformed_sent, None),
            ("dead letters for them", rejected, stats.malformed_sent),
            ("late readings (dead-lettered)", late, None),
            ("window results in DuckDB", windows, None),
            ("devices with aggregates", keys, devices),
        ]
        print()
        print(f"{'summary':34} {'count':>9}  check")
        failed = False
        for label, value, want in checks:
            mark = (
                "" if want is None else ("ok" if value == want else f"MISMATCH (expected {want})")
            )
            failed |= bool(mark) and mark != "ok"
            print(f"{label:34} {value:9d}  {mark}")
        print(f"{'elapsed':34} {sent_s:8.1f}s")
        print()
        print(f"DuckDB file: {duckdb_path}")
        print("try:")
        print(
            f"  uv run python -c \"import duckdb; print(duckdb.connect('{duckdb_path}', read_only=True)"
            ".sql('SELECT key, metric, count(*) AS windows, round(avg(avg), 2) AS mean, min(min), max(max) "
            "FROM aggregates GROUP BY ALL ORDER BY key, metric LIMIT 10'))\""
        )
        return 1 if failed else 0


def run_simulator(
    devices: int, rate_hz: float, duration_s: float | None, seed: int, malformed_rate: float
) -> int:
    """``iotflow simulate``: a fleet against the configured (or local stack's) broker."""
    from infra.simulator import FaultConfig, Fleet, FleetConfig

    settings = Settings()
    url = settings.require_mqtt_url()
    config = FleetConfig(
        devices=devices,
        rate_hz=rate_hz,
        seed=seed,
        base=settings.mqtt_base,
        faults=FaultConfig(malformed_rate=malformed_rate),
    )
    fleet = Fleet(config, url)
    print(f"simulating {devices} devices at {rate_hz:g} Hz on {redact_url(url)} (Ctrl-C stops)")
    fleet.start()
    try:
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        stats = fleet.stop()
    print(
        f"sent {stats.readings_sent} readings, {stats.malformed_sent} malformed; "
        f"{stats.commands_received} commands received, {stats.acks_sent} acks sent"
    )
    return 0
