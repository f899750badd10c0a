"""Behaviour models: the thermal zone's exact solution and switching, linear and exponential
moves, what each reads and which commands reach it, declarations checked against models."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotflow.errors import ConfigError
from twins.behaviours import (
    SIMULATOR_BEHAVIOURS,
    Behaviours,
    Exponential,
    Linear,
    Stalled,
    Thermal,
    load_behaviours,
)
from twins.models import define_model
from twins.registry import simulator_registry

MODELS = simulator_registry().models


def temp_after(zone: Thermal, state: dict[str, Any], seconds: float, pieces: int = 1) -> float:
    state = dict(state)
    for _ in range(pieces):
        state.update(zone.advance(state, seconds / pieces))  # type: ignore[arg-type]
    return state["temperature"]


def test_auto_mode_follows_the_first_order_solution() -> None:
    zone = Thermal(tau="10m", ambient=30, ambient_tau="1h")
    state = {"temperature": 20.0, "mode": "auto", "setpoint": 22.0}
    rate = 1 / 600 + 1 / 3600
    settle = (22 / 600 + 30 / 3600) / rate
    for seconds in (1, 60, 600, 7200):
        expected = settle + (20 - settle) * math.exp(-rate * seconds)
        assert temp_after(zone, state, seconds) == pytest.approx(expected, rel=1e-12)


def test_without_ambient_drift_the_zone_reaches_the_setpoint() -> None:
    zone = Thermal(tau="10m")
    state = {"temperature": 26.0, "mode": "cool", "setpoint": 21.0}
    assert temp_after(zone, state, 600) == pytest.approx(21 + 5 * math.exp(-1))
    assert temp_after(zone, state, 10 * 3600) == pytest.approx(21.0)
    off = {**state, "mode": "off"}
    assert temp_after(zone, off, 3600) == 26.0  # no drift, no conditioning: nothing moves


def test_one_way_modes_only_push_their_way() -> None:
    zone = Thermal(tau="10m", ambient=15, ambient_tau="2h")
    # cooling a zone already below its setpoint: the unit idles, the zone drifts to ambient
    cool = {"temperature": 18.0, "mode": "cool", "setpoint": 22.0}
    drift = 15 + 3 * math.exp(-1800 / 7200)
    assert temp_after(zone, cool, 1800) == pytest.approx(drift)
    heat = {**cool, "mode": "heat"}
    assert 18.0 < temp_after(zone, heat, 1800) < 22.0
    assert temp_after(zone, {**cool, "mode": "fan"}, 1800) == pytest.approx(drift)


def test_a_heat_only_unit_stops_at_its_setpoint_within_a_step() -> None:
    # ambient above the setpoint: heating would settle above 22, so it stops at 22 and drifts
    zone = Thermal(tau="10m", ambient=35, ambient_tau="1h")
    state = {"temperature": 18.0, "mode": "heat", "setpoint": 22.0}
    one = temp_after(zone, state, 3600)
    many = temp_after(zone, state, 3600, pieces=360)
    assert one == pytest.approx(many, rel=1e-9)
    assert 22.0 < one < 35.0


def test_an_on_switch_gates_the_unit() -> None:
    zone = Thermal(tau="10m", on="on", mode=None)
    state = {"temperature": 26.0, "on": False, "setpoint": 21.0}
    assert temp_after(zone, state, 600) == 26.0
    assert temp_after(zone, {**state, "on": True}, 600) < 26.0


def test_missing_or_bad_values_stall_with_a_reason() -> None:
    zone = Thermal(tau="10m")
    stalled = zone.advance({"mode": "cool", "setpoint": 21.0}, 60)
    assert isinstance(stalled, Stalled)
    assert "temperature is None" in stalled.reason
    stalled = zone.advance({"temperature": 25.0, "mode": "cool", "setpoint": "hot"}, 60)
    assert isinstance(stalled, Stalled)
    assert "setpoint is 'hot'" in stalled.reason
    assert isinstance(Linear(property="b", per_h=-1).advance({"b": math.nan}, 60), Stalled)
    assert isinstance(Exponential(property="b", tau="1h").advance({"b": True}, 60), Stalled)


def test_linear_and_exponential_moves() -> None:
    drain = Linear(property="battery", per_h=-0.5, per_command={"lock": -0.01})
    assert drain.advance({"battery": 80.0}, 7200) == {"battery": 79.0}
    assert drain.on_command("lock", {"battery": 80.0}) == {"battery": pytest.approx(79.99)}
    assert drain.on_command("unlock", {"battery": 80.0}) == {}
    decay = Exponential(property="battery", tau="10h", target=5)
    assert decay.advance({"battery": 85.0}, 36000)["battery"] == pytest.approx(5 + 80 / math.e)


def test_what_each_behaviour_moves_reads_and_is_driven_by() -> None:
    zone = Thermal(tau="15m", ambient=24, ambient_tau="2h")
    assert zone.moves == ("temperature",)
    assert zone.inputs == ("mode", "setpoint")
    assert zone.driven_by(MODELS["hvac"]) == {
        "set_mode": ["mode"],
        "set_temperature": ["setpoint"],
    }
    drain = Linear(property="battery", per_h=-0.02, per_command={"lock": -0.01, "unlock": -0.01})
    assert drain.driven_by(MODELS["lock"]) == {"lock": ["battery"], "unlock": ["battery"]}


def test_behaviours_are_checked_against_the_model() -> None:
    cases = [
        (Thermal(tau="1m", property="zone_temp"), "hvac", "has no property 'zone_temp'"),
        (Linear(property="fan_speed", per_h=1), "hvac", "moves 'fan_speed', a int property"),
        (Linear(property="battery", per_h=1, per_command={"open": 1}), "lock", "no command 'open'"),
        (Thermal(tau="1m", heat_modes=["warm"], cool_modes=[]), "hvac", "could never condition"),
    ]
    for behaviour, model, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            Behaviours(models={model: [behaviour]}).for_device("dev-1", MODELS[model])
        assert f"behaviours.models.{model}[0]" in str(caught.value)
    twice = Behaviours(
        devices={"hvac-9": [Thermal(tau="1m"), Exponential(property="temperature", tau="1h")]}
    )
    with pytest.raises(ConfigError, match=r"behaviours.devices.hvac-9\[1\] moves 'temperature'"):
        twice.for_device("hvac-9", MODELS["hvac"])


def test_device_entries_replace_their_models_list() -> None:
    behaviours = Behaviours(
        models={"lock": [Linear(property="battery", per_h=-0.02)]},
        devices={"lock-7": [Linear(property="battery", per_h=-1)]},
    )
    assert behaviours.for_device("lock-1", MODELS["lock"])[0].per_h == -0.02
    assert behaviours.for_device("lock-7", MODELS["lock"])[0].per_h == -1
    assert behaviours.for_device("light-1", MODELS["light"]) == []


def test_simulator_behaviours_fit_the_simulator_registry() -> None:
    for model in ("hvac", "lock"):
        assert SIMULATOR_BEHAVIOURS.for_device(f"{model}-0001", MODELS[model])


def test_declarations_load_and_name_the_wrong_field(tmp_path: Any) -> None:
    path = tmp_path / "behaviours.yaml"
    path.write_text(
        "models:\n"
        "  hvac: [{kind: thermal, tau: 15m, ambient: 24, ambient_tau: 2h}]\n"
        "devices:\n"
        "  lock-1: [{kind: exponential, property: battery, tau: 30d}]\n"
    )
    loaded = load_behaviours(path)
    assert loaded.models["hvac"][0].tau.total_seconds() == 900
    assert loaded.devices["lock-1"][0].kind == "exponential"
    assert load_behaviours(loaded.model_dump(mode="json")) == loaded
    cases = [
        ({"hvac": [{"kind": "magic"}]}, "models.hvac[0]: Input tag 'magic' found using 'kind'"),
        ({"hvac": [{"kind": "thermal"}]}, "models.hvac[0].thermal.tau: Field required"),
        ({"hvac": [{"kind": "thermal", "tau": "-5m"}]}, "must be a positive time constant"),
        ({"hvac": [{"kind": "thermal", "tau": "5m", "ambient": 20}]}, "give both ambient"),
        ({"lock": [{"kind": "linear", "property": "battery", "per_hr": 1}]}, "per_hr"),
        ({"lock": [{"kind": "linear", "property": "battery", "per_h": math.inf}]}, "per_h"),
    ]
    for models, message in cases:
        with pytest.raises(ConfigError) as caught:
            load_behaviours({"models": models})
        assert message in str(caught.value)
    with pytest.raises(ConfigError, match=r"must end in \.yaml"):
        load_behaviours(tmp_path / "behaviours.txt")


def test_a_model_defined_by_hand_works_too() -> None:
    pump = define_model(
        "pump",
        {
            "properties": {
                "bearing_temp": {"type": "float", "unit": "C"},
                "running": {"type": "bool", "writable": True},
            },
            "commands": {
                "start": {"sets": {"running": True}},
                "stop": {"sets": {"running": False}},
            },
        },
    )
    heat = Thermal(property="bearing_temp", setpoint="limit", mode=None, on="running", tau="1h")
    with pytest.raises(ConfigError, match="no property 'limit'"):
        heat.check(pump, "pump")
    decay = Exponential(property="bearing_temp", tau="30m", target=20)
    decay.check(pump, "pump")
    assert decay.driven_by(pump) == {}


@settings(max_examples=150, deadline=None)
@given(
    temp=st.floats(-20, 50),
    setpoint=st.floats(10, 32),
    ambient=st.floats(-20, 50),
    tau_s=st.integers(60, 7200),
    ambient_tau_s=st.integers(600, 86400),
    mode=st.sampled_from(["heat", "cool", "auto", "off"]),
    seconds=st.integers(1, 24 * 3600),
    pieces=st.integers(2, 50),
)
def test_thermal_result_does_not_depend_on_the_step(
    temp: float,
    setpoint: float,
    ambient: float,
    tau_s: int,
    ambient_tau_s: int,
    mode: str,
    seconds: int,
    pieces: int,
) -> None:
    zone = Thermal(tau=tau_s, ambient=ambient, ambient_tau=ambient_tau_s)
    state = {"temperature": temp, "mode": mode, "setpoint": setpoint}
    one = temp_after(zone, state, seconds)
    split = temp_after(zone, state, seconds, pieces)
    assert one == pytest.approx(split, rel=1e-9, abs=1e-9)
    # never beyond every value it is pulled to
    low, high = min(temp, setpoint, ambient), max(temp, setpoint, ambient)
    assert low - 1e-9 <= one <= high + 1e-9
