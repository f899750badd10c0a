"""Random ack/timeout/failure/duplicate/state sequences never break the orchestrator's promises.

Whatever arrives, in whatever order: nothing is written at or after its
expiry, a device never has two commands in flight, a command is re-sent only
after a RETRIED event, nothing happens to a command after its terminal event
(so nothing is applied twice), and once time has run past every expiry each
requested command has exactly one terminal event.
"""

from __future__ import annotations

from typing import Any

from cmdkit import Clock, make_command
from hypothesis import example, given, settings
from hypothesis import strategies as st

from commands.model import TERMINAL
from commands.orchestrator import Dropped, OrchestratorConfig, Write
from commands.validation import DeviceAck, DeviceState
from iotflow.events import Ack, AckStatus, CommandEvent, CommandEventKind
from twins.registry import simulator_registry

K = CommandEventKind
TERMINAL_KINDS = {K(state.value) for state in TERMINAL}
DEVICES = ["hvac-0001", "hvac-0002", "hvac-0003"]
REGISTRY = simulator_registry()

requests = st.tuples(
    st.just("request"),
    st.sampled_from(DEVICES),
    st.sampled_from([15.0, 20.0, 25.0, 99.0]),  # 99 is out of range: rejected
    st.sampled_from([0.5, 2.0, 5.0, 30.0]),  # ttl_s
    st.sampled_from([0, 0, 100]),  # priority
    st.sampled_from([None, "plan-a", "plan-b"]),
)
acks = st.tuples(
    st.just("ack"),
    st.integers(0, 30),
    st.sampled_from([AckStatus.ACCEPTED, AckStatus.DONE, AckStatus.DONE, AckStatus.FAILED]),
)
ops = st.one_of(
    requests,
    requests,
    requests,
    acks,
    acks,
    # a device answers the command it has in flight, as real devices do
    st.tuples(st.just("answer"), st.sampled_from(DEVICES), st.sampled_from(list(AckStatus))),
    st.tuples(st.just("answer"), st.sampled_from(DEVICES), st.just(AckStatus.DONE)),
    st.tuples(st.just("replay"), st.integers(0, 30)),
    st.tuples(st.just("wrong_ack"), st.integers(0, 30)),
    st.tuples(st.just("state"), st.sampled_from(DEVICES), st.sampled_from([15.0, 20.0, 25.0])),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 1.0, 3.0])),
    # time passes before the timers run (an engine may wake a step late)
    st.tuples(st.just("advance_quietly"), st.sampled_from([0.5, 3.0])),
)
MAX_ATTEMPTS = 3


class Log:
    """Every output with the clock time it was emitted at, and the checks over it."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, Any]] = []

    def add(self, now: Any, out: list[Any]) -> None:
        self.items.extend((now, item) for item in out)

    def check(self, finished: bool, max_attempts: int = MAX_ATTEMPTS) -> None:
        terminal: dict[str, K] = {}
        requested: set[str] = set()
        in_flight: dict[str, str] = {}
        retried_since_write: dict[str, bool] = {}
        writes: dict[str, int] = {}
        for now, item in self.items:
            if isinstance(item, Write):
                cid, device = item.command.command_id, item.command.device_id
                assert now < item.command.expires_at, f"{cid} written after its expiry"
                assert cid not in terminal, f"{cid} written after {terminal.get(cid)}"
                assert in_flight.get(device) in (None, cid), f"two in flight on {device}"
                if writes.get(cid):
                    assert retried_since_write[cid], f"{cid} re-sent without a retry"
                writes[cid] = writes.get(cid, 0) + 1
                assert writes[cid] <= max_attempts, f"{cid} sent more than {max_attempts} times"
                assert item.attempt == writes[cid]
                in_flight[device] = cid
                retried_since_write[cid] = False
            elif isinstance(item, Dropped):
                # the programs never reuse an id: only acks from the wrong device are dropped
                assert item.source == "acks", item.reason
            elif isinstance(item, CommandEvent):
                cid = item.command_id
                assert cid not in terminal, f"{item.kind} for {cid} after {terminal.get(cid)}"
                if item.kind is K.REQUESTED:
                    requested.add(cid)
                if item.kind is K.RETRIED:
                    retried_since_write[cid] = True
                if item.kind in TERMINAL_KINDS:
                    terminal[cid] = item.kind
                    if in_flight.get(item.device_id) == cid:
                        del in_flight[item.device_id]
                    if item.kind is K.DONE:
                        assert writes.get(cid), f"{cid} done without being written"
                        assert item.applied is True
        if finished:
            assert requested == set(terminal), f"unfinished: {requested - set(terminal)}"


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, min_size=5, max_size=80))
@example(  # a queued command expires while the timers are late; its device is then freed
    [
        ("request", "hvac-0001", 20.0, 30.0, 0, None),
        ("request", "hvac-0001", 21.0, 0.5, 0, None),
        ("advance_quietly", 3.0),
        ("answer", "hvac-0001", AckStatus.DONE),
    ]
)
def test_random_sequences_keep_every_promise(program: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    config = OrchestratorConfig(
        ack_timeout={"mqtt": "1s"},
        max_attempts=MAX_ATTEMPTS,
        backoff="500ms",
        backoff_max="2s",
        jitter=0.5,
    )
    orch = config.build(None, REGISTRY, clock)
    log = Log()
    issued: list[Any] = []

    def drain_timers() -> None:
        for _ in range(10_000):
            due = orch.next_timer()
            if due is None or due > clock.t:
                return
            log.add(clock.t, orch.on_timer())
        raise AssertionError("timers never settle")

    for op in program:
        kind = op[0]
        if kind == "request":
            _, device, setpoint, ttl_s, priority, plan = op
            command = make_command(
                f"c{len(issued)}",
                device_id=device,
                params={"setpoint": setpoint},
                at=clock.t,
                ttl_s=ttl_s,
                priority=priority,
                correlation_id=plan,
            )
            issued.append(command)
            log.add(clock.t, orch.on_batch(command))
        elif not issued and kind in ("replay", "ack", "wrong_ack"):
            continue
        elif kind == "replay":
            log.add(clock.t, orch.on_batch(issued[op[1] % len(issued)]))
        elif kind in ("ack", "wrong_ack"):
            command = issued[op[1] % len(issued)]
            status = op[2] if kind == "ack" else AckStatus.DONE
            device = command.device_id
            if kind == "wrong_ack":
                device = DEVICES[(DEVICES.index(device) + 1) % len(DEVICES)]
            ack = Ack(command.command_id, status, {"setpoint": command.params["setpoint"]})
            log.add(clock.t, orch.on_batch(DeviceAck(device, ack)))
        elif kind == "answer":
            command_id = orch.in_flight(op[1])
            if command_id is not None:
                ack = Ack(command_id, op[2], {})
                log.add(clock.t, orch.on_batch(DeviceAck(op[1], ack)))
        elif kind == "state":
            log.add(clock.t, orch.on_batch(DeviceState(op[1], {"setpoint": op[2]})))
        elif kind == "advance":
            clock.advance(seconds=op[1])
            drain_timers()
        else:
            clock.advance(seconds=op[1])
        log.check(finished=False)
    for _ in range(480):  # 2 minutes, past every expiry and every retry
        clock.advance(seconds=0.25)
        drain_timers()
    log.check(finished=True)
    assert orch.next_timer() is None
    assert all(orch.in_flight(d) is None and not orch.queued(d) for d in DEVICES)


@settings(max_examples=100, deadline=None)
@given(st.lists(ops, min_size=5, max_size=60), st.integers(0, 60))
def test_a_restore_at_any_point_keeps_the_promises(
    program: list[tuple[Any, ...]], cut: int
) -> None:
    """Snapshot and rebuild in the middle: the rebuilt orchestrator continues consistently."""
    clock = Clock()
    config = OrchestratorConfig(ack_timeout={"mqtt": "1s"}, max_attempts=2, backoff="500ms")
    orch = config.build(None, REGISTRY, clock)
    log = Log()
    issued: list[Any] = []
    for index, op in enumerate(program):
        if index == cut:
            orch = config.build(orch.snapshot(), REGISTRY, clock)
        if op[0] == "request":
            _, device, setpoint, ttl_s, priority, plan = op
            command = make_command(
                f"c{len(issued)}",
                device_id=device,
                params={"setpoint": setpoint},
                at=clock.t,
                ttl_s=ttl_s,
                priority=priority,
                correlation_id=plan,
            )
            issued.append(command)
            log.add(clock.t, orch.on_batch(command))
        elif op[0] == "ack" and issued:
            command = issued[op[1] % len(issued)]
            log.add(
                clock.t, orch.on_batch(DeviceAck(command.device_id, Ack(command.command_id, op[2])))
            )
        elif op[0] == "advance":
            clock.advance(seconds=op[1])
            while (due := orch.next_timer()) is not None and due <= clock.t:
                log.add(clock.t, orch.on_timer())
    clock.advance(seconds=120)
    while (due := orch.next_timer()) is not None and due <= clock.t:
        log.add(clock.t, orch.on_timer())
    log.check(finished=True, max_attempts=2)
