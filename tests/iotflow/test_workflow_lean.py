"""The msgspec mirrors of workflows and gateway profiles agree with the pydantic models."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotflow.errors import ConfigError
from iotflow.placement import plan
from iotflow.workflow import GatewayProfile, Workflow
from iotflow.workflow_lean import (
    LeanGatewayProfile,
    LeanWorkflow,
    dump,
    lean,
    load_profile,
    load_workflow,
)
from tests.declfuzz import mutated, single_edits

WORKFLOWS: list[dict[str, Any]] = [
    {
        "name": "edge-default",
        "components": [{"name": "stats", "kind": "aggregate", "window": "10s"}],
    },
    {
        "name": "kitchen-safety",
        "version": 3,
        "traffic": {"devices": 1000, "rate_hz": 1.0, "reading_bytes": 120},
        "components": [
            {"name": "valid", "kind": "filter", "where": "temperature > -40", "placement": "edge"},
            {
                "name": "stats",
                "kind": "aggregate",
                "input": "valid",
                "window": "10s",
                "allowed_lateness": "2s",
                "needs": {"memory_mb": 8, "cpu_ghz": 0.2},
            },
            {
                "name": "smoke",
                "kind": "patterns",
                "latency_budget": "50ms",
                "offline": True,
                "patterns": [
                    {
                        "name": "smoke",
                        "kind": "threshold",
                        "condition": "smoke > 0",
                        "actions": [{"type": "command", "device": "gas-valve", "name": "close"}],
                    }
                ],
                "max_future_skew": None,
            },
            {
                "name": "shutdown",
                "kind": "command_sequence",
                "input": "smoke",
                "on": ["smoke"],
                "steps": [
                    {"name": "close", "device": "valve-{key}", "params": {"speed": 1}},
                    {"name": "alarm", "ttl": "30s"},
                ],
            },
            {"name": "raw", "kind": "forward", "devices": ["boiler-*"]},
            {
                "name": "hot",
                "kind": "patterns",
                "input": "stats",
                "placement": "cloud",
                "description": "windows",
                "patterns": [
                    {"name": "hot", "kind": "threshold", "condition": "temperature_avg > 30"}
                ],
            },
        ],
    },
]
PROFILES: list[dict[str, Any]] = [
    {
        "name": "pi3",
        "memory_mb": 1024,
        "cpu_ghz": 1.4,
        "connectivity": {"uplink_kbps": 2000, "rtt": "80ms"},
    },
    {
        "name": "tiny",
        "memory_mb": 128.5,
        "cpu_ghz": 0.8,
        "runtime_memory_mb": 60,
        "connectivity": {"uplink_kbps": 64, "rtt": 0.3, "availability": 0.9},
    },
]


def _authority(model: Any, data: Any) -> Any:
    try:
        return model.from_dict(data)
    except ConfigError:
        return None


def test_the_examples_take_the_mirror_and_dump_like_pydantic() -> None:
    for data in WORKFLOWS:
        mirror = load_workflow(data)
        assert isinstance(mirror, LeanWorkflow)
        assert dump(mirror) == Workflow.from_dict(data).model_dump(mode="json")
    for data in PROFILES:
        mirror = load_profile(data)
        assert isinstance(mirror, LeanGatewayProfile)
        assert dump(mirror) == GatewayProfile.from_dict(data).model_dump(mode="json")
        assert mirror.free_memory_mb == GatewayProfile.from_dict(data).free_memory_mb


def _agree(mirror_type: type, model: type, data: Any) -> bool:
    """The mirror accepts nothing pydantic refuses, dumps what pydantic dumps, and takes
    pydantic's own form (a stored definition) of whatever pydantic accepts."""
    mirror = lean(mirror_type, data)
    truth = _authority(model, data)
    if mirror is not None:
        assert truth is not None, f"the mirror accepted what pydantic refuses: {data!r}"
        assert dump(mirror) == truth.model_dump(mode="json")
    if truth is not None:
        canonical = truth.model_dump(mode="json")
        again = lean(mirror_type, canonical)
        assert again is not None and dump(again) == canonical
    return mirror is not None


def test_every_single_edit_of_the_examples_agrees() -> None:
    taken = [
        _agree(LeanWorkflow, Workflow, data) for base in WORKFLOWS for data in single_edits(base)
    ]
    taken += [
        _agree(LeanGatewayProfile, GatewayProfile, data)
        for base in PROFILES
        for data in single_edits(base)
    ]
    assert len(taken) > 2000 and 0.1 < sum(taken) / len(taken) < 0.9  # both sides exercised


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(st.sampled_from(WORKFLOWS)))
def test_the_workflow_mirror_accepts_nothing_pydantic_refuses(data: Any) -> None:
    _agree(LeanWorkflow, Workflow, data)


@settings(max_examples=200, deadline=None)
@given(mutated(st.sampled_from(PROFILES)))
def test_the_profile_mirror_accepts_nothing_pydantic_refuses(data: Any) -> None:
    _agree(LeanGatewayProfile, GatewayProfile, data)


def test_what_the_mirror_refuses_gets_pydantics_verdict() -> None:
    # a coercion only pydantic makes: its model comes back
    coerced = load_workflow(
        {
            "name": "w",
            "version": "2",
            "components": [{"name": "s", "kind": "aggregate", "window": 10}],
        }
    )
    assert isinstance(coerced, Workflow) and coerced.version == 2
    # a wrong declaration: pydantic's message, naming the field
    with pytest.raises(ConfigError, match=r"components\[0\]\.input: 'nope' is not readings"):
        load_workflow(
            {
                "name": "x",
                "components": [{"name": "f", "kind": "filter", "where": "t > 1", "input": "nope"}],
            }
        )
    with pytest.raises(ConfigError, match="name: String should match pattern"):
        load_workflow(
            {"name": "bad\n", "components": [{"name": "s", "kind": "aggregate", "window": "1s"}]}
        )
    with pytest.raises(ConfigError, match="memory_mb"):
        load_profile({**PROFILES[0], "memory_mb": float("inf")})


def test_placement_plans_the_mirror_as_it_plans_the_model() -> None:
    for wf in WORKFLOWS:
        for gw in PROFILES:
            try:
                expected = plan(Workflow.from_dict(wf), GatewayProfile.from_dict(gw))
            except ConfigError as exc:
                with pytest.raises(ConfigError, match="^" + __import__("re").escape(str(exc))):
                    plan(load_workflow(wf), load_profile(gw))
                continue
            got = plan(load_workflow(wf), load_profile(gw))
            assert [c.name for c in got.edge] == [c.name for c in expected.edge]
            assert [c.name for c in got.cloud] == [c.name for c in expected.cloud]
            assert got.decisions == expected.decisions
            assert got.forward == expected.forward


def test_loading_a_workflow_and_a_profile_imports_no_pydantic() -> None:
    code = (
        "import sys; from iotflow.workflow_lean import load_workflow, load_profile;"
        "from iotflow.placement import plan;"
        f"plan(load_workflow({WORKFLOWS[1]!r}), load_profile({PROFILES[0]!r}));"
        "print('pydantic' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"
