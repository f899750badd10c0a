"""Instructions: target selection, steps and their shorthand, expansion, bad declarations."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cmdkit import T0

from commands.instructions import Instruction, Target
from iotflow.errors import ConfigError
from twins.registry import Registry


def instruction(target: dict[str, Any], steps: list[Any], **extra: Any) -> Instruction:
    return Instruction.from_data(
        {"instruction_id": "i1", "target": target, "steps": steps, **extra}
    )


@pytest.mark.parametrize(
    ("target", "devices"),
    [
        ({"devices": ["hvac-0009", "hvac-0002", "hvac-0009"]}, ["hvac-0009", "hvac-0002"]),
        ({"group": "hvacs"}, ["hvac-kitchen", "hvac-hall", "hvac-annex"]),
        ({"where": {"building": "A"}}, ["hvac-kitchen", "hvac-hall"]),
        ({"where": {"floor": 1}, "group": "hvacs"}, ["hvac-kitchen", "hvac-annex"]),
        ({"nearest": "hvac-kitchen", "group": "hvacs", "n": 1}, ["hvac-hall"]),
        ({"nearest": "hvac-kitchen", "group": "hvacs", "n": 5}, ["hvac-hall", "hvac-annex"]),
    ],
)
def test_targets_select_devices(
    registry: Registry, target: dict[str, Any], devices: list[str]
) -> None:
    assert Target.model_validate(target).select(registry) == devices


def test_expansion_gives_deterministic_ids_step_by_step(registry: Registry) -> None:
    cmds = instruction(
        {"group": "hvacs"},
        [
            "set_mode cool",
            "set_temperature 23.5",
            {"command": "set_fan_speed", "params": {"speed": 2}},
        ],
        priority="critical",
        ttl="90s",
    ).expand(registry, T0)
    assert len(cmds) == 9
    assert [c.command_id for c in cmds[:4]] == [
        "i1/0/hvac-kitchen",
        "i1/0/hvac-hall",
        "i1/0/hvac-annex",
        "i1/1/hvac-kitchen",
    ]
    assert cmds[3].params == {"setpoint": 23.5}
    assert cmds[-1].params == {"speed": 2}
    assert {c.priority for c in cmds} == {100}
    assert {c.correlation_id for c in cmds} == {"i1"}
    assert {c.expires_at - c.issued_at for c in cmds} == {timedelta(seconds=90)}


def test_a_shorthand_needs_a_command_with_one_parameter(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="exactly one parameter; turn_on has none"):
        instruction({"devices": ["light-0001"]}, ["turn_on 5"]).expand(registry, T0)


def test_a_step_unknown_to_the_model_is_left_to_the_validator(registry: Registry) -> None:
    [cmd] = instruction({"devices": ["lock-0001"]}, ["set_temperature 20"]).expand(registry, T0)
    assert cmd.name == "set_temperature"  # the orchestrator rejects it for this device


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"target": {"group": "g"}, "steps": ["x"]}, "instruction_id: Field required"),
        ({"instruction_id": "i", "target": {}, "steps": ["x"]}, "say which devices"),
        (
            {"instruction_id": "i", "target": {"devices": ["a"], "group": "g"}, "steps": ["x"]},
            "devices lists the targets itself",
        ),
        (
            {"instruction_id": "i", "target": {"nearest": "a"}, "steps": ["x"]},
            "nearest needs a group",
        ),
        (
            {"instruction_id": "i", "target": {"group": "g"}, "steps": []},
            "steps: List should have at least 1",
        ),
        ({"instruction_id": "i", "target": {"group": "g"}, "steps": ["x"], "ttl": "-5s"}, "ttl"),
        (
            {"instruction_id": "i", "target": {"group": "g"}, "steps": ["x"], "priority": "urgent"},
            "not one of",
        ),
        ({"instruction_id": "i\n", "target": {"group": "g"}, "steps": ["x"]}, "printable"),
        (
            {
                "instruction_id": "i",
                "target": {"group": "g"},
                "steps": [{"command": "x", "params": {"a": 1}, "value": 2}],
            },
            "not both",
        ),
        (
            {"instruction_id": "i", "target": {"group": "g", "color": 1}, "steps": ["x"]},
            "target.color",
        ),
    ],
)
def test_bad_instructions_name_the_field(data: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match="instruction declaration is invalid") as err:
        Instruction.from_data(data)
    assert words in str(err.value)


def test_unknown_group_or_device_without_coordinates_fail_at_expansion(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="unknown group 'nope'"):
        instruction({"group": "nope"}, ["turn_on"]).expand(registry, T0)
    with pytest.raises(ConfigError, match="no coordinates"):
        instruction({"nearest": "hvac-0001", "group": "hvacs"}, ["turn_on"]).expand(registry, T0)
