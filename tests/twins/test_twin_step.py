"""The Bytewax twin step: the same twins as the logic alone, resumed after a crash, refused
under a changed registry."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflows.twins import build_flow, predict_step, twin_step
from iotflow.errors import ConfigError
from iotflow.events import from_ms
from iotflow.settings import Settings
from tests.twins.kit import T0_MS, desired, make_registry, reported
from twins.prediction import PredictionRule, load_prediction_rules
from twins.sync import TwinOut, TwinSync

END_MS = T0_MS + 6_000  # no heartbeat (10 s) runs out: only updates make changes


def clock() -> Any:
    return from_ms(END_MS)


def batches() -> list[list[Any]]:
    devices = [f"t{i}" for i in range(12)]
    out: list[list[Any]] = []
    for r in range(6):
        out.append(
            [
                reported(d, T0_MS + r * 1000, setpoint=20.0 + r, temperature=float(r))
                for d in devices
            ]
        )
        out.append([desired(d, T0_MS + r * 1000 + 500, setpoint=25 - r) for d in devices[:4]])
    return out


def run_step(
    items: list[Any], shards: int, recovery: RecoveryConfig | None = None, snapshots: bool = True
) -> list[TwinOut]:
    registry = make_registry(devices=tuple(f"t{i}" for i in range(12)))
    flow = Dataflow("twin_step_test")
    updates = op.input("in", flow, TestingSource(items))
    outs = twin_step("twins", updates, registry, shards, clock, recovery=snapshots)
    found: list[TwinOut] = []
    op.output("out", outs, TestingSink(found))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    return found


def changes(outs: list[TwinOut]) -> dict[tuple[str, int], Any]:
    return {
        (c.device_id, c.version): (c.reported, c.desired, c.delta) for o in outs for c in o.changes
    }


@pytest.mark.parametrize(("shards", "snapshots"), [(1, True), (5, True), (5, False)])
def test_step_equals_the_logic(shards: int, snapshots: bool) -> None:
    registry = make_registry(devices=tuple(f"t{i}" for i in range(12)))
    sync = TwinSync(registry, now=clock)
    expected = [o for b in batches() for o in sync.on_batch(b)]
    got = run_step(batches(), shards, snapshots=snapshots)
    assert changes(got) == changes(expected)
    assert sorted(c.command_id for o in got for c in o.commands) == sorted(
        c.command_id for o in expected for c in o.commands
    )


def test_recovery_resumes_with_the_same_twins(tmp_path: Path) -> None:
    expected = changes(run_step(batches(), 3))
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(str(tmp_path))
    data = batches()
    # One list for both runs: an ABORT item triggers once, the resumed run reads past it.
    items = [*data[:5], TestingSource.ABORT(), *data[5:]]
    first = changes(run_step(items, 3, recovery))
    second = changes(run_step(items, 3, recovery))
    assert first and second
    # at least once: a replayed epoch repeats versions, identical ones (the key de-duplicates)
    for key in first.keys() & second.keys():
        assert first[key] == second[key]
    assert {**first, **second} == expected


def test_a_changed_registry_is_refused_on_the_same_recovery_store(tmp_path: Path) -> None:
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(
        "models: {m: {properties: {a: {type: float}}}}\npatterns: {'d-*': m}\n"
    )
    settings = Settings(
        _env_file=None,
        kafka_bootstrap="127.0.0.1:9",
        mqtt_url="mqtt://127.0.0.1:9",
        registry=registry_file,
        recovery_dir=tmp_path / "store",
    )
    build_flow(settings)  # records the definition next to the store
    build_flow(settings)  # the same registry resumes
    registry_file.write_text(
        "models: {m: {properties: {a: {type: float, max: 5}}}}\npatterns: {'d-*': m}\n"
    )
    with pytest.raises(ConfigError, match="registry models and policies") as info:
        build_flow(settings)
    assert "new directory" in str(info.value)


def test_predictions_ride_on_the_reported_values() -> None:
    # Two locks drain 1 %/min from 40 %; one stays flat. Threshold 10 % is 30 min away
    # for the draining ones: inside a 1 h horizon, so each gives one detection.
    rule = load_prediction_rules(
        [{"property": "battery", "threshold": 10, "direction": "below",
          "horizon": "1h", "window": "30m", "min_points": 5}]
    )  # fmt: skip
    minute = 60_000
    items = [
        [
            reported("lock-a", T0_MS + m * minute, battery=40.0 - m),
            reported("lock-b", T0_MS + m * minute, battery=40.0 - m, locked=1),
            reported("lock-c", T0_MS + m * minute, battery=80.0),
        ]
        for m in range(10)
    ]
    flow = Dataflow("predict_test")
    found: list[Any] = []
    now = lambda: from_ms(T0_MS + 10 * minute)  # noqa: E731
    stream = predict_step("maintenance", op.input("in", flow, TestingSource(items)), rule, 3, now)
    op.output("out", stream, TestingSink(found))
    run_main(flow)
    assert sorted(d.key for d in found) == ["lock-a", "lock-b"]
    for d in found:
        # one detection per episode, at the first fit with min_points (minute 4, 36 %):
        # 26 more minutes to 10 %
        assert d.details["eta_s"] == pytest.approx(26 * 60, abs=1)
        assert d.baseline == 10


def test_duplicate_prediction_names_fail_when_the_flow_is_built() -> None:
    rule = PredictionRule(
        property="battery", threshold=10, direction="below", horizon="1h", window="30m",
        name="battery",
    )  # fmt: skip
    twice = [rule, rule]
    with pytest.raises(ConfigError, match="named 'battery'"):
        predict_step("p", op.input("in", Dataflow("dup"), TestingSource([])), twice)
