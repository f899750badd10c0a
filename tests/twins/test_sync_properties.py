"""Property: any interleaving of reported and desired updates leaves the version strictly
increasing and the final twin equal to what the policy says, computed here from the whole
set of updates (or, for reported_wins, folded in arrival order)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from iotflow.events import from_ms
from tests.twins.kit import T0_MS, desired, make_registry, reported
from twins.sync import TwinSync

PRIORITIES = ["operator", "state", "telemetry", "api"]
POLICIES = {
    "latest_timestamp": {"policy": "latest_timestamp"},
    "source_priority": {"policy": "source_priority", "priorities": PRIORITIES},
    "desired_wins": {"policy": "desired_wins"},
    "reported_wins": {"policy": "reported_wins"},
}
VALUES = {"setpoint": [10.0, 20.0, 30.0], "mode": ["off", "heat", "cool"]}
RECEIVED_MS = T0_MS + 10_000_000  # every stamp is in the past: nothing is from the future


@st.composite
def update(draw):
    side = draw(st.sampled_from(["reported", "desired"]))
    prop = draw(st.sampled_from(sorted(VALUES)))
    value = draw(st.sampled_from(VALUES[prop]))
    ts = T0_MS + draw(st.integers(0, 20)) * 1000
    sources = ["state", "telemetry"] if side == "reported" else ["api", "operator"]
    return side, prop, value, ts, draw(st.sampled_from(sources))


def as_update(event):
    side, prop, value, ts, source = event
    build = reported if side == "reported" else desired
    return build("t1", ts, received_ms=RECEIVED_MS, source=source, **{prop: value})


def rank(source: str) -> int:
    return len(PRIORITIES) - PRIORITIES.index(source)


def expected(policy: str, events) -> tuple[dict, dict, dict]:
    """(reported, desired, delta) as the policy defines them."""
    if policy == "reported_wins":
        rep, des = {}, {}
        for side, prop, value, _ts, _src in events:
            if side == "reported":
                rep[prop] = value
                if prop in des and des[prop] != value:
                    des[prop] = value
            else:
                des[prop] = value
        return rep, des, {p: v for p, v in des.items() if rep.get(p) != v}
    key = {
        "latest_timestamp": lambda i, e: (e[3], i),
        "source_priority": lambda i, e: (rank(e[4]), e[3], i),
        "desired_wins": lambda i, e: (i,),
    }[policy]
    cells: dict[tuple[str, str], tuple] = {}
    for index, event in enumerate(events):
        side, prop = event[0], event[1]
        best = cells.get((side, prop))
        if best is None or key(index, event) >= key(*best):
            cells[(side, prop)] = (index, event)
    rep = {p: e[2] for (s, p), (_, e) in cells.items() if s == "reported"}
    des = {p: e[2] for (s, p), (_, e) in cells.items() if s == "desired"}
    delta = {}
    for prop, value in des.items():
        if rep.get(prop) == value:
            continue
        r = cells.get(("reported", prop))
        if r is None or in_force(policy, cells[("desired", prop)][1], r[1]):
            delta[prop] = value
    return rep, des, delta


def in_force(policy: str, d: tuple, r: tuple) -> bool:
    """Whether desired write ``d`` stands against reported write ``r``."""
    if policy == "latest_timestamp":
        return d[3] > r[3]
    if policy == "source_priority":
        return (rank(d[4]), d[3]) > (rank(r[4]), r[3])
    return True


def run_all(policy: str, events, batch: int):
    sync = TwinSync(make_registry(POLICIES[policy]), now=lambda: from_ms(RECEIVED_MS))
    updates = [as_update(e) for e in events]
    changes = []
    for start in range(0, len(updates), batch):
        for out in sync.on_batch(updates[start : start + batch]):
            changes.extend(out.changes)
            assert not out.rejections
    return sync, changes


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(sorted(POLICIES)),
    events=st.lists(update(), min_size=1, max_size=30),
    batch=st.integers(1, 7),
)
def test_any_interleaving_matches_the_policy(policy, events, batch):
    sync, changes = run_all(policy, events, batch)
    twin = sync.twin("t1")
    assert [c.version for c in changes] == list(range(1, len(changes) + 1))
    assert twin.version == len(changes)
    rep, des, delta = expected(policy, events)
    assert twin.reported == rep
    assert twin.desired == des
    assert twin.delta(sync.registry.policy_of("t1")) == delta
    if changes:
        last = changes[-1]
        assert (last.reported, last.desired, last.delta) == (rep, des, delta)


@settings(max_examples=100, deadline=None)
@given(
    policy=st.sampled_from(["latest_timestamp", "source_priority"]),
    events=st.lists(update(), min_size=1, max_size=20, unique_by=lambda e: (e[0], e[1], e[3])),
    data=st.data(),
)
def test_timestamp_policies_converge_whatever_the_arrival_order(policy, events, data):
    shuffled = data.draw(st.permutations(events))
    a, _ = run_all(policy, events, 5)
    b, _ = run_all(policy, shuffled, 3)
    ta, tb = a.twin("t1"), b.twin("t1")
    p = a.registry.policy_of("t1")
    assert (ta.reported, ta.desired, ta.delta(p)) == (tb.reported, tb.desired, tb.delta(p))


def test_clock_is_aware():
    assert from_ms(RECEIVED_MS).tzinfo is UTC and isinstance(from_ms(RECEIVED_MS), datetime)
