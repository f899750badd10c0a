"""Dry run: the preview lists exactly the writes a run sends, in order, with predicted state."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest
from plan_harness import LEAVING_HOME, DeviceLoop, home_registry, home_states

from commands.plans import load_plan
from commands.preview import preview
from commands.rollout import load_rollout
from commands.saga import load_saga
from iotflow.errors import ConfigError
from twins.behaviours import SIMULATOR_BEHAVIOURS


def test_saga_preview_lists_writes_in_order_with_predicted_state_and_the_undo_plan() -> None:
    reg = home_registry(lights=4)
    twins = home_states(4)
    given = copy.deepcopy(twins)
    p = preview(load_saga(LEAVING_HOME), reg, twins, plan_id="leave-7")
    assert twins == given  # nothing given is changed
    assert [(w.batch, w.phase, w.device_id, w.command) for w in p.writes] == [
        (1, "lock_doors", "lock-0001", "lock"),
        (1, "lock_doors", "lock-0002", "lock"),
        (2, "thermostat_away", "hvac-0001", "set_temperature"),
        (3, "lights_off", "light-0001", "turn_off"),
        (3, "lights_off", "light-0002", "turn_off"),
        (3, "lights_off", "light-0003", "turn_off"),
        (3, "lights_off", "light-0004", "turn_off"),
        (4, "arm_security", "security-0001", "arm"),
        (5, "notify", "notifier-0001", "notify"),
    ]
    assert p.writes[2].predicted == {"mode": "heat", "setpoint": 16.0, "fan_speed": 1}
    assert p.final["light-0002"] == {"on": 0, "brightness": 20}
    assert p.final["security-0001"] == {"armed": 1}
    # the undo plan: reverse order, previous setpoint, per-light previous state
    phases = list(dict.fromkeys(w.phase for w in p.undo))
    assert phases == [
        "undo arm_security",
        "undo lights_off",
        "undo thermostat_away",
        "undo lock_doors",
    ]
    undo = {(w.device_id, w.command): w.params for w in p.undo}
    assert undo[("hvac-0001", "set_temperature")] == {"setpoint": 21.5}
    assert undo[("light-0001", "turn_on")] == {}
    assert undo[("light-0001", "set_brightness")] == {"brightness": 10}
    assert ("light-0003", "turn_on") not in undo  # it was off already
    assert undo[("security-0001", "disarm")] == {}
    text = p.render()
    assert text.startswith("saga leave-7 (dry run; nothing sent): 9 writes in 5 batches")
    assert "undo if a step fails (11 writes):" in text


def test_preview_matches_what_a_run_sends() -> None:
    reg = home_registry(lights=5)
    p = preview(load_saga(LEAVING_HOME), reg, home_states(5), plan_id="leave-8")
    saga = load_saga(LEAVING_HOME).build(reg, "leave-8")
    loop = DeviceLoop(reg, home_states(5))
    loop.start(saga)
    loop.run(saga)
    sent = [(c.device_id, c.name, c.params) for c in loop.issued]
    assert sent == [(w.device_id, w.command, w.params) for w in p.writes]
    assert {d: loop.states[d] for d in p.final} == p.final


def test_conditions_and_notes_show_up() -> None:
    reg = home_registry(lights=3)
    twins = home_states(3)
    del twins["hvac-0001"]["setpoint"]
    spec = {
        **LEAVING_HOME,
        "steps": [
            *LEAVING_HOME["steps"][:2],
            {**LEAVING_HOME["steps"][2], "when": "on == 1"},
            *LEAVING_HOME["steps"][3:],
        ],
    }
    p = preview(load_saga(spec), reg, twins)
    assert ("lights_off", "light-0003", "condition 'on == 1' is false") in p.skipped
    assert any("hvac-0001 reported no setpoint to restore" in n for n in p.notes)
    assert "note: thermostat_away: hvac-0001 reported no setpoint to restore" in p.render()


def test_rollout_preview_shows_waves_and_the_roll_back() -> None:
    reg = home_registry()
    devices = [f"node-{i:05d}" for i in range(1, 41)]
    spec = load_rollout(
        {
            "name": "fw",
            "target": {"devices": devices},
            "command": "update_firmware",
            "params": {"version": "2.1"},
            "waves": [5, 50, 100],
            "max_in_flight": 10,
        }
    )
    p = preview(spec, reg, {d: {"firmware": "2.0"} for d in devices})
    assert [w.device_id for w in p.writes] == devices
    waves = {w.phase: 0 for w in p.writes}
    for w in p.writes:
        waves[w.phase] += 1
    assert waves == {"wave 0": 2, "wave 1": 18, "wave 2": 20}
    assert len({w.batch for w in p.writes if w.phase == "wave 2"}) == 2  # 10 in flight at most
    assert [w.device_id for w in p.undo] == devices[::-1]
    assert all(w.params == {"version": "2.0"} for w in p.undo)
    assert "undo if the rollout aborts (40 writes):" in p.render()
    assert p.render(limit=3).count("... 37 more") == 2


def test_behaviours_predict_slow_properties() -> None:
    reg = home_registry(lights=1)
    plan = load_plan(
        {
            "name": "cool",
            "steps": [
                {
                    "name": "mode",
                    "target": "hvac-0001",
                    "command": "set_mode",
                    "params": {"mode": "cool"},
                },
                {
                    "name": "sp",
                    "target": "hvac-0001",
                    "command": "set_temperature",
                    "params": {"setpoint": 20},
                },
            ],
        }
    )
    twins = {"hvac-0001": {"temperature": 26.0, "mode": "off", "setpoint": 22.0, "fan_speed": 1}}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    p = preview(
        plan, reg, twins, behaviours=SIMULATOR_BEHAVIOURS, start=start, horizon=timedelta(hours=1)
    )
    assert p.prediction is not None and p.prediction.ok
    final = p.prediction.final["hvac-0001"]
    assert final["mode"] == "cool" and final["setpoint"] == 20.0
    assert 20.0 <= final["temperature"] < 21.0  # followed the new setpoint
    assert p.to_dict()["prediction"]["ok"] is True


def test_bad_declarations_fail_as_a_run_would() -> None:
    reg = home_registry()
    bad = load_plan(
        {"name": "x", "steps": [{"name": "a", "target": {"group": "nope"}, "command": "lock"}]}
    )
    with pytest.raises(ConfigError, match="unknown group 'nope'"):
        preview(bad, reg, {})
    with pytest.raises(ConfigError, match="preview takes a plan, saga or rollout"):
        preview({"name": "x"}, reg, {})  # type: ignore[arg-type]


def test_cli_prints_the_preview_of_a_declaration_file(
    tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from dataflows.leaving_home import ROUTINE_FILE, home_registry
    from iotflow.cli import main

    registry = tmp_path / "home.yaml"
    registry.write_text(yaml.safe_dump(home_registry(lights=3).to_dict()))
    twins = tmp_path / "twins.json"
    twins.write_text('{"hvac-0001": {"setpoint": 21.5}, "light-0001": {"on": 1, "brightness": 60}}')
    monkeypatch.setenv("IOTFLOW_REGISTRY", str(registry))
    assert main(["preview", str(ROUTINE_FILE), "--twins", str(twins)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "saga leaving-home-preview (dry run; nothing sent): 8 writes in 5 batches"
    )
    assert 'undo thermostat_away  hvac-0001      set_temperature  {"setpoint":21.5}' in out
    assert main(["preview", str(ROUTINE_FILE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "saga"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps: [{name: a, target: {group: nope}, command: lock}]\n")
    assert main(["preview", str(bad)]) == 2
    assert "unknown group 'nope'" in capsys.readouterr().err
    twins.write_text("[1, 2]")
    assert main(["preview", str(ROUTINE_FILE), "--twins", str(twins)]) == 2
    assert "must map device ids to reported states" in capsys.readouterr().err
