"""Workflow declarations, gateway profiles and the edge/cloud planner."""

from __future__ import annotations

from typing import Any

import pytest

from iotflow.errors import ConfigError
from iotflow.placement import EDGE_PATTERN_KINDS, PlacementError, plan
from iotflow.workflow import GatewayProfile, Workflow
from operators.cep_rows import SUPPORTED_KINDS

SMOKE = {
    "name": "smoke",
    "kind": "threshold",
    "condition": "smoke > 0",
    "actions": [{"type": "command", "device": "gas-valve", "name": "close"}],
}
SEQ = {"name": "seq", "kind": "sequence", "steps": [{"name": "a", "where": "t > 1"}]}


def gateway(**kw: Any) -> GatewayProfile:
    data = {
        "name": "pi3",
        "memory_mb": 1024,
        "cpu_ghz": 1.4,
        "connectivity": {"uplink_kbps": 2000, "rtt": "120ms", "availability": 0.9999},
    }
    for key, value in kw.items():
        if key in ("uplink_kbps", "rtt", "availability"):
            data["connectivity"][key] = value  # type: ignore[index]
        else:
            data[key] = value
    return GatewayProfile.from_dict(data)


def workflow(*components: dict[str, Any], **kw: Any) -> Workflow:
    return Workflow.from_dict({"name": "w", "components": list(components), **kw})


def test_the_planner_and_the_edge_engine_agree_on_what_runs_at_the_edge() -> None:
    assert EDGE_PATTERN_KINDS == SUPPORTED_KINDS


def test_auto_placement_follows_latency_reliability_and_bandwidth() -> None:
    wf = workflow(
        {"name": "fast", "kind": "patterns", "latency_budget": "50ms", "patterns": [SMOKE]},
        {"name": "slow", "kind": "patterns", "latency_budget": "5s", "patterns": [SMOKE]},
        {"name": "keep-on", "kind": "filter", "where": "t > 0", "offline": True},
        {"name": "stats", "kind": "aggregate", "window": "10s"},
        traffic={"devices": 1000, "rate_hz": 1, "reading_bytes": 100},  # 800 kbit/s
    )
    got = plan(wf, gateway(uplink_kbps=1000))
    assert [(d.component, d.where) for d in got.decisions] == [
        ("fast", "edge"),
        ("slow", "cloud"),
        ("keep-on", "edge"),
        ("stats", "edge"),
    ]
    reasons = {d.component: d.reason for d in got.decisions}
    assert reasons["fast"] == "latency budget 50ms is under the uplink round trip 120ms"
    assert reasons["slow"] == "no latency, reliability or bandwidth reason to use the gateway"
    assert "offline: true" in reasons["keep-on"]
    assert reasons["stats"] == "raw input 800 kbit/s would take over half of the 1000 kbit/s uplink"
    # a fat uplink: no bandwidth reason; a flaky one: commanding rules move to the edge
    assert plan(wf, gateway(uplink_kbps=10_000)).where("stats") == "cloud"
    flaky = plan(wf, gateway(availability=0.98))
    assert flaky.where("slow") == "edge"
    assert "up 98.0% of the time" in flaky.decisions[1].reason


def test_a_gateway_too_small_for_a_component_placed_on_it_is_refused() -> None:
    wf = workflow(
        {
            "name": "model",
            "kind": "patterns",
            "placement": "edge",
            "needs": {"memory_mb": 256},
            "patterns": [SMOKE],
        }
    )
    with pytest.raises(PlacementError) as err:
        plan(wf, gateway(memory_mb=256))
    msg = str(err.value)
    assert "component 'model' is placed on the edge, but gateway 'pi3' cannot host it" in msg
    assert "it needs 256 MB and 196 MB are free (of 256 MB: 60 MB for the edge runtime" in msg
    assert "place it in the cloud (placement: cloud or auto) or use a larger gateway profile" in msg
    assert plan(wf, gateway(memory_mb=512)).where("model") == "edge"
    cpu = workflow(
        {
            "name": "f",
            "kind": "filter",
            "where": "t > 0",
            "placement": "edge",
            "needs": {"cpu_ghz": 2.0},
        }
    )
    with pytest.raises(PlacementError, match=r"it needs a 2 GHz CPU and the gateway has 1\.4 GHz"):
        plan(cpu, gateway())


def test_edge_components_share_the_gateways_memory() -> None:
    wf = workflow(
        {
            "name": "a",
            "kind": "filter",
            "where": "t > 0",
            "placement": "edge",
            "needs": {"memory_mb": 100},
        },
        {
            "name": "b",
            "kind": "aggregate",
            "window": "10s",
            "offline": True,
            "needs": {"memory_mb": 100},
        },
        {
            "name": "c",
            "kind": "aggregate",
            "window": "10s",
            "input": "a",
            "placement": "edge",
            "needs": {"memory_mb": 100},
        },
    )
    with pytest.raises(
        PlacementError,
        match=r"'c' .* needs 100 MB and 40 MB are free .* 200 MB for other edge components",
    ):
        plan(wf, gateway(memory_mb=300))
    ok = plan(wf, gateway(memory_mb=360))
    assert ok.edge_memory_mb == 360
    # an auto component that does not fit goes to the cloud, and says why
    squeezed = plan(
        workflow(*[wf.model_dump(mode="json")["components"][i] for i in (0, 1)]),
        gateway(memory_mb=200),
    )
    assert squeezed.where("b") == "cloud"
    assert "but it does not fit: it needs 100 MB and 40 MB are free" in squeezed.decisions[1].reason


def test_what_the_edge_cannot_run_goes_to_the_cloud_or_is_refused() -> None:
    auto = plan(
        workflow({"name": "trend", "kind": "patterns", "offline": True, "patterns": [SEQ]}),
        gateway(),
    )
    assert auto.where("trend") == "cloud"
    assert (
        "pattern 'seq' is a sequence pattern; the edge runs absence, rate, threshold"
        in auto.decisions[0].reason
    )
    with pytest.raises(PlacementError, match="pattern 'seq' is a sequence pattern"):
        plan(
            workflow({"name": "trend", "kind": "patterns", "placement": "edge", "patterns": [SEQ]}),
            gateway(),
        )
    ack = {"name": "ack", "kind": "absence", "within": "5s", "after": "cmd > 0"}
    assert (
        plan(
            workflow({"name": "p", "kind": "patterns", "offline": True, "patterns": [ack]}),
            gateway(),
        ).where("p")
        == "cloud"
    )
    on_windows = workflow(
        {"name": "stats", "kind": "aggregate", "window": "10s", "placement": "edge"},
        {
            "name": "hot",
            "kind": "patterns",
            "input": "stats",
            "placement": "edge",
            "patterns": [{"name": "hot", "kind": "threshold", "condition": "t_avg > 30"}],
        },
    )
    with pytest.raises(PlacementError, match="patterns on windows run in the cloud"):
        plan(on_windows, gateway())


def test_data_flows_from_edge_to_cloud_only() -> None:
    wf = workflow(
        {"name": "clean", "kind": "filter", "where": "t > -40", "placement": "cloud"},
        {"name": "stats", "kind": "aggregate", "window": "10s", "input": "clean", "offline": True},
    )
    got = plan(wf, gateway())
    assert got.where("stats") == "cloud"
    assert "its input 'clean' runs in the cloud" in got.decisions[1].reason
    pinned = workflow(
        {"name": "clean", "kind": "filter", "where": "t > -40", "placement": "cloud"},
        {
            "name": "stats",
            "kind": "aggregate",
            "window": "10s",
            "input": "clean",
            "placement": "edge",
        },
    )
    with pytest.raises(PlacementError, match="its input 'clean' runs in the cloud"):
        plan(pinned, gateway())


def test_raw_readings_go_up_only_where_the_workflow_asks() -> None:
    only_aggregates = plan(
        workflow({"name": "stats", "kind": "aggregate", "window": "10s", "placement": "edge"}),
        gateway(),
    )
    assert only_aggregates.forward == {}
    forwarded = plan(
        workflow(
            {"name": "clean", "kind": "filter", "where": "t > -40", "placement": "edge"},
            {"name": "raw", "kind": "forward", "input": "clean", "devices": ["boiler-*"]},
            {"name": "history", "kind": "aggregate", "window": "1h", "placement": "cloud"},
        ),
        gateway(),
    )
    assert forwarded.forward == {"clean": ["boiler-*"], "readings": ["*"]}
    assert forwarded.where("raw") == "edge"
    report = forwarded.report()
    assert "workflow 'w' v0 on gateway 'pi3' (60 of 1024 MB on the edge)" in report
    assert "history  aggregate        cloud  placed in the cloud" in report
    assert "raw readings of clean (boiler-*)" in report
    with pytest.raises(
        PlacementError, match="sends raw readings from the gateway; it runs on the edge"
    ):
        plan(workflow({"name": "raw", "kind": "forward", "placement": "cloud"}), gateway())


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"name": "w", "components": []}, "components: List should have at least 1 item"),
        (
            {"name": "w", "components": [{"name": "x", "kind": "join"}]},
            "components[0]: Input tag 'join' found",
        ),
        (
            {"name": "w", "components": [{"name": "a", "kind": "aggregate", "window": "-5s"}]},
            "window -1 day, 23:59:55 must be positive",
        ),
        (
            {"name": "w", "components": [{"name": "a", "kind": "aggregate", "window": "soon"}]},
            "duration 'soon' is not understood",
        ),
        (
            {
                "name": "w",
                "components": [{"name": "a", "kind": "filter", "where": "t>1", "placement": "fog"}],
            },
            "components[0].filter.placement: Input should be 'edge', 'cloud' or 'auto'",
        ),
        (
            {
                "name": "w",
                "components": [
                    {"name": "a", "kind": "filter", "where": "t>1", "needs": {"memory_mb": -1}}
                ],
            },
            "needs.memory_mb: Input should be greater than or equal to 0",
        ),
        (
            {
                "name": "w",
                "components": [
                    {"name": "a", "kind": "filter", "where": "t>1"},
                    {"name": "a", "kind": "filter", "where": "t>1"},
                ],
            },
            "components[1].name 'a' is used twice",
        ),
        (
            {
                "name": "w",
                "components": [
                    {"name": "s", "kind": "aggregate", "window": "1s"},
                    {"name": "f", "kind": "forward", "input": "s"},
                ],
            },
            "a forward component cannot take the output of 's' (a aggregate)",
        ),
        (
            {
                "name": "w",
                "components": [
                    {"name": "p", "kind": "patterns", "patterns": [SMOKE]},
                    {
                        "name": "c",
                        "kind": "command_sequence",
                        "input": "p",
                        "on": ["fire"],
                        "steps": [{"name": "x"}],
                    },
                ],
            },
            "components[1].on: fire not among the patterns of 'p' (smoke)",
        ),
        (
            {
                "name": "w",
                "components": [
                    {"name": "p", "kind": "patterns", "patterns": [{"kind": "threshold"}]}
                ],
            },
            "patterns[0] needs a name",
        ),
        (
            {
                "name": "w",
                "components": [
                    {"name": "a", "kind": "filter", "where": "t>1", "latency_budget": "0s"}
                ],
            },
            "latency_budget 0:00:00 must be positive",
        ),
        (
            {"name": "bad/name", "components": [{"name": "a", "kind": "filter", "where": "t>1"}]},
            "name: String should match pattern",
        ),
    ],
)
def test_a_wrong_workflow_fails_at_load_time_naming_the_field(
    data: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError) as err:
        Workflow.from_dict(data)
    assert fragment in str(err.value)
    assert str(err.value).startswith("workflow declaration is invalid: ")


def test_profiles_load_from_yaml_and_refuse_nonsense() -> None:
    gw = GatewayProfile.from_yaml(
        "name: pi3\nmemory_mb: 1024\ncpu_ghz: 1.4\nconnectivity: {uplink_kbps: 512, rtt: 80ms, availability: 0.97}\n"
    )
    assert (gw.connectivity.rtt.total_seconds(), gw.free_memory_mb) == (0.08, 964.0)
    for bad, fragment in [
        (
            {"name": "g", "memory_mb": 0, "cpu_ghz": 1, "connectivity": {"uplink_kbps": 1}},
            "memory_mb: Input should be greater than 0",
        ),
        (
            {
                "name": "g",
                "memory_mb": 64,
                "cpu_ghz": 1,
                "connectivity": {"uplink_kbps": 1, "availability": 1.5},
            },
            "availability: Input should be less than or equal to 1",
        ),
        ({"name": "g", "memory_mb": 64, "cpu_ghz": 1}, "connectivity: Field required"),
        (
            {"name": "g", "memory_mb": "lots", "cpu_ghz": 1, "connectivity": {"uplink_kbps": 1}},
            "memory_mb: Input should be a valid number",
        ),
    ]:
        with pytest.raises(ConfigError, match="gateway profile declaration is invalid") as err:
            GatewayProfile.from_dict(bad)
        assert fragment in str(err.value)
    with pytest.raises(ConfigError, match=r"must end in \.yaml, \.yml or \.json"):
        GatewayProfile.load("profile.txt")
