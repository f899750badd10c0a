"""Split a workflow between a gateway (edge) and the cloud, and say why each part runs where.

``plan(workflow, gateway)`` decides each component in order:

1. A component that cannot run on a gateway goes to the cloud: ``patterns``
   with kinds beyond the edge's per-reading engine (it runs ``threshold``,
   ``rate`` and ``absence`` without ``after``: ``EDGE_PATTERN_KINDS``) or on
   windows, and anything whose input runs in the cloud (data flows from
   the edge to the cloud only). ``forward`` always runs on the edge.
2. ``placement: edge`` is checked: the gateway must host it (memory:
   the runtime's own ``runtime_memory_mb`` plus every edge component's
   ``needs.memory_mb`` within ``memory_mb``; CPU: ``needs.cpu_ghz`` at most
   the gateway's ``cpu_ghz``). A placement the gateway cannot host raises
   ``PlacementError`` naming the component, what it needs, what the gateway
   has, and the fixes. ``placement: cloud`` is kept as declared.
3. ``placement: auto`` goes to the edge when it fits and one of these holds,
   checked in this order, else to the cloud:

   - *latency*: its ``latency_budget`` is under the uplink's round trip
     (``connectivity.rtt``): a cloud decision costs at least one;
   - *reliability*: it must keep acting offline (``offline: true``), or it
     commands devices (command actions, command sequences) and the uplink is
     up less than 99.9% of the time (``connectivity.availability``);
   - *bandwidth*: it reduces data (``filter``, ``aggregate``) and the raw
     input (``workflow.traffic``) would take over half of ``uplink_kbps``.

   An ``auto`` component that does not fit goes to the cloud, and says so.

What goes up: every edge aggregate's windows, edge detections and the
commands the edge issued, and raw readings where a ``forward`` component or
a cloud component on readings asks for them (``Plan.forward``).

Example::

    >>> from iotflow.workflow import GatewayProfile, Workflow
    >>> wf = Workflow.from_dict({"name": "w", "components": [
    ...     {"name": "smoke", "kind": "patterns", "latency_budget": "50ms",
    ...      "patterns": [{"name": "smoke", "kind": "threshold", "condition": "smoke > 0"}]},
    ...     {"name": "trend", "kind": "patterns",
    ...      "patterns": [{"name": "seq", "kind": "sequence", "steps": [{"name": "a", "where": "t > 1"}]}]}]})
    >>> gw = GatewayProfile.from_dict({"name": "pi", "memory_mb": 512, "cpu_ghz": 1.2,
    ...                                "connectivity": {"uplink_kbps": 1000, "rtt": "120ms"}})
    >>> p = plan(wf, gw)
    >>> [(d.component, d.where) for d in p.decisions]
    [('smoke', 'edge'), ('trend', 'cloud')]
    >>> p.decisions[0].reason
    'latency budget 50ms is under the uplink round trip 120ms'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from iotflow.durations import label
from iotflow.errors import ConfigError

if TYPE_CHECKING:  # or their msgspec mirrors (iotflow.workflow_lean): components go by kind
    from iotflow.workflow import GatewayProfile, Workflow

__all__ = ["EDGE_PATTERN_KINDS", "Decision", "PlacementError", "Plan", "plan"]

# the kinds of operators.cep_rows.RowEngine (a test keeps the two equal)
EDGE_PATTERN_KINDS = frozenset({"threshold", "rate", "absence"})
_RELIABLE = 0.999
_BANDWIDTH_SHARE = 0.5

Where = Literal["edge", "cloud"]


class PlacementError(ConfigError):
    """A workflow asks a gateway for a placement it cannot host (the message says why and the fixes)."""


@dataclass(frozen=True)
class Decision:
    """Where one component runs and why (``reason`` is one line for a person)."""

    component: str
    kind: str
    where: Where
    reason: str
    declared: str


@dataclass(frozen=True)
class Plan:
    """A workflow split for one gateway: decisions in component order, the edge part,
    the cloud part, and which raw reading streams go up (``forward``: ``readings``
    or a filter name -> the device id patterns forwarded)."""

    workflow: Workflow
    gateway: GatewayProfile
    decisions: list[Decision]
    forward: dict[str, list[str]] = field(default_factory=dict)

    @property
    def edge(self) -> list[Any]:
        return [self.workflow.component(d.component) for d in self.decisions if d.where == "edge"]

    @property
    def cloud(self) -> list[Any]:
        return [self.workflow.component(d.component) for d in self.decisions if d.where == "cloud"]

    @property
    def edge_memory_mb(self) -> float:
        """What the edge part takes: the runtime plus its components' needs."""
        return self.gateway.runtime_memory_mb + sum(c.needs.memory_mb for c in self.edge)

    def where(self, component: str) -> Where:
        for d in self.decisions:
            if d.component == component:
                return d.where
        raise KeyError(f"no component {component!r} in workflow {self.workflow.name!r}")

    def report(self) -> str:
        """A table of what runs where and why, and what goes up."""
        lines = [
            f"workflow {self.workflow.name!r} v{self.workflow.version} on gateway "
            f"{self.gateway.name!r} ({self.edge_memory_mb:g} of {self.gateway.memory_mb:g} MB "
            f"on the edge)"
        ]
        width = max(len(d.component) for d in self.decisions)
        for d in self.decisions:
            lines.append(f"  {d.component:<{width}}  {d.kind:<16} {d.where:<5}  {d.reason}")
        up = ["aggregates", "detections", "commands"]
        up += [f"raw readings of {s} ({', '.join(d)})" for s, d in self.forward.items()]
        lines.append(f"  uplink: {', '.join(up)}")
        return "\n".join(lines)


def _edge_capable(c: Any, workflow: Workflow) -> str | None:
    """Why ``c`` cannot run on a gateway at all (None when it can)."""
    if c.kind == "patterns":
        if c.input != "readings" and workflow.component(c.input).kind == "aggregate":
            return "the edge runs patterns on readings; patterns on windows run in the cloud"
        for p in c.patterns:
            kind = p["kind"]
            if kind not in EDGE_PATTERN_KINDS:
                return (
                    f"pattern {p['name']!r} is a {kind} pattern; the edge runs "
                    f"{', '.join(sorted(EDGE_PATTERN_KINDS))}"
                )
            if kind == "absence" and p.get("after") is not None:
                return f"pattern {p['name']!r} is an absence pattern with 'after' (a sequence)"
    return None


def _commands_devices(c: Any) -> bool:
    if c.kind == "command_sequence":
        return True
    if c.kind == "patterns":
        return any(
            isinstance(a, dict) and a.get("type") == "command"
            for p in c.patterns
            for a in p.get("actions", [])
        )
    return False


def _auto_reason(c: Any, workflow: Workflow, gw: GatewayProfile) -> str | None:
    """Why ``auto`` puts ``c`` on the edge (None: no reason to)."""
    link = gw.connectivity
    if c.latency_budget is not None and c.latency_budget < link.rtt:
        return (
            f"latency budget {label(c.latency_budget)} is under the uplink round trip "
            f"{label(link.rtt)}"
        )
    if c.offline:
        return "must keep acting while the uplink is down (offline: true)"
    if _commands_devices(c) and link.availability < _RELIABLE:
        return (
            f"commands devices and the uplink is up {link.availability:.1%} of the time "
            f"(under {_RELIABLE:.1%})"
        )
    traffic = workflow.traffic
    if (
        c.kind in ("filter", "aggregate")
        and traffic is not None
        and traffic.kbps > _BANDWIDTH_SHARE * link.uplink_kbps
    ):
        return (
            f"raw input {traffic.kbps:g} kbit/s would take over half of the "
            f"{link.uplink_kbps:g} kbit/s uplink"
        )
    return None


def plan(workflow: Workflow, gateway: GatewayProfile) -> Plan:
    """Decide where each component of ``workflow`` runs for ``gateway`` (see the module docstring).

    Raises ``PlacementError`` for a ``placement: edge`` the gateway cannot host.
    """
    decisions: list[Decision] = []
    where: dict[str, Where] = {"readings": "edge"}
    used_mb = 0.0
    for c in workflow.components:
        upstream = where[c.input]
        why_not = _edge_capable(c, workflow)
        if upstream == "cloud":
            why_not = (
                f"its input {c.input!r} runs in the cloud (data flows from edge to cloud only)"
            )
        fit = _fits(c, gateway, used_mb)
        if c.kind == "forward":
            if c.placement == "cloud":
                raise PlacementError(
                    f"component {c.name!r} (forward) sends raw readings from the gateway; it runs "
                    "on the edge: drop placement: cloud"
                )
            why_not = why_not or fit
            if why_not is not None:
                raise PlacementError(
                    f"component {c.name!r} (forward) cannot run on gateway {gateway.name!r}: {why_not}"
                )
            decision = Decision(
                c.name, c.kind, "edge", "forwards raw readings to the cloud", c.placement
            )
        elif c.placement == "edge":
            problem = why_not or fit
            if problem is not None:
                raise PlacementError(
                    f"component {c.name!r} is placed on the edge, but gateway {gateway.name!r} "
                    f"cannot host it: {problem}; place it in the cloud (placement: cloud or auto) "
                    "or use a larger gateway profile"
                )
            decision = Decision(c.name, c.kind, "edge", "placed on the edge", c.placement)
        elif c.placement == "cloud":
            decision = Decision(c.name, c.kind, "cloud", "placed in the cloud", c.placement)
        elif why_not is not None:
            decision = Decision(c.name, c.kind, "cloud", why_not, c.placement)
        else:
            reason = _auto_reason(c, workflow, gateway)
            if reason is None:
                decision = Decision(
                    c.name,
                    c.kind,
                    "cloud",
                    "no latency, reliability or bandwidth reason to use the gateway",
                    c.placement,
                )
            elif fit is not None:
                decision = Decision(
                    c.name, c.kind, "cloud", f"{reason}, but it does not fit: {fit}", c.placement
                )
            else:
                decision = Decision(c.name, c.kind, "edge", reason, c.placement)
        if decision.where == "edge":
            used_mb += c.needs.memory_mb
        where[c.name] = decision.where
        decisions.append(decision)
    return Plan(workflow, gateway, decisions, _forwarded(workflow, where))


def _fits(c: Any, gw: GatewayProfile, used_mb: float) -> str | None:
    """Why ``c`` does not fit beside the edge components so far (None when it does)."""
    need = c.needs
    if need.cpu_ghz > gw.cpu_ghz:
        return f"it needs a {need.cpu_ghz:g} GHz CPU and the gateway has {gw.cpu_ghz:g} GHz"
    free = gw.free_memory_mb - used_mb
    if need.memory_mb > free:
        return (
            f"it needs {need.memory_mb:g} MB and {free:g} MB are free (of {gw.memory_mb:g} MB: "
            f"{gw.runtime_memory_mb:g} MB for the edge runtime, {used_mb:g} MB for other edge "
            "components)"
        )
    return None


def _forwarded(workflow: Workflow, where: dict[str, Where]) -> dict[str, list[str]]:
    """Raw reading streams the edge sends up, with the device patterns of each: asked by a
    forward component (its ``devices``), or read by a cloud component (every device)."""
    out: dict[str, list[str]] = {}
    for c in workflow.components:
        source = c.input
        reads_raw = source == "readings" or workflow.component(source).kind == "filter"
        if not reads_raw or where[source] != "edge":
            continue
        if c.kind == "forward":
            patterns = out.setdefault(source, [])
            patterns.extend(d for d in c.devices if d not in patterns)
        elif where[c.name] == "cloud":
            out[source] = ["*"]
    return out
