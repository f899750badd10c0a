"""Simulation: a plan applied to a copy of the twins at its times, behaviours in between,
every bad plan item rejected in the result while the rest runs, determinism, bounds."""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from iotflow.errors import ConfigError
from twins.behaviours import SIMULATOR_BEHAVIOURS, Behaviours, Linear, Thermal
from twins.registry import simulator_registry
from twins.simulation import PlannedCommand, Prediction, simulate

START = datetime(2026, 1, 1, 8, tzinfo=UTC)
REGISTRY = simulator_registry()
MINUTE = timedelta(minutes=1)


def hvac(temperature: float = 27.0, mode: str = "off", setpoint: float = 21.0) -> dict[str, Any]:
    return {"temperature": temperature, "mode": mode, "setpoint": setpoint, "fan_speed": 1}


def run(
    twins: Any, plan: Any, behaviours: Behaviours = SIMULATOR_BEHAVIOURS, **kw: Any
) -> Prediction:
    options = {"registry": REGISTRY, "start": START, "horizon": timedelta(hours=1), "step": MINUTE}
    return simulate(twins, behaviours, plan, **{**options, **kw})


def state_at(p: Prediction, device: str, at: datetime) -> dict[str, Any]:
    """The last sample at ``at`` (after the commands of that time)."""
    return [s.state for s in p.trajectory[device] if s.at == at][-1]


def test_commands_take_effect_at_their_time_and_behaviours_move_in_between() -> None:
    twins = {"hvac-0001": hvac()}
    plan = [
        (timedelta(minutes=10), "hvac-0001", "set_mode", {"mode": "cool"}),
        (timedelta(minutes=10), "hvac-0001", "set_temperature", {"setpoint": 20}),
    ]
    p = run(twins, plan)
    assert p.ok
    before = state_at(p, "hvac-0001", START + timedelta(minutes=9))
    after = state_at(p, "hvac-0001", START + timedelta(minutes=10))
    assert (before["mode"], before["setpoint"]) == ("off", 21.0)
    assert (after["mode"], after["setpoint"]) == ("cool", 20.0)
    # off: drifting from 27 to the 24 C ambient; then cooling towards 20
    drift = 24 + 3 * math.exp(-600 / 7200)
    assert after["temperature"] == pytest.approx(drift)
    assert 20 < p.final["hvac-0001"]["temperature"] < 21
    assert [c.sets for c in p.applied] == [{"mode": "cool"}, {"setpoint": 20.0}]
    assert p.changes("hvac-0001")["mode"] == ("off", "cool")
    assert p.reaches("hvac-0001", "temperature", 22.0) is not None


def test_the_twins_given_are_not_changed_and_the_result_is_deterministic() -> None:
    twins = {"hvac-0001": hvac(), "lock-0001": {"locked": 1, "battery": 50.0}}
    kept = copy.deepcopy(twins)
    plan = [(timedelta(minutes=1), "lock-0001", "unlock", {})]
    first, second = run(twins, plan), run(twins, plan)
    assert twins == kept
    assert first == second
    assert first.initial == kept


def test_the_result_does_not_depend_on_the_step() -> None:
    twins = {"hvac-0001": hvac()}
    plan = [(timedelta(minutes=13), "hvac-0001", "set_mode", {"mode": "heat"})]
    fine = run(twins, plan, step=timedelta(seconds=10)).final
    coarse = run(twins, plan, step=timedelta(minutes=7)).final
    assert fine["hvac-0001"]["temperature"] == pytest.approx(coarse["hvac-0001"]["temperature"])


def test_battery_drains_linearly_and_is_clamped_at_its_minimum() -> None:
    twins = {
        "lock-0001": {"locked": 1, "battery": 50.0},
        "lock-0002": {"locked": 1, "battery": 0.3},
    }
    behaviours = Behaviours(
        models={"lock": [Linear(property="battery", per_h=-0.5, per_command={"unlock": -1.0})]}
    )
    plan = [(timedelta(hours=2), "lock-0001", "unlock", {})]
    p = run(twins, plan, behaviours, horizon=timedelta(days=1), step=timedelta(hours=1))
    assert p.final["lock-0001"] == {"locked": 0, "battery": pytest.approx(50 - 12 - 1)}
    assert p.final["lock-0002"]["battery"] == 0.0  # the model's min
    assert len(p.trajectory["lock-0001"]) == 1 + 24  # start and every step (the command is on one)


def test_every_bad_plan_item_is_rejected_with_a_reason_and_the_rest_applied() -> None:
    twins = {"hvac-0001": hvac(), "lock-0001": {"locked": 1, "battery": 50.0}}
    hostile = "../../x/#/+" + "\x00" * 3
    plan: list[Any] = [
        (MINUTE, "hvac-0001", "set_temperature", {"setpoint": 23}),  # 0 fine
        (MINUTE, "boiler-1", "set_mode", {"mode": "cool"}),  # 1 unknown device
        (MINUTE, "hvac-0001", "explode", {}),  # 2 unknown command
        (MINUTE, "hvac-0001", "set_temperature", {}),  # 3 missing param
        (MINUTE, "hvac-0001", "set_temperature", {"setpoint": 23, "x": 1}),  # 4 extra param
        (MINUTE, "hvac-0001", "set_temperature", {"setpoint": "warm"}),  # 5 wrong type
        (MINUTE, "hvac-0001", "set_temperature", {"setpoint": math.nan}),  # 6 NaN
        (MINUTE, "hvac-0001", "set_fan_speed", {"speed": 7}),  # 7 out of range
        (timedelta(hours=2), "lock-0001", "unlock", {}),  # 8 after the horizon
        (START - MINUTE, "lock-0001", "unlock", {}),  # 9 before the start
        (datetime(2026, 1, 1, 8, 30), "lock-0001", "unlock", {}),  # 10 naive datetime
        ("soon", "lock-0001", "unlock", {}),  # 11 bad duration
        ("5m", "lock-0001"),  # 12 too short
        "unlock lock-0001",  # 13 not an item
        {"at": "5m", "device": "lock-0001", "command": "unlock"},  # 14 wrong field
        (MINUTE, 42, "unlock", {}),  # 15 device id not a string
        (MINUTE, hostile, "unlock", {}),  # 16 hostile id
        (MINUTE, "lock-0001", "unlock", "now"),  # 17 params not an object
        {"at": "30m", "device_id": "lock-0001", "command": "unlock"},  # 18 fine
        PlannedCommand(START + timedelta(minutes=40), "lock-0001", "lock"),  # 19 fine
        ("9999999999d", "lock-0001", "lock", {}),  # 20 no timedelta holds it
        (datetime(9999, 12, 31, tzinfo=UTC), "lock-0001", "lock", {}),  # 21 far future
    ]
    p = run(twins, plan)
    assert not p.ok
    assert [c.index for c in p.applied] == [0, 18, 19]
    kinds = {r.index: r.kind for r in p.rejected}
    assert kinds == {
        1: "unknown_device",
        2: "unknown_command",
        3: "missing_param",
        4: "unknown_param",
        5: "wrong_type",
        6: "wrong_type",
        7: "out_of_range",
        8: "outside_horizon",
        9: "outside_horizon",
        10: "malformed",
        11: "malformed",
        12: "malformed",
        13: "malformed",
        14: "malformed",
        15: "unknown_device",
        16: "unknown_device",
        17: "wrong_type",
        20: "malformed",
        21: "outside_horizon",
    }
    reasons = {r.index: r.reason for r in p.rejected}
    assert "boiler-1" in reasons[1]
    assert "explode" in reasons[2] and "set_temperature" in reasons[2]  # lists what it accepts
    assert "outside the simulated span" in reasons[8]
    assert "naive" in reasons[10]
    assert "'soon' is not understood" in reasons[11]
    assert "unknown field 'device'" in reasons[14]
    assert p.final["hvac-0001"]["setpoint"] == 23.0
    assert p.final["lock-0001"]["locked"] == 1  # unlocked at 30 min, locked again at 40
    json.dumps(p.to_dict())


def test_commands_at_one_time_apply_in_plan_order() -> None:
    twins = {"hvac-0001": hvac()}
    plan = [
        (MINUTE * 5, "hvac-0001", "set_mode", {"mode": "heat"}),
        (MINUTE * 2, "hvac-0001", "set_mode", {"mode": "fan"}),
        (MINUTE * 5, "hvac-0001", "set_mode", {"mode": "cool"}),
    ]
    p = run(twins, plan)
    assert [c.index for c in p.applied] == [1, 0, 2]
    assert p.final["hvac-0001"]["mode"] == "cool"


def test_commands_at_the_start_and_at_the_end_count() -> None:
    twins = {"hvac-0001": hvac()}
    plan = [
        (timedelta(0), "hvac-0001", "set_mode", {"mode": "cool"}),
        (START + timedelta(hours=1), "hvac-0001", "set_temperature", {"setpoint": 30}),
    ]
    p = run(twins, plan)
    assert p.trajectory["hvac-0001"][0].state["mode"] == "cool"
    assert p.trajectory["hvac-0001"][0].at == START
    assert p.final["hvac-0001"]["setpoint"] == 30.0
    assert p.trajectory["hvac-0001"][-1].at == START + timedelta(hours=1)


def test_unknown_twins_and_missing_values_are_warned_not_raised() -> None:
    twins: dict[str, Any] = {
        "nobody-1": {"temperature": 20.0},
        "hvac-0001": {"mode": "cool", "setpoint": 21.0},  # no temperature yet
        "hvac-0002": "broken",
    }
    p = run(twins, [(MINUTE, "light-0001", "turn_on", {})])
    assert p.final["nobody-1"] == {"temperature": 20.0}
    assert p.final["hvac-0001"] == {"mode": "cool", "setpoint": 21.0}
    assert p.final["light-0001"] == {"on": 1}  # commanded without a twin: starts empty
    assert "hvac-0002" not in p.final
    assert len(p.warnings) == 3  # once per device, not per step
    assert any("not in the registry" in w for w in p.warnings)
    assert any("temperature is None" in w for w in p.warnings)


def test_wrong_arguments_fail_before_any_work() -> None:
    twins = {"hvac-0001": hvac()}
    with pytest.raises(ConfigError, match="aware datetime"):
        run(twins, [], start=datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match="step=0ms must be positive"):
        run(twins, [], step=0)
    with pytest.raises(ConfigError, match="horizon=-1h must not be negative"):
        run(twins, [], horizon="-1h")
    with pytest.raises(ConfigError, match="is 2,592,000 steps, over max_steps=100,000"):
        run(twins, [], horizon="30d", step="1s")
    with pytest.raises(ConfigError, match="horizon: duration '9999999999d' is too long"):
        run(twins, [], horizon="9999999999d")
    with pytest.raises(ConfigError, match="step: duration 'often' is not understood"):
        run(twins, [], step="often")
    with pytest.raises(ConfigError, match="plan must be a list"):
        run(twins, "set_mode cool")
    with pytest.raises(ConfigError, match="twins must map device ids"):
        run([("hvac-0001", hvac())], [])
    wrong = Behaviours(models={"hvac": [Thermal(tau="1m", property="room")]})
    with pytest.raises(
        ConfigError, match=r"behaviours.models.hvac\[0\]: model 'hvac' has no property 'room'"
    ):
        run(twins, [], wrong)


def test_horizon_and_step_accept_duration_text_and_a_zero_horizon() -> None:
    twins = {"lock-0001": {"locked": 1, "battery": 50.0}}
    p = run(twins, [("0s", "lock-0001", "unlock", {})], horizon="0s", step="1m")
    assert p.final["lock-0001"] == {"locked": 0, "battery": 50.0}
    assert len(p.trajectory["lock-0001"]) == 1
    p = run(twins, [], horizon="90s", step="1m")  # the last step is cut at the horizon
    assert [s.at for s in p.trajectory["lock-0001"]][-1] == START + timedelta(seconds=90)
    assert p.to_dict()["step"] == "1m"


def test_track_keeps_only_the_trajectories_asked_for() -> None:
    twins = {f"lock-{i:04d}": {"locked": 1, "battery": 50.0} for i in range(100)}
    p = run(twins, [(MINUTE, "lock-0007", "unlock", {})], track=["lock-0007"])
    assert list(p.trajectory) == ["lock-0007"]
    assert len(p.final) == 100
    assert p.final["lock-0007"]["locked"] == 0
