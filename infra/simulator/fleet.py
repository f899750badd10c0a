"""``Fleet``: a ``FleetModel`` on a real MQTT broker, with a telemetry scheduler.

One paho-mqtt client (MQTT 5) serves the whole fleet: it publishes every
device's telemetry, acks and retained state, and subscribes to
``{base}/devices/+/cmd`` for commands. With a persistent session the fleet
can really go offline and come back (``go_offline``/``go_online``), and lose
its connection between taking a command and acknowledging it
(``drop_before_puback``), as real devices do.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.mqtt import no_delay
from infra.simulator.config import FleetConfig
from infra.simulator.model import FleetStats, FollowUp, Outgoing
from iotflow.errors import AckTimeout, BrokerUnavailable, ConfigError
from iotflow.settings import redact_url

__all__ = ["Fleet"]

_MAX_INFLIGHT = 1000
_BACKPRESSURE_CHECK_S = 0.5
_KEEPALIVE_S = 30
# after a connection the broker dropped: retry soon, as devices do (paho's default backs off to 2 min)
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 0.1, 2.0


_Job = str | FollowUp | tuple[Outgoing, ...]
"""A scheduler job: a device id (telemetry), a command follow-up, or messages to send."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class _Endpoint:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def _endpoint(url: str) -> _Endpoint:
    parts = urlsplit(url)
    shown = redact_url(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        msg = f"MQTT URL {shown!r} must start with mqtt:// or mqtts:// (TLS)"
        raise ConfigError(msg)
    try:
        port = parts.port
    except ValueError as exc:
        msg = f"MQTT URL {shown!r} has an invalid port: {exc}"
        raise ConfigError(msg) from exc
    if not parts.hostname:
        msg = f"MQTT URL {shown!r} has no host; write mqtt://host:1883"
        raise ConfigError(msg)
    tls = parts.scheme == "mqtts"
    return _Endpoint(
        parts.hostname,
        port or (8883 if tls else 1883),
        tls,
        None if parts.username is None else unquote(parts.username),
        None if parts.password is None else unquote(parts.password),
    )


class Fleet:
    """Simulated devices on a real MQTT broker.

    Guarantees:

    - Telemetry: each device publishes ``rate_hz`` messages per second (QoS
      ``config.qos``), spread evenly over each period in a seeded order, never
      all at once. A publisher that falls more than a period behind skips the
      missed slots and counts them in ``stats.schedule_overruns``.
    - ``start()`` returns once connected and subscribed to the cmd topics,
      after publishing every device's reported state (retained).
    - Commands: a command is acked on ``{base}/devices/{id}/ack`` after its
      latency; when it succeeds, the new reported state follows, retained, on
      ``{base}/devices/{id}/state``. See ``FleetModel.receive_command`` for bad
      input, duplicates and offline devices.
    - ``stop()`` sends no telemetry after it is called, still answers the
      commands already received, waits until the broker acknowledged every
      message (QoS 1/2) or until each was written (QoS 0), then disconnects;
      commands arriving meanwhile are counted as ignored (``stopped``).
    - An unreachable broker raises ``BrokerUnavailable`` naming the URL with
      its password masked. A connection the broker drops is re-made at once
      (retries from 0.1 s, backing off to 2 s).
    - Sessions: with ``session_expiry_s`` 0 (the default) every connection
      starts a clean session under a random client id, and commands published
      while the fleet is disconnected are lost. With ``session_expiry_s`` > 0
      the fleet keeps a persistent session under a stable client id
      (``client_id``, default ``iotflow-sim-{base}``, clean_start false): the
      broker queues its commands (QoS 1) while it is offline, for that long,
      and a new ``Fleet`` on the same id picks them up. Each command message is
      acknowledged to the broker (PUBACK) once the model took it; what was not
      acknowledged comes again after a reconnect (DUP, ``stats.redeliveries``)
      and is run at most once per command id.
    - ``go_offline()`` disconnects for real: no telemetry is sent until
      ``go_online()``; acks and states of commands already taken wait in the
      client's queue and go out after the reconnect.

    Example (``stack`` is a running local broker)::

        cfg = FleetConfig(devices={"hvac": 2}, rate_hz=2, base="demo")
        with Fleet(cfg, stack.mqtt_url) as fleet:
            time.sleep(1.0)
        fleet.stats.readings_sent  # about 4

    ``now_ms`` supplies the timestamps (telemetry ts, command receipt and
    expiry); the pacing itself follows the monotonic clock. With
    ``schedule_telemetry=False`` only ``publish_once`` sends telemetry.
    """

    def __init__(
        self,
        config: FleetConfig | Mapping[str, Any],
        mqtt_url: str,
        *,
        schedule_telemetry: bool = True,
        now_ms: Callable[[], int] = _wall_ms,
        connect_timeout_s: float = 10.0,
        session_expiry_s: int = 0,
        client_id: str | None = None,
    ) -> None:
        self.config = (
            config if isinstance(config, FleetConfig) else FleetConfig.model_validate(config)
        )
        self._endpoint = _endpoint(mqtt_url)
        self._url = redact_url(mqtt_url)
        self._schedule_telemetry = schedule_telemetry
        self._now_ms = now_ms
        self._connect_timeout_s = connect_timeout_s
        if session_expiry_s < 0:
            msg = f"session_expiry_s {session_expiry_s} must be 0 (clean sessions) or more"
            raise ConfigError(msg)
        self._session_expiry_s = session_expiry_s
        if client_id is None:
            persistent = session_expiry_s > 0
            tag = "" if persistent else f"-{uuid.uuid4().hex[:8]}"
            client_id = f"iotflow-sim-{self.config.base}{tag}"
        self.client_id = client_id
        self._model = self.config.build()
        self._cmd_topic = self._model.topics.cmd()
        self._period_s = 1.0 / self.config.rate_hz
        # One lock for the model and the job heap; nobody publishes while holding it,
        # because paho runs on_publish under its own lock, which publish() also takes.
        self._lock = threading.Condition()
        self._jobs: list[tuple[float, int, _Job]] = []
        self._job_seq = itertools.count()
        self._command_jobs = 0
        self._stopping = False
        self._unconfirmed = 0
        self._window = _MAX_INFLIGHT
        self._confirmed = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._offline = False
        self._connections = 0
        self._drop_pubacks = 0
        self._bounces: list[threading.Thread] = []

    @property
    def stats(self) -> FleetStats:
        """A consistent copy of the counters and of each device's ground truth."""
        with self._lock:
            return self._model.stats()

    @property
    def device_ids(self) -> list[str]:
        """Every device id, in kind order."""
        return list(self._model.devices)

    def start(self) -> None:
        """Connect, subscribe to commands, publish reported states, start the scheduler.

        Raises ``BrokerUnavailable`` when the broker cannot be reached, refuses
        the connection or the subscription within ``connect_timeout_s``.
        """
        if self._client is not None or self._stopping:
            msg = "a Fleet starts once; build a new Fleet to run again"
            raise RuntimeError(msg)
        client = self._new_client()
        self._connect(
            client,
            lambda: client.connect(
                self._endpoint.host,
                self._endpoint.port,
                keepalive=_KEEPALIVE_S,
                clean_start=self._session_expiry_s == 0,
                properties=self._connect_properties(),
            ),
        )
        self._client = client
        with self._lock:
            states = self._model.initial_state()
        self._publish_all(states)
        if self._schedule_telemetry:
            self._schedule_devices()
        self._thread = threading.Thread(target=self._loop, name="iotflow-simulator", daemon=True)
        self._thread.start()

    def publish_once(self, now_ms: int | None = None) -> list[Outgoing]:
        """Publish one telemetry message from every online device, all stamped ``now_ms``.

        Returns the messages in publication order. With the same seed and the
        same ``now_ms`` sequence, the payloads are identical run after run.
        """
        self._require_started()
        stamp = self._now_ms() if now_ms is None else now_ms
        with self._lock:
            messages = self._model.round(stamp)
        self._publish_all(messages)
        return messages

    def go_offline(self) -> None:
        """Disconnect from the broker (a normal DISCONNECT: a persistent session stays).

        Until ``go_online`` the fleet sends no telemetry (counted in
        ``offline_skips``) and receives nothing; the broker queues commands
        for a persistent session.
        """
        self._require_started()
        with self._lock:
            if self._offline:
                return
            self._offline = True
        client = self._client
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def go_online(self) -> None:
        """Reconnect after ``go_offline``; returns once subscribed (or the session resumed).

        A persistent session delivers the commands queued meanwhile, minus the
        ones whose MQTT 5 message expiry passed. Raises ``BrokerUnavailable``
        like ``start``.
        """
        self._require_started()
        client = self._client
        if client is None or not self._offline:
            return
        self._connect(client, client.reconnect)
        with self._lock:
            self._offline = False

    def drop_before_puback(self, count: int = 1) -> None:
        """Lose the connection right after each of the next ``count`` commands for its devices.

        The device takes each one (and acts on it after its latency) but the
        PUBACK is never sent: the fleet disconnects and reconnects at once on
        its session, and the broker delivers the message again with DUP set,
        which the device answers without acting twice. Needs a persistent
        session (``session_expiry_s`` > 0): without one the broker forgets
        the message with the connection.
        """
        if self._session_expiry_s == 0:
            msg = (
                "drop_before_puback needs a persistent session; build the Fleet with "
                "session_expiry_s > 0"
            )
            raise ConfigError(msg)
        if count < 1:
            raise ConfigError(f"drop_before_puback count {count} must be at least 1")
        with self._lock:
            self._drop_pubacks += count

    def drop_link(self) -> None:
        """Lose the TCP connection without a DISCONNECT, as a network failure does.

        The broker sees the connection die (a persistent session stays and
        queues); the fleet notices and reconnects by itself at once.
        """
        self._require_started()
        sock = None if self._client is None else self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def connections(self) -> int:
        """Connections the broker accepted so far: 1 after ``start``, one more per reconnect."""
        return self._connections

    @property
    def online(self) -> bool:
        """Started and not taken offline by ``go_offline`` (a dropped link may be reconnecting)."""
        return self._client is not None and not self._offline

    def set_hub_online(self, name: str, online: bool) -> None:
        """Take hub ``name`` (``FleetConfig.hubs``) offline or bring it back: while it is
        offline its devices answer no command and send no telemetry. KeyError for an
        unknown hub, naming the known ones."""
        with self._lock:
            self._model.set_hub_online(name, online, self._now_ms())

    def stop(self, timeout_s: float = 10.0) -> FleetStats:
        """Stop telemetry, finish received commands, wait for broker acks, disconnect.

        Raises ``AckTimeout`` (after disconnecting) when messages are still
        unacknowledged after ``timeout_s``, and re-raises an error that
        stopped the scheduler thread. Stopping a fleet that is not running
        only returns the stats. A fleet taken offline by ``go_offline`` waits
        for nothing: its queued messages are counted in ``publishes_failed``.
        """
        client, thread = self._client, self._thread
        if client is None or thread is None:
            return self.stats
        for bounce in self._bounces:
            bounce.join(timeout_s)
        with self._lock:
            self._stopping = True
            self._jobs = [job for job in self._jobs if isinstance(job[2], FollowUp)]
            heapq.heapify(self._jobs)
            self._lock.notify_all()
        thread.join()
        if self._offline:
            # nothing will confirm what waits for a connection: count it, don't wait for it
            with self._confirmed:
                queued, self._unconfirmed = self._unconfirmed, 0
            with self._lock:
                self._model.counters.publishes_failed += queued
        with self._confirmed:
            confirmed = self._confirmed.wait_for(lambda: self._unconfirmed == 0, timeout_s)
            missing = self._unconfirmed
        client.disconnect()
        client.loop_stop()
        self._client = self._thread = None
        if self._failure is not None:
            raise self._failure
        if not confirmed:
            msg = (
                f"{missing} messages to {self._url} were not acknowledged within "
                f"{timeout_s}s; raise stop(timeout_s=...) or check the broker's limits"
            )
            raise AckTimeout(msg)
        return self.stats

    def run(self, duration_s: float) -> FleetStats:
        """Start, run for ``duration_s`` seconds, stop; return the final stats."""
        with self:
            time.sleep(duration_s)
        return self.stats

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _require_started(self) -> None:
        if self._client is None:
            msg = "the fleet is not started; call start() or use it as a context manager"
            raise RuntimeError(msg)

    def _connect(self, client: mqtt.Client, connect: Callable[[], Any]) -> None:
        """Run ``connect`` (paho's connect or reconnect), start the network loop, wait until
        subscribed; BrokerUnavailable when refused or silent."""
        self._connected.clear()
        self._subscribed.clear()
        self._refused = None
        try:
            connect()
        except OSError as exc:
            msg = f"MQTT broker {self._url} is unreachable: {exc}"
            raise BrokerUnavailable(msg) from exc
        client.loop_start()
        ready = self._connected.wait(self._connect_timeout_s) and self._subscribed.wait(
            self._connect_timeout_s
        )
        if not ready or self._refused is not None:
            client.disconnect()
            client.loop_stop()
            why = self._refused or f"no CONNACK/SUBACK within {self._connect_timeout_s}s"
            msg = f"MQTT broker {self._url} did not accept the simulator: {why}"
            raise BrokerUnavailable(msg)

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        return props

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        client.max_inflight_messages_set(_MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        client.on_socket_open = no_delay  # devices answer commands at once, as the flow sends them
        if self._endpoint.username is not None:
            client.username_pw_set(self._endpoint.username, self._endpoint.password)
        if self._endpoint.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _schedule_devices(self) -> None:
        order = list(self._model.devices)
        random.Random(self.config.seed).shuffle(order)
        start = time.monotonic()
        with self._lock:
            for index, device_id in enumerate(order):
                due = start + self._period_s * index / len(order)
                heapq.heappush(self._jobs, (due, next(self._job_seq), device_id))

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while True:
                        if self._stopping and self._command_jobs == 0:
                            return
                        now = time.monotonic()
                        if self._jobs and self._jobs[0][0] <= now:
                            break
                        self._lock.wait(self._jobs[0][0] - now if self._jobs else None)
                    due_jobs = []
                    while self._jobs and self._jobs[0][0] <= now:
                        due_jobs.append(heapq.heappop(self._jobs))
                for due, _, job in due_jobs:
                    if isinstance(job, str):
                        self._run_telemetry(job, due)
                    else:
                        self._run_command_job(job)
        except BaseException as exc:
            self._failure = exc

    def _run_telemetry(self, device_id: str, due: float) -> None:
        stamp = self._now_ms()
        with self._lock:
            if self._stopping:
                return
            if self._offline:
                self._model.counters.offline_skips += 1
                message = None
            else:
                message = self._model.telemetry(device_id, stamp)
            next_due = due + self._period_s
            behind = time.monotonic() - next_due
            if behind > self._period_s:
                skipped = int(behind / self._period_s)
                self._model.counters.schedule_overruns += skipped
                next_due += skipped * self._period_s
            heapq.heappush(self._jobs, (next_due, next(self._job_seq), device_id))
        if message is not None:
            self._publish(message)

    def _run_command_job(self, job: FollowUp | tuple[Outgoing, ...]) -> None:
        stamp = self._now_ms()
        with self._lock:
            if isinstance(job, FollowUp):
                messages = self._model.follow_up(job.device_id, job.command_id, stamp)
            else:
                messages = list(job)
            self._command_jobs -= 1
        self._publish_all(messages)

    def _add_command_job(self, delay_ms: float, job: FollowUp | tuple[Outgoing, ...]) -> None:
        """Queue a job for the scheduler thread; the caller holds ``self._lock``."""
        due = time.monotonic() + delay_ms / 1000
        heapq.heappush(self._jobs, (due, next(self._job_seq), job))
        self._command_jobs += 1
        self._lock.notify_all()

    def _publish_all(self, messages: list[Outgoing]) -> None:
        for message in messages:
            self._publish(message)

    def _publish(self, message: Outgoing) -> None:
        client = self._client
        if client is None:
            return
        with self._confirmed:
            # Stay within the broker's receive maximum: it disconnects a client that
            # exceeds it, and paho cannot lower its own limit once connected.
            while self._unconfirmed >= self._window and not self._stopping:
                self._confirmed.wait(_BACKPRESSURE_CHECK_S)
            self._unconfirmed += 1
        info = client.publish(
            message.topic, message.payload, qos=self.config.qos, retain=message.retain
        )
        # QoS 1/2 messages without a connection wait in paho's queue for the reconnect;
        # QoS 0 ones are gone and will never be confirmed.
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self.config.qos == 0:
            self._confirm(failed=True)

    def _confirm(self, *, failed: bool) -> None:
        if failed:
            with self._lock:
                self._model.counters.publishes_failed += 1
        with self._confirmed:
            self._unconfirmed -= 1
            if self._unconfirmed == 0:
                self._confirmed.notify_all()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = f"CONNACK {reason_code}"
            self._connected.set()
            self._subscribed.set()
            return
        self._connections += 1
        receive_maximum = getattr(properties, "ReceiveMaximum", _MAX_INFLIGHT)
        with self._confirmed:
            self._window = min(_MAX_INFLIGHT, receive_maximum)
        if flags.session_present:
            self._subscribed.set()  # the session kept the subscription
        else:
            client.subscribe(self._cmd_topic, qos=1)
        self._connected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            self._refused = f"SUBACK {', '.join(refused)} for {self._cmd_topic}"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        device_id = message.topic.split("/")[-2]
        stamp = self._now_ms()
        with self._lock:
            if message.dup:
                self._model.counters.redeliveries += 1
            # only a command for one of its devices: on a shared base it also hears others'
            ours = device_id in self._model.devices
            drop = self._drop_pubacks > 0 and ours and not self._stopping
            if drop:
                self._drop_pubacks -= 1
            if self._stopping:
                self._model.ignore("stopped")
            else:
                intake = self._model.receive_command(device_id, message.payload, stamp)
                # Publishing is left to the scheduler thread: this network thread must never
                # wait for room under the receive maximum, since only it can receive PUBACKs.
                if intake.outgoing:
                    self._add_command_job(0.0, tuple(intake.outgoing))
                if intake.follow_up is not None:
                    self._add_command_job(intake.follow_up.delay_ms, intake.follow_up)
        if not drop:
            client.ack(message.mid, message.qos)
            return
        # the reconnect cannot run on this network thread: go_offline joins it
        bounce = threading.Thread(target=self._bounce, name="iotflow-simulator-bounce", daemon=True)
        self._bounces = [b for b in self._bounces if b.is_alive()] + [bounce]
        bounce.start()

    def _bounce(self) -> None:
        try:
            self.go_offline()
            self.go_online()
        except BaseException as exc:
            self._failure = exc

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._confirm(failed=reason_code.is_failure)
