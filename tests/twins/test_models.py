"""Twin models: property checks per type, commands, the dictionary and file forms."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from iotflow.errors import ConfigError, TwinRejected
from twins.models import MAX_STRING_CHARS, CommandSpec, PropertySpec, define_model, load_models

HVAC = {
    "properties": {
        "temperature": {"type": "float", "unit": "C", "min": -40, "max": 85},
        "setpoint": {"type": "float", "unit": "C", "min": 10, "max": 32, "writable": True},
        "mode": {"type": "enum", "values": ["off", "heat", "cool"], "writable": True},
        "fan_speed": {"type": "int", "min": 0, "max": 3, "writable": True},
        "eco": {"type": "bool", "writable": True},
        "serviced_at": "timestamp",
        "firmware": "string",
    },
    "telemetry": ["humidity"],
    "commands": [
        {
            "name": "set_temperature",
            "params": {"setpoint": {"type": "float", "min": 10, "max": 32}},
            "sets": {"setpoint": "params.setpoint"},
        },
        {
            "name": "set_mode",
            "params": {"mode": {"type": "enum", "values": ["off", "heat", "cool"]}},
            "sets": {"mode": "params.mode"},
        },
        {"name": "eco_on", "sets": {"eco": True}},
        {"name": "eco_off", "sets": {"eco": False}},
        "reboot",
    ],
    "heartbeat": "30s",
}


@pytest.fixture
def hvac():
    return define_model("hvac_controller", HVAC)


def rejected(fn, *args, kind: str) -> TwinRejected:
    with pytest.raises(TwinRejected) as info:
        fn(*args)
    assert info.value.kind == kind, info.value.reason
    return info.value


def test_dictionary_form_with_command_list(hvac):
    assert hvac.name == "hvac_controller"
    assert set(hvac.commands) == {"set_temperature", "set_mode", "eco_on", "eco_off", "reboot"}
    assert hvac.properties["serviced_at"].type == "timestamp"
    assert hvac.heartbeat == timedelta(seconds=30)
    assert hvac.telemetry == ["humidity"]


def test_float_normalizes_and_checks_range(hvac):
    assert hvac.check_property("setpoint", 23) == 23.0
    assert isinstance(hvac.check_property("setpoint", 23), float)
    err = rejected(hvac.check_property, "setpoint", 40, kind="out_of_range")
    assert "setpoint" in err.reason and "40" in err.reason and "10..32 C" in err.reason
    assert err.field == "setpoint"
    rejected(hvac.check_property, "setpoint", 9.99, kind="out_of_range")
    assert hvac.check_property("setpoint", 32) == 32.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rejected(hvac, bad):
    err = rejected(hvac.check_property, "temperature", bad, kind="wrong_type")
    assert "finite" in err.reason


@pytest.mark.parametrize("bad", ["21.5", True, None, [21], {"v": 1}])
def test_float_wrong_type(hvac, bad):
    err = rejected(hvac.check_property, "temperature", bad, kind="wrong_type")
    assert "expected a number" in err.reason


def test_int_accepts_integral_floats_only(hvac):
    assert hvac.check_property("fan_speed", 2.0) == 2
    assert type(hvac.check_property("fan_speed", 2.0)) is int
    rejected(hvac.check_property, "fan_speed", 1.5, kind="wrong_type")
    rejected(hvac.check_property, "fan_speed", 4, kind="out_of_range")
    rejected(hvac.check_property, "fan_speed", False, kind="wrong_type")


def test_bool_accepts_zero_one(hvac):
    assert hvac.check_property("eco", True) is True
    assert hvac.check_property("eco", 0) is False
    rejected(hvac.check_property, "eco", 2, kind="wrong_type")
    rejected(hvac.check_property, "eco", "true", kind="wrong_type")


def test_enum(hvac):
    assert hvac.check_property("mode", "heat") == "heat"
    err = rejected(hvac.check_property, "mode", "turbo", kind="out_of_range")
    assert "off, heat, cool" in err.reason
    rejected(hvac.check_property, "mode", 1, kind="wrong_type")


def test_timestamp_forms(hvac):
    ms = 1767268800000
    assert hvac.check_property("serviced_at", ms) == ms
    assert hvac.check_property("serviced_at", "2026-01-01T12:00:00+00:00") == ms
    assert hvac.check_property("serviced_at", "2026-01-01T13:00:00+01:00") == ms
    assert hvac.check_property("serviced_at", datetime(2026, 1, 1, 12, tzinfo=UTC)) == ms
    rejected(hvac.check_property, "serviced_at", "2026-01-01T12:00:00", kind="wrong_type")
    rejected(hvac.check_property, "serviced_at", "yesterday", kind="wrong_type")
    rejected(hvac.check_property, "serviced_at", datetime(2026, 1, 1), kind="wrong_type")
    aware = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    assert hvac.check_property("serviced_at", aware) == ms - 2 * 3600 * 1000


def test_string_limit(hvac):
    assert hvac.check_property("firmware", "1.2.3") == "1.2.3"
    err = rejected(
        hvac.check_property, "firmware", "x" * (MAX_STRING_CHARS + 1), kind="out_of_range"
    )
    assert len(err.reason) < 200  # the huge value is not echoed back
    rejected(hvac.check_property, "firmware", 123, kind="wrong_type")


def test_string_lengths():
    spec = PropertySpec(type="string", min_length=1, max_length=3)
    assert spec.check("abc", where="s") == "abc"
    with pytest.raises(TwinRejected, match="under the minimum of 1"):
        spec.check("", where="s")
    with pytest.raises(TwinRejected, match="over the limit of 3"):
        spec.check("abcd", where="s")
    for bad in (
        {"type": "int", "max_length": 3},
        {"type": "string", "min_length": 5, "max_length": 2},
    ):
        with pytest.raises(ValueError):
            PropertySpec.model_validate(bad)


def test_unknown_property_lists_known(hvac):
    err = rejected(hvac.check_property, "colour", "red", kind="unknown_property")
    assert "colour" in err.reason and "setpoint" in err.reason


def test_check_desired_requires_writable(hvac):
    assert hvac.check_desired("setpoint", 22) == 22.0
    err = rejected(hvac.check_desired, "temperature", 22, kind="not_writable")
    assert "read-only" in err.reason and "setpoint" in err.reason


def test_check_command(hvac):
    assert hvac.check_command("set_temperature", {"setpoint": 23}) == {"setpoint": 23.0}
    assert hvac.check_command("reboot", {}) == {}
    err = rejected(hvac.check_command, "explode", {}, kind="unknown_command")
    assert "set_temperature" in err.reason
    rejected(hvac.check_command, "set_temperature", {}, kind="missing_param")
    rejected(hvac.check_command, "set_temperature", {"setpoint": 23, "x": 1}, kind="unknown_param")
    rejected(hvac.check_command, "set_temperature", {"setpoint": 99}, kind="out_of_range")
    err = rejected(hvac.check_command, "set_temperature", {"setpoint": "hot"}, kind="wrong_type")
    assert err.field == "set_temperature.params.setpoint"
    rejected(hvac.check_command, "set_temperature", ["setpoint"], kind="wrong_type")
    rejected(hvac.check_command, "reboot", {"now": True}, kind="unknown_param")


def test_expected_state(hvac):
    assert hvac.commands["set_temperature"].expected_state({"setpoint": 23.5}) == {"setpoint": 23.5}
    assert hvac.commands["eco_on"].expected_state({}) == {"eco": True}
    assert hvac.commands["reboot"].expected_state({}) == {}


def test_commands_for_delta(hvac):
    assert hvac.commands_for({"setpoint": 24.0, "eco": False}) == [
        ("set_temperature", {"setpoint": 24.0}),
        ("eco_off", {}),
    ]
    err = rejected(hvac.commands_for, {"fan_speed": 2}, kind="no_command")
    assert "fan_speed" in err.reason


def test_commands_for_multi_param_command():
    model = define_model(
        "rgb",
        {
            "properties": {
                c: {"type": "int", "min": 0, "max": 255, "writable": True} for c in "rgb"
            },
            "commands": {
                "set_color": {
                    "params": {c: {"type": "int", "min": 0, "max": 255} for c in "rgb"},
                    "sets": {c: f"params.{c}" for c in "rgb"},
                }
            },
        },
    )
    assert model.commands_for({"r": 1, "g": 2, "b": 3}) == [("set_color", {"r": 1, "g": 2, "b": 3})]
    # a partial change cannot fill every parameter
    rejected(model.commands_for, {"r": 1}, kind="no_command")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"properties": {"a": {"type": "decimal"}}}, "properties.a.type"),
        ({"properties": {"a": {"type": "float", "min": 5, "max": 1}}}, "swap them"),
        ({"properties": {"a": {"type": "enum"}}}, "needs values"),
        ({"properties": {"a": {"type": "string", "min": 1}}}, "min/max apply"),
        ({"properties": {"a": {"type": "float", "units": "C"}}}, "units"),
        (
            {"properties": {"a": "float"}, "commands": {"c": {"sets": {"b": 1}}}},
            "unknown property 'b'",
        ),
        (
            {"properties": {"a": "float"}, "commands": {"c": {"sets": {"a": "params.x"}}}},
            "no parameter 'x'",
        ),
        (
            {"properties": {"a": {"type": "int", "max": 3}}, "commands": {"c": {"sets": {"a": 9}}}},
            "out of range",
        ),
        ({"properties": {"a": "float"}, "commands": ["c", "c"]}, "declared twice"),
        ({"properties": {"a": "float"}, "heartbeat": "soon"}, "heartbeat"),
        ({"properties": {"a": "float"}, "heartbeat": "-5s"}, "positive"),
        ({"telemetry": ["x"]}, "properties"),
    ],
)
def test_bad_declarations_name_the_field(spec, needle):
    with pytest.raises(ConfigError) as info:
        define_model("m", spec)
    assert needle in str(info.value)
    assert "twin model 'm'" in str(info.value)


def test_define_model_rejects_non_mapping_and_name_mismatch():
    with pytest.raises(ConfigError, match="must be an object"):
        define_model("m", ["properties"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="another name"):
        define_model("m", {"name": "n", "properties": {}})


def test_fingerprint_tracks_the_declaration(hvac):
    same = define_model("hvac_controller", HVAC)
    assert same.fingerprint == hvac.fingerprint
    changed = json.loads(json.dumps(HVAC))
    changed["properties"]["setpoint"]["max"] = 30
    assert define_model("hvac_controller", changed).fingerprint != hvac.fingerprint


def test_load_models_yaml_and_json(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"models": {"hvac": HVAC}}))
    (tmp_path / "m.yaml").write_text(
        "models:\n  lock:\n    properties: {locked: {type: int, min: 0, max: 1}}\n"
    )
    assert load_models(tmp_path / "m.json")["hvac"].commands["set_mode"].params["mode"].values
    assert load_models(tmp_path / "m.yaml")["lock"].properties["locked"].max == 1
    (tmp_path / "bad.yaml").write_text(
        "models:\n  lock:\n    properties: {locked: {type: integer}}\n"
    )
    with pytest.raises(ConfigError, match=r"properties\.locked\.type"):
        load_models(tmp_path / "bad.yaml")
    (tmp_path / "none.yaml").write_text("lock: {}\n")
    with pytest.raises(ConfigError, match="'models' mapping"):
        load_models(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.json"):
        load_models(tmp_path / "m.txt")


def test_property_spec_and_command_spec_standalone():
    spec = PropertySpec(type="float", min=0)
    assert spec.check(1, where="p") == 1.0
    with pytest.raises(TwinRejected, match=r"p: -1 is out of range 0\.\."):
        spec.check(-1, where="p")
    with pytest.raises(ValueError):
        CommandSpec(sets={"x": "params.y"})
