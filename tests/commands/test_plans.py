"""Plans: declarations, targets, DAG order, conditions, per-device order, snapshots."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from plan_harness import DONE, FAILED, T0, DeviceLoop

from commands.coordinator import (
    Coordinator,
    PlanEventKind,
    coordinator_builders,
    restore_coordinator,
)
from commands.plans import PlanRun, PlanSpec, PlanState, StepStatus, load_plan, topological_order
from iotflow.errors import ConfigError, InvalidTransition
from iotflow.events import CommandEvent, CommandEventKind
from twins.registry import Registry, simulator_registry


@pytest.fixture
def registry() -> Registry:
    reg = simulator_registry()
    for i in range(1, 5):
        reg.add_device(f"light-{i:04d}", "light", floor=1 + i % 2, x=float(i), y=0.0)
    reg.add_device("hvac-0001", "hvac", floor=1, x=0.0, y=0.0)
    reg.add_device("lock-0001", "lock", floor=1, x=0.5, y=0.0)
    reg.add_group("lights", [f"light-{i:04d}" for i in range(1, 5)])
    return reg


def spec(*steps: dict, name: str = "p") -> PlanSpec:
    return PlanSpec.model_validate({"name": name, "steps": list(steps)})


def light_states() -> dict[str, dict]:
    return {f"light-{i:04d}": {"on": i % 2, "brightness": 50} for i in range(1, 5)}


# -- declarations ----------------------------------------------------------------------------


def test_sequence_by_default_and_after_makes_a_dag() -> None:
    plan = spec(
        {"name": "a", "target": "lock-0001", "command": "lock"},
        {"name": "b", "target": "lock-0001", "command": "unlock"},
        {"name": "c", "target": "lock-0001", "command": "lock", "after": []},
        {"name": "d", "target": "lock-0001", "command": "lock", "after": ["b", "c"]},
    )
    assert plan.dependencies() == {"a": (), "b": ("a",), "c": (), "d": ("b", "c")}
    assert plan.ancestors()["d"] == {"a", "b", "c"}


def test_cycle_is_refused_naming_the_steps() -> None:
    with pytest.raises(ValueError, match=r"steps a -> b -> a form a cycle"):
        spec(
            {"name": "a", "target": "lock-0001", "command": "lock", "after": ["b"]},
            {"name": "b", "target": "lock-0001", "command": "lock", "after": ["a"]},
            {"name": "c", "target": "lock-0001", "command": "lock", "after": []},
        )
    with pytest.raises(ConfigError, match="x -> y -> z -> x"):
        topological_order({"w": (), "x": ("z",), "y": ("x",), "z": ("y",)})


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [{"name": "a", "target": "x", "command": "lock", "after": ["nope"]}],
            "unknown step 'nope'",
        ),
        ([{"name": "a", "target": "x", "command": "lock", "after": ["a"]}], "waits for itself"),
        ([{"name": "a b", "target": "x", "command": "lock"}], "must be an identifier"),
        (
            [
                {"name": "a", "target": "x", "command": "lock"},
                {"name": "a", "target": "x", "command": "lock"},
            ],
            "repeated: a",
        ),
        ([{"name": "a", "target": {}, "command": "lock"}], "a target needs device"),
        ([{"name": "a", "target": {"device": "x", "group": "g"}, "command": "c"}], "drop group"),
        ([{"name": "a", "target": {"nearest": "x"}, "command": "c"}], "a target needs"),
        ([{"name": "a", "target": {"group": "g", "n": 3}, "command": "c"}], "give nearest"),
        ([{"name": "a", "target": "x", "command": "c", "when": "on + 1"}], "not a condition"),
        ([{"name": "a", "target": "x", "command": "c", "when": "__import__('os')"}], "not allowed"),
        ([{"name": "a", "target": "x", "command": "c", "timeout": "-5s"}], "must be positive"),
        ([{"name": "a", "target": "x", "command": "c", "timeout": "soon"}], "not understood"),
        ([{"name": "a", "target": "x", "command": "c", "colour": "red"}], "colour"),
        ([], "at least 1 item"),
        (
            [
                {"name": "a", "target": "x", "command": "c"},
                {"name": "b", "target": "x", "command": "c", "after": [], "when": "a == 'done'"},
            ],
            "does not wait for",
        ),
    ],
)
def test_bad_declarations_fail_at_load_naming_the_field(steps: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_plan({"name": "p", "steps": steps})


def test_load_from_yaml_and_json_files(tmp_path, registry: Registry) -> None:
    doc = {
        "name": "p",
        "steps": [{"name": "a", "target": {"group": "lights"}, "command": "turn_off"}],
    }
    (tmp_path / "p.json").write_text(json.dumps(doc))
    (tmp_path / "p.yaml").write_text(
        "name: p\nsteps:\n  - {name: a, target: {group: lights}, command: turn_off}\n"
    )
    assert load_plan(tmp_path / "p.json") == load_plan(tmp_path / "p.yaml")
    (tmp_path / "bad.yaml").write_text("name: p\nsteps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_plan(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"steps\[0\]\.command: Field required"):
        load_plan({"name": "p", "steps": [{"name": "a", "target": "x"}]})
    with pytest.raises(ConfigError, match="name"):
        load_plan({"name": "a/b#", "steps": doc["steps"]})


# -- expansion against the registry ---------------------------------------------------------


def test_targets_resolve_group_dimension_nearest_and_lists(registry: Registry) -> None:
    plan = spec(
        {"name": "all", "target": {"group": "lights"}, "command": "turn_off"},
        {
            "name": "floor2",
            "target": {"group": "lights", "where": {"floor": 2}},
            "command": "turn_on",
        },
        {
            "name": "near",
            "target": {"group": "lights", "nearest": "lock-0001", "n": 2},
            "command": "turn_on",
        },
        {"name": "dims", "target": {"where": {"floor": 1, "model": "light"}}, "command": "turn_on"},
        {
            "name": "list",
            "target": {"devices": ["light-0002", "light-0001", "light-0002"]},
            "command": "turn_on",
        },
    ).expand(registry, "p-1")
    got = {s.name: s.devices for s in plan.steps}
    assert got == {
        "all": ("light-0001", "light-0002", "light-0003", "light-0004"),
        "floor2": ("light-0001", "light-0003"),
        "near": ("light-0001", "light-0002"),
        "dims": ("light-0002", "light-0004"),
        "list": ("light-0002", "light-0001"),
    }


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            {"target": {"group": "lites"}, "command": "turn_off"},
            r"p\.steps\.a\.target: unknown group 'lites' \(groups: lights\)",
        ),
        ({"target": "door-1", "command": "turn_off"}, "unknown device 'door-1'"),
        (
            {"target": "light-0001", "command": "explode"},
            "unknown command 'explode'.*accepts: set_brightness",
        ),
        (
            {"target": "hvac-0001", "command": "set_temperature", "params": {"setpoint": 99}},
            "setpoint",
        ),
        (
            {"target": "hvac-0001", "command": "set_temperature", "params": {"setpoint": "warm"}},
            "setpoint",
        ),
        (
            {
                "target": "hvac-0001",
                "command": "set_temperature",
                "params": {"setpoint": float("nan")},
            },
            "setpoint",
        ),
        (
            {"target": "hvac-0001", "command": "set_temperature", "params": {}},
            "missing parameter 'setpoint'",
        ),
        (
            {"target": {"group": "lights", "where": {"floor": 9}}, "command": "turn_on"},
            "matches no device",
        ),
        ({"target": "lock-0001", "command": "turn_on"}, "lock-0001"),
        ({"target": "light+/#", "command": "turn_on"}, "unknown device"),
    ],
)
def test_expansion_checks_every_command_against_the_registry(
    registry: Registry, step: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        spec({"name": "a", **step}).expand(registry, "p-1")


def test_plan_id_must_fit_in_command_ids(registry: Registry) -> None:
    plan = spec({"name": "a", "target": "lock-0001", "command": "lock"})
    with pytest.raises(ConfigError, match="plan id"):
        plan.expand(registry, "a/b")


# -- running ------------------------------------------------------------------------------------


def test_sequence_runs_in_order_and_ends_done(registry: Registry) -> None:
    run = spec(
        {"name": "mode", "target": "hvac-0001", "command": "set_mode", "params": {"mode": "cool"}},
        {
            "name": "temp",
            "target": "hvac-0001",
            "command": "set_temperature",
            "params": {"setpoint": 23.5},
        },
        {"name": "fan", "target": "hvac-0001", "command": "set_fan_speed", "params": {"speed": 3}},
    ).build(registry, "p-1")
    assert isinstance(run, Coordinator)
    loop = DeviceLoop(registry, {"hvac-0001": {"mode": "auto", "setpoint": 21.0, "fan_speed": 1}})
    commands = run.start(T0, loop.reported)
    assert [c.name for c in commands] == ["set_mode"]  # the next waits for the ack
    assert commands[0].command_id == "p-1/mode/hvac-0001"
    assert commands[0].expires_at == T0 + timedelta(seconds=30)
    loop._take(commands, run)
    loop.run(run)
    assert [c.name for c in loop.applied] == ["set_mode", "set_temperature", "set_fan_speed"]
    assert loop.states["hvac-0001"] == {"mode": "cool", "setpoint": 23.5, "fan_speed": 3}
    assert run.state is PlanState.DONE and run.finished
    kinds = [e.kind for e in loop.events]
    assert kinds[0] is PlanEventKind.STARTED and kinds[-1] is PlanEventKind.DONE
    assert kinds.count(PlanEventKind.STEP_DONE) == 3


def test_dag_branches_start_together_and_join(registry: Registry) -> None:
    run = spec(
        {"name": "lights", "target": {"group": "lights"}, "command": "turn_off"},
        {"name": "door", "target": "lock-0001", "command": "lock", "after": []},
        {
            "name": "heat",
            "target": "hvac-0001",
            "command": "set_temperature",
            "params": {"setpoint": 16},
            "after": ["lights", "door"],
        },
    ).build(registry, "p-2")
    loop = DeviceLoop(registry, {})
    first = run.start(T0, loop.reported)
    assert [c.device_id for c in first] == [
        "light-0001",
        "light-0002",
        "light-0003",
        "light-0004",
        "lock-0001",
    ]
    loop._take(first, run)
    loop.run(run)
    assert loop.applied[-1].name == "set_temperature"
    assert run.state is PlanState.DONE


def test_per_device_order_follows_dependencies_then_declaration(registry: Registry) -> None:
    run = spec(
        {
            "name": "b1",
            "target": {"group": "lights"},
            "command": "set_brightness",
            "params": {"brightness": 10},
            "after": [],
        },
        {"name": "on", "target": {"group": "lights"}, "command": "turn_on", "after": []},
        {
            "name": "b2",
            "target": {"group": "lights"},
            "command": "set_brightness",
            "params": {"brightness": 90},
            "after": ["b1", "on"],
        },
    ).build(registry, "p-3")
    loop = DeviceLoop(registry, light_states())
    loop.start(run)
    loop.run(run)
    for device in registry.group("lights"):
        names = [(c.name, c.params) for c in loop.issued if c.device_id == device]
        assert names == [
            ("set_brightness", {"brightness": 10}),
            ("turn_on", {}),
            ("set_brightness", {"brightness": 90}),
        ]


def test_conditions_read_reported_state_per_device(registry: Registry) -> None:
    run = spec(
        {"name": "off", "target": {"group": "lights"}, "command": "turn_off", "when": "on == 1"},
    ).build(registry, "p-4")
    loop = DeviceLoop(registry, light_states())
    loop.start(run)
    loop.run(run)
    assert sorted(c.device_id for c in loop.issued) == ["light-0001", "light-0003"]
    assert run.state is PlanState.DONE


def test_condition_false_everywhere_skips_the_step_and_a_missing_value_is_false(
    registry: Registry,
) -> None:
    run = spec(
        {
            "name": "off",
            "target": {"group": "lights"},
            "command": "turn_off",
            "when": "colour == 'red'",
        },
        {
            "name": "door",
            "target": "lock-0001",
            "command": "lock",
            "after": ["off"],
            "when": "off == 'skipped'",
        },
    ).build(registry, "p-5")
    loop = DeviceLoop(registry, light_states())
    loop.start(run)
    loop.run(run)
    assert run.step_status("off") is StepStatus.SKIPPED
    assert [c.name for c in loop.issued] == ["lock"]
    assert run.state is PlanState.DONE


def test_failed_step_skips_its_dependents_but_not_independent_branches(registry: Registry) -> None:
    run = spec(
        {"name": "door", "target": "lock-0001", "command": "lock"},
        {
            "name": "heat",
            "target": "hvac-0001",
            "command": "set_temperature",
            "params": {"setpoint": 16},
        },
        {
            "name": "alarm",
            "target": "light-0001",
            "command": "turn_on",
            "after": ["door"],
            "when": "door == 'failed'",
        },
        {"name": "lights", "target": {"group": "lights"}, "command": "turn_off", "after": []},
    ).build(registry, "p-6")
    loop = DeviceLoop(
        registry, light_states(), behaviour=lambda c: FAILED if c.name == "lock" else DONE
    )
    loop.start(run)
    loop.run(run)
    assert run.step_status("door") is StepStatus.FAILED
    assert run.step_status("heat") is StepStatus.SKIPPED
    assert run.step_status("alarm") is StepStatus.DONE
    assert run.step_status("lights") is StepStatus.DONE
    assert run.state is PlanState.FAILED
    last = loop.events[-1]
    assert last.kind is PlanEventKind.FAILED and "door" in (last.detail or "")
    skipped = [e for e in loop.events if e.kind is PlanEventKind.STEP_SKIPPED]
    assert skipped[0].step == "heat" and "door failed" in (skipped[0].detail or "")


def test_unknown_and_repeated_outcomes_change_nothing(registry: Registry) -> None:
    run = spec(
        {"name": "door", "target": "lock-0001", "command": "lock"},
        {
            "name": "heat",
            "target": "hvac-0001",
            "command": "set_temperature",
            "params": {"setpoint": 16},
        },
    ).build(registry, "p-7")
    (cmd,) = run.start(T0, lambda d: {})
    stranger = CommandEvent("other/x/lock-0001", "lock-0001", CommandEventKind.DONE, T0)
    assert run.on_outcome(stranger, T0, lambda d: {}) == []
    done = CommandEvent(cmd.command_id, "lock-0001", CommandEventKind.DONE, T0)
    nxt = run.on_outcome(done, T0, lambda d: {})
    assert [c.name for c in nxt] == ["set_temperature"]
    assert run.on_outcome(done, T0, lambda d: {}) == []  # a redelivered outcome
    assert run.start(T0, lambda d: {}) == []  # a second start
    assert not run.finished


def test_snapshot_restores_mid_run_and_finishes_the_same(registry: Registry) -> None:
    plan = spec(
        {"name": "lights", "target": {"group": "lights"}, "command": "turn_off"},
        {"name": "door", "target": "lock-0001", "command": "lock"},
    )
    run = plan.build(registry, "p-8")
    loop = DeviceLoop(registry, light_states())
    loop.start(run)
    loop.deliver_one(run)
    loop.deliver_one(run)
    snap = json.loads(json.dumps(run.snapshot()))  # plain data
    again = restore_coordinator(snap)
    assert isinstance(again, PlanRun) and not isinstance(run, type(None))
    loop.run(again)
    assert again.state is PlanState.DONE
    assert [c.name for c in loop.applied].count("turn_off") == 4
    assert loop.applied[-1].name == "lock"


def test_restore_refuses_foreign_snapshots(registry: Registry) -> None:
    run = spec({"name": "a", "target": "lock-0001", "command": "lock"}).build(registry, "p-9")
    snap = run.snapshot()
    with pytest.raises(ConfigError, match="unknown; expected one of"):
        restore_coordinator({**snap, "type": "weather"})
    with pytest.raises(ConfigError, match="cannot restore a plan"):
        PlanRun.restore({**snap, "type": "saga"})
    with pytest.raises(ConfigError, match="state"):
        PlanRun.restore({**snap, "state": {"steps": {"zzz": {}}}})
    with pytest.raises(ConfigError, match="expanded plan"):
        PlanRun.restore({**snap, "definition": {"plan_id": 3}})


def test_illegal_transitions_raise(registry: Registry) -> None:
    run = spec({"name": "a", "target": "lock-0001", "command": "lock"}).build(registry, "p-10")
    with pytest.raises(InvalidTransition, match="cannot go from pending to done"):
        run._move(PlanState.DONE)


def test_a_condition_on_a_value_of_the_wrong_type_skips_that_device_with_a_note(
    registry: Registry,
) -> None:
    run = spec(
        {"name": "off", "target": {"group": "lights"}, "command": "turn_off", "when": "on > 0"},
    ).build(registry, "p-11")
    states = light_states()
    states["light-0001"]["on"] = "yes"  # a device reporting nonsense
    loop = DeviceLoop(registry, states)
    loop.start(run)
    loop.run(run)
    assert sorted(c.device_id for c in loop.issued) == ["light-0003"]
    assert any("light-0001: condition not evaluated" in n for n in run.notes)
    assert run.state is PlanState.DONE


def test_request_builders_need_a_run_id_and_a_valid_declaration(registry: Registry) -> None:
    builders = coordinator_builders()
    plan = {
        "type": "plan",
        "name": "p",
        "steps": [{"name": "a", "target": "lock-0001", "command": "lock"}],
    }
    assert builders["plan"]({**plan, "id": "p-1"}, registry, T0).coordinator_id == "p-1"
    with pytest.raises(ConfigError, match="needs an id naming this run"):
        builders["plan"]({**plan, "id": "has space"}, registry, T0)
    with pytest.raises(ConfigError, match="plan declaration is invalid: steps"):
        builders["plan"]({"type": "plan", "id": "p-2", "name": "p", "steps": "lock"}, registry, T0)
    with pytest.raises(ConfigError, match="saga declaration is invalid"):
        builders["saga"]({**plan, "id": "s-1"}, registry, T0)  # steps lack compensation
    with pytest.raises(ConfigError, match="must be an object"):
        builders["plan"](["not", "a", "dict"], registry, T0)  # type: ignore[arg-type]


def test_cancel_starts_no_further_step_and_ends_failed(registry: Registry) -> None:
    run = spec(
        {"name": "lights", "target": {"group": "lights"}, "command": "turn_off"},
        {"name": "door", "target": "lock-0001", "command": "lock"},
    ).build(registry, "p-12")
    loop = DeviceLoop(registry, light_states())
    loop.start(run)
    loop.deliver_one(run)
    assert run.cancel(loop.now, "user stopped it") == []  # three lights still in flight
    loop.run(run)
    assert run.state is PlanState.FAILED
    assert [c.name for c in loop.issued].count("lock") == 0
    assert run.step_status("door") is StepStatus.SKIPPED
    assert loop.events[-1].detail == "cancelled: user stopped it"
    assert run.cancel(loop.now, "again") == []
