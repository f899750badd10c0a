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

from dataflows.twins import build_flow, twin_step
from iotflow.errors import ConfigError
from iotflow.events import from_ms
from iotflow.settings import Settings
from tests.twins.kit import T0_MS, desired, make_registry, reported
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
    items: list[Any], shards: int, recovery: RecoveryConfig | None = None
) -> list[TwinOut]:
    registry = make_registry(devices=tuple(f"t{i}" for i in range(12)))
    flow = Dataflow("twin_step_test")
    outs = twin_step("twins", op.input("in", flow, TestingSource(items)), registry, shards, clock)
    found: list[TwinOut] = []
    op.output("out", outs, TestingSink(found))
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    return found


def changes(outs: list[TwinOut]) -> dict[tuple[str, int], Any]:
    return {
        (c.device_id, c.version): (c.reported, c.desired, c.delta) for o in outs for c in o.changes
    }


@pytest.mark.parametrize("shards", [1, 5])
def test_step_equals_the_logic(shards: int) -> None:
    registry = make_registry(devices=tuple(f"t{i}" for i in range(12)))
    sync = TwinSync(registry, now=clock)
    expected = [o for b in batches() for o in sync.on_batch(b)]
    got = run_step(batches(), shards)
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
