"""The device registry: devices, groups, dimensions, nearest, patterns, files, and the simulator's registry."""

from __future__ import annotations

import json

import pytest

from infra.simulator import FleetConfig
from infra.simulator.kinds import KINDS
from iotflow.errors import ConfigError, TwinRejected
from twins.registry import Device, Registry, load_registry, simulator_registry

TEMP = {"properties": {"temperature": {"type": "float", "unit": "C"}}}
LOCK = {
    "properties": {"locked": {"type": "int", "min": 0, "max": 1, "writable": True}},
    "commands": {"lock": {"sets": {"locked": 1}}, "unlock": {"sets": {"locked": 0}}},
}


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.define_model("temp", TEMP)
    r.define_model("lock", LOCK)
    r.add_device("t1", "temp", building="A", floor=1, zone="north", x=0.0, y=0.0)
    r.add_device("t2", "temp", building="A", floor=2, zone="south", x=3.0, y=4.0)
    r.add_device("t3", "temp", building="B", floor=1, zone="north", x=1.0, y=1.0)
    r.add_device("t4", "temp", building="B", floor=1)
    r.add_device("door", "lock", building="A", floor=1, protocol="zigbee", gateway="gw-1")
    r.add_group("temperature_sensors", ["t1", "t2", "t3", "t4"])
    return r


def test_device_and_model_lookup(reg):
    device = reg.device("door")
    assert device == Device("door", "lock", device.metadata)
    assert device.metadata["gateway"] == "gw-1"
    assert reg.model_of("t1").name == "temp"
    with pytest.raises(TwinRejected) as info:
        reg.device("ghost")
    assert info.value.kind == "unknown_device" and info.value.device_id == "ghost"
    assert "ghost" in info.value.reason
    with pytest.raises(TwinRejected):
        reg.device(42)  # type: ignore[arg-type]


def test_metadata_is_read_only(reg):
    with pytest.raises(TypeError):
        reg.device("t1").metadata["floor"] = 9  # type: ignore[index]


def test_groups(reg):
    assert reg.group("temperature_sensors") == ["t1", "t2", "t3", "t4"]
    assert reg.groups_of("t1") == ["temperature_sensors"]
    with pytest.raises(ConfigError, match="temperature_sensors"):
        reg.group("nope")
    with pytest.raises(ConfigError, match="unknown device 'ghost'"):
        reg.add_group("g", ["t1", "ghost"])
    with pytest.raises(ConfigError, match="not the string"):
        reg.add_group("g", "t1")


def test_where_by_dimensions(reg):
    assert reg.where(building="A") == ["t1", "t2", "door"]
    assert reg.where(building="A", floor=1) == ["t1", "door"]
    assert reg.where(model="temp", floor=1) == ["t1", "t3", "t4"]
    assert reg.where(zone="east") == []
    assert reg.where(protocol="zigbee") == ["door"]


def test_nearest_by_coordinates(reg):
    assert reg.nearest("temperature_sensors", "t1") == ["t3"]
    assert reg.nearest("temperature_sensors", "t1", n=5) == ["t3", "t2"]  # t4 has no coordinates
    assert reg.nearest("temperature_sensors", "t2", n=2) == ["t3", "t1"]
    with pytest.raises(ConfigError, match="no coordinates"):
        reg.nearest("temperature_sensors", "t4")
    with pytest.raises(ConfigError, match="positive integer"):
        reg.nearest("temperature_sensors", "t1", n=0)


def test_nearest_ties_go_to_smaller_id():
    r = Registry()
    r.define_model("temp", TEMP)
    for name, x in (("c", 0.0), ("b", 1.0), ("a", -1.0)):
        r.add_device(name, "temp", x=x, y=0.0)
    r.add_group("g", ["c", "b", "a"])
    assert r.nearest("g", "c") == ["a"]


@pytest.mark.parametrize(
    ("device_id", "needle"),
    [
        ("", "empty"),
        ("a/b", "contains"),
        ("a+", "contains"),
        ("#", "contains"),
        ("x" * 200, "limit"),
        ("a\nb", "control"),
    ],
)
def test_hostile_device_ids_rejected_at_registration(device_id, needle):
    r = Registry()
    r.define_model("temp", TEMP)
    with pytest.raises(ConfigError, match=needle):
        r.add_device(device_id, "temp")


def test_bad_registration(reg):
    with pytest.raises(ConfigError, match=r"unknown model 'fridge' \(models: lock, temp\)"):
        reg.add_device("f1", "fridge")
    with pytest.raises(ConfigError, match="finite number"):
        reg.add_device("t9", "temp", x=float("nan"), y=0)
    with pytest.raises(ConfigError, match="finite number"):
        reg.add_device("t9", "temp", x="3", y=0)


def test_check_command_names_device(reg):
    assert reg.check_command("door", "unlock", {}) == {}
    with pytest.raises(TwinRejected) as info:
        reg.check_command("door", "open_sesame", {})
    assert info.value.device_id == "door" and info.value.kind == "unknown_command"
    assert "door" in info.value.reason and "lock, unlock" in info.value.reason
    with pytest.raises(TwinRejected) as info:
        reg.check_command("ghost", "unlock", {})
    assert info.value.kind == "unknown_device"


def test_patterns_assign_models(reg):
    reg.add_pattern("lock-*", "lock")
    assert reg.device("lock-0042").model == "lock"
    assert reg.knows("lock-7") and not reg.knows("lick-7")
    assert not reg.knows("lock-a/b")  # a hostile id never matches a pattern
    assert reg.where(model="lock") == ["door"]  # pattern devices have no metadata
    with pytest.raises(ConfigError, match="unknown model"):
        reg.add_pattern("x-*", "nope")


def test_file_round_trip(reg, tmp_path):
    reg.add_pattern("lock-*", "lock")
    again = Registry.from_dict(reg.to_dict())
    assert again.to_dict() == reg.to_dict()
    assert again.fingerprint == reg.fingerprint
    assert again.nearest("temperature_sensors", "t1") == ["t3"]
    reg.add_device("t5", "temp")
    assert Registry.from_dict(reg.to_dict()).fingerprint != again.fingerprint


def test_load_yaml_file(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text(
        """
models:
  lock:
    properties: {locked: {type: int, min: 0, max: 1, writable: true}}
    commands: {lock: {sets: {locked: 1}}, unlock: {sets: {locked: 0}}}
devices:
  lock-front: {model: lock, building: A, floor: 0, x: 0.0, y: 1.5}
patterns: {"lock-*": lock}
groups: {doors: [lock-front, lock-back]}
"""
    )
    r = load_registry(path)
    assert r.group("doors") == ["lock-front", "lock-back"]
    assert r.device("lock-front").metadata == {"building": "A", "floor": 0, "x": 0.0, "y": 1.5}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("devices: {d1: {model: nope}}", "unknown model 'nope'"),
        ("devices: {d1: {building: A}}", "devices.d1.model"),
        ("groups: {g: [ghost]}", "unknown device 'ghost'"),
        ("models: {m: {properties: {a: {type: floaty}}}}", "properties.a.type"),
        ("devicez: {}", "devicez"),
        ("models: [1, 2]", "models"),
        ("- 1", "registry"),
    ],
)
def test_bad_registry_files(tmp_path, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        Registry.load(path)


def test_load_registry_none_is_the_simulator_registry():
    assert load_registry(None).to_dict() == simulator_registry().to_dict()


def _valid_params(spec):
    params = {}
    for name, p in spec.params.items():
        if p.type == "enum":
            params[name] = p.values[-1]
        elif p.type == "string":
            params[name] = "v1.2"
        else:
            params[name] = p.max if p.max is not None else 1
            if p.type == "int":
                params[name] = int(params[name])
    return params


def test_simulator_registry_agrees_with_the_simulator_kinds():
    """Every kind's commands, state and metrics fit its model, and each command's
    ``expected_state`` is what the simulated device really reports afterwards."""
    reg = simulator_registry()
    fleet = FleetConfig(devices={kind.value: 1 for kind in KINDS}).build()
    for device_id in fleet.devices:
        model = reg.model_of(device_id)
        spec = fleet.devices[device_id].spec
        assert model.name == spec.kind.value
        assert set(model.commands) == set(spec.commands)
        reported = fleet.stats().devices[device_id].reported
        for prop, value in reported.items():
            assert model.check_property(prop, value) == value
        for prop in spec.state_metrics:
            assert model.properties[prop].writable
        for metric in spec.metrics:
            assert metric.name in model.properties
        for name, command in model.commands.items():
            params = model.check_command(name, _valid_params(command))
            changes = spec.commands[name](params, dict(spec.initial_state))
            assert changes == command.expected_state(params), name
        # a telemetry message's fields are all properties or declared telemetry
        payload = fleet.telemetry(device_id, 1767268800000)
        assert payload is not None
        for key in json.loads(payload.payload):
            assert key == "ts" or key in model.properties or key in model.telemetry
