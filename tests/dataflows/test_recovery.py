"""Recovery of the telemetry flow: SIGKILL and resume on a real recovery store, exactly.

The kill test is the acceptance test of the delivery-guarantees issue; it runs
50,000 readings here (200,000 in ``python -m bench recovery``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.recovery import run_scenario, write_readings
from connectors.kafka import read_topic
from connectors.recovery import bind_definition, ensure_store, run_args, store_exists
from infra.flowproc import FlowProcess, flow_argv, flow_target
from iotflow.errors import ConfigError
from iotflow.settings import Settings
from iotflow.topics import KafkaTopics

FLOW = "dataflows.telemetry:flow"
DEVICES = 500


# SLOW: about 30-45 s (six flow starts: most of it).
def test_sigkill_five_times_then_resume_gives_exactly_the_crash_free_outputs(
    settings: Settings, tmp_path: Path
) -> None:
    """500 devices x 100 readings with per-device ``seq``, from the Kafka ingest topic,
    through `python -m bytewax.run` with a recovery store; killed 5 times (once within a
    second of its start, once while closed windows are out and later ones wait)."""
    result = run_scenario(
        settings.model_copy(update={"window_s": 10.0, "lateness_s": 60.0}),
        tmp_path,
        devices=DEVICES,
        readings=DEVICES * 100,
        kills=5,
        snapshot_s=1,
        timeout_s=240,
    )
    counts = result.counts()
    print(
        f"recovery kill test: {counts}; recovery times "
        f"{[round(s, 2) for s in result.recovery_s]} s; {result.kill_notes}"
    )
    assert counts["kills"] == 5
    assert result.kill_notes[0].startswith("kill 1 at 0.")  # within a second of the start
    assert counts["kills_with_open_windows"] >= 1
    assert counts["readings_lost"] == 0
    assert counts["deadletters_clean"] == counts["deadletters_recovered"] == 0
    assert result.duckdb_recovered == result.duckdb_clean
    assert len(result.duckdb_clean) == DEVICES * 10 * 2  # devices x windows x metrics
    assert result.kafka_recovered == result.kafka_clean  # after de-duplication
    assert counts["kafka_duplicates_clean_run"] == 0
    assert counts["kafka_aggregates_raw"] >= counts["kafka_aggregates_deduped"] == DEVICES * 20
    # Every device's seq readings 0..99 are counted once: per device, counts sum to 100
    # and seq values sum to 0 + 1 + ... + 99. (values: window_end, count, sum, avg, min, max)
    per_device: dict[str, list[float]] = {}
    for (device, metric, _start), v in result.duckdb_recovered.items():
        if metric == "seq":
            acc = per_device.setdefault(device, [0, 0.0, 100.0, -1.0])
            acc[0] += v[1]
            acc[1] += v[2]
            acc[2], acc[3] = min(acc[2], v[4]), max(acc[3], v[5])
    assert len(per_device) == DEVICES
    assert all(acc == [100, 4950.0, 0.0, 99.0] for acc in per_device.values())


def _run_cli(
    *args: str, settings: Settings, extra: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), **extra}
    return subprocess.run(
        [sys.executable, "-m", "iotflow.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_iotflow_run_creates_the_store_and_refuses_a_changed_window(
    settings: Settings, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    env = {
        "IOTFLOW_INGEST": "kafka",
        "IOTFLOW_INGEST_UNTIL_END": "1",
        "IOTFLOW_RECOVERY_DIR": str(store),
        "IOTFLOW_WINDOW_S": "10",
        "IOTFLOW_LATENESS_S": "60",
        "IOTFLOW_MAX_FUTURE_SKEW_S": "1e10",
    }
    write_readings(
        settings.require_kafka_bootstrap(), [settings.topic_prefix], 20, 100, settings.mqtt_base
    )
    first = _run_cli("run", "telemetry", settings=settings, extra=env)
    assert first.returncode == 0, first.stderr
    assert f"-r {store} -s 5 -b 0" in first.stderr  # the command it ran, shown
    assert store_exists(store)

    changed = _run_cli(
        "run", "telemetry", settings=settings, extra={**env, "IOTFLOW_WINDOW_S": "20"}
    )
    assert changed.returncode == 2
    last = changed.stderr.strip().splitlines()[-1]
    assert last.startswith("iotflow: the flow stopped: the recovery store")
    assert "IOTFLOW_WINDOW_S=10.0 -> 20.0" in last and "new directory" in last

    # The definition the store holds resumes fine.
    again = _run_cli("run", "telemetry", settings=settings, extra=env)
    assert again.returncode == 0, again.stderr


def test_without_the_recorded_definition_the_window_state_itself_refuses(
    settings: Settings, tmp_path: Path
) -> None:
    """A store whose definition record is gone (copied without it): the window state's
    fingerprint still refuses a changed window, and `iotflow run` shows why last."""
    store = tmp_path / "store"
    following = settings.model_copy(
        update={
            "recovery_dir": store,
            "ingest": "kafka",
            "window_s": 10.0,
            "lateness_s": 60.0,
            "max_future_skew_s": 1e10,
        }
    )
    write_readings(
        settings.require_kafka_bootstrap(), [settings.topic_prefix], 20, 2000, settings.mqtt_base
    )
    proc = FlowProcess.start(FLOW, following, log=tmp_path / "following.log", snapshot_s=1)
    telemetry = KafkaTopics(settings.topic_prefix).telemetry
    try:
        deadline = time.monotonic() + 60
        while len(read_topic(settings.require_kafka_bootstrap(), telemetry)) < 2000:
            assert proc.popen.poll() is None, proc.log.read_text()
            assert time.monotonic() < deadline, "the flow did not read its input"
            time.sleep(0.5)
        time.sleep(3)  # a few 1 s snapshots of the open windows (the last 60 s of event time)
    finally:
        proc.kill()
    (store / "iotflow-telemetry.json").unlink()
    deep = _run_cli(
        "run",
        "telemetry",
        settings=following,
        extra={"IOTFLOW_WINDOW_S": "20", "IOTFLOW_INGEST_UNTIL_END": "1"},
    )
    assert deep.returncode == 2, deep.stderr
    assert "recovered window state was made by another window definition" in deep.stderr
    assert deep.stderr.strip().splitlines()[-1].startswith("iotflow: the flow stopped:")


def test_bytewax_run_without_r_warns_that_recovery_is_off(
    settings: Settings, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        **settings.to_env(),
        "IOTFLOW_INGEST": "kafka",
        "IOTFLOW_INGEST_UNTIL_END": "1",
        "IOTFLOW_RECOVERY_DIR": str(tmp_path / "store"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflows.telemetry:flow"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "recovery is OFF" in done.stderr and "iotflow run telemetry" in done.stderr


def test_recovery_helpers_validate_and_are_idempotent(tmp_path: Path) -> None:
    store = tmp_path / "a" / "b"
    assert ensure_store(store) is True
    assert ensure_store(store) is False
    bind_definition(store, "telemetry", {"IOTFLOW_WINDOW_S": 10.0})
    bind_definition(store, "telemetry", {"IOTFLOW_WINDOW_S": 10.0})
    with pytest.raises(ConfigError, match=r"IOTFLOW_WINDOW_S=10.0 -> 30.0"):
        bind_definition(store, "telemetry", {"IOTFLOW_WINDOW_S": 30.0})
    with pytest.raises(ConfigError, match="whole number"):
        run_args(store, snapshot_s=0)
    with pytest.raises(ConfigError, match=r"no flow named 'nope'; flows: .*telemetry"):
        flow_target("nope")
    assert flow_target("telemetry") == "dataflows.telemetry:flow"
    argv = flow_argv(
        "dataflows.telemetry:flow",
        Settings(_env_file=None, recovery_dir=tmp_path / "new"),
        workers=2,
        snapshot_s=3,
    )
    assert argv[1:] == [
        "-m",
        "bytewax.run",
        "dataflows.telemetry:flow",
        "-w",
        "2",
        "-r",
        str(tmp_path / "new"),
        "-s",
        "3",
        "-b",
        "0",
    ]
    assert store_exists(tmp_path / "new")
