"""Run a flow as ``python -m bytewax.run`` in a subprocess, as a user would.

Used by ``iotflow run``, ``iotflow demo``, the integration tests and the
benchmarks. The subprocess gets its settings as ``IOTFLOW_*`` variables;
readiness is the MQTT source's retained ``online`` status of every worker.

With ``IOTFLOW_RECOVERY_DIR`` set, the recovery store is created when missing
and the command gains ``-r DIR -s SNAPSHOT_S -b BACKUP_S``: what a user types
by hand is ``python -m bytewax.recovery DIR 1`` once, then
``python -m bytewax.run dataflows.telemetry:flow -r DIR -s 5 -b 0``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from connectors.mqtt import connect_client
from connectors.recovery import DEFAULT_BACKUP_S, DEFAULT_SNAPSHOT_S, ensure_store, run_args
from iotflow.errors import ConfigError, StackError
from iotflow.settings import Settings

__all__ = ["FlowProcess", "flow_argv", "flow_target", "iotflow_error"]

_ERROR_LINE = re.compile(r"^iotflow\.errors\.(\w+): (.*)$")


def flow_target(name: str) -> str:
    """``telemetry`` -> ``dataflows.telemetry:flow``; an import string (``pkg.mod:attr``) as is.

    Raises ``ConfigError`` naming the flows found when ``name`` is not one.
    """
    if ":" in name:
        return name
    import importlib.util

    found = sorted(
        p.stem
        for p in (Path(__file__).resolve().parents[1] / "dataflows").glob("*.py")
        if not p.stem.startswith("_")
    )
    if not name.isidentifier() or importlib.util.find_spec(f"dataflows.{name}") is None:
        msg = f"no flow named {name!r}; flows: {', '.join(found)} (or give module:attribute)"
        raise ConfigError(msg)
    return f"dataflows.{name}:flow"


def flow_argv(
    target: str,
    settings: Settings,
    *,
    workers: int = 1,
    snapshot_s: int = DEFAULT_SNAPSHOT_S,
    backup_s: int = DEFAULT_BACKUP_S,
) -> list[str]:
    """The ``python -m bytewax.run`` command for ``target``; with ``settings.recovery_dir``,
    the store is created when missing and ``-r/-s/-b`` are added."""
    if workers < 1:
        raise ConfigError(f"workers {workers} must be at least 1")
    argv = [sys.executable, "-m", "bytewax.run", target, "-w", str(workers)]
    if settings.recovery_dir is not None:
        ensure_store(settings.recovery_dir)
        argv += run_args(settings.recovery_dir, snapshot_s, backup_s)
    return argv


def iotflow_error(output: str) -> str | None:
    """The last ``iotflow.errors.*`` message in a flow's output (its traceback), if any."""
    found = None
    for line in output.splitlines():
        match = _ERROR_LINE.match(line.strip())
        if match:
            found = match.group(2)
    return found


class FlowProcess:
    """A flow subprocess: start it, wait until its MQTT workers are subscribed, wait for its end.

    Example::

        with FlowProcess.start("dataflows.telemetry:flow", settings, log=path) as proc:
            proc.wait_online()
            ...  # publish
            proc.wait(60)
    """

    def __init__(
        self, popen: subprocess.Popen, settings: Settings, workers: int, log: Path
    ) -> None:
        self.popen = popen
        self.settings = settings
        self.workers = workers
        self.log = log

    @classmethod
    def start(
        cls,
        target: str,
        settings: Settings,
        *,
        log: Path,
        workers: int = 1,
        extra_env: dict[str, str] | None = None,
        snapshot_s: int = DEFAULT_SNAPSHOT_S,
        backup_s: int = DEFAULT_BACKUP_S,
    ) -> Self:
        """Start ``target``; with ``settings.recovery_dir`` it runs on that recovery store."""
        env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        argv = flow_argv(
            target, settings, workers=workers, snapshot_s=snapshot_s, backup_s=backup_s
        )
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        return cls(popen, settings, workers, log)

    def wait_online(self, timeout_s: float = 30.0) -> None:
        """Block until every worker's MQTT source has published ``online``."""
        base, client_id = self.settings.mqtt_base, self.settings.mqtt_client_id
        wanted = {f"{base}/flows/{client_id}-{i}/status" for i in range(self.workers)}
        online: set[str] = set()
        ready = threading.Event()

        def on_message(_c: object, _u: object, msg: object) -> None:
            if msg.payload == b"online":  # type: ignore[attr-defined]
                online.add(msg.topic)  # type: ignore[attr-defined]
            else:
                online.discard(msg.topic)  # type: ignore[attr-defined]
            if wanted <= online:
                ready.set()

        client = connect_client(
            self.settings.require_mqtt_url(),
            on_connect=lambda c: c.subscribe([(t, 1) for t in wanted]),
            on_message=on_message,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not ready.wait(0.1):
                if self.popen.poll() is not None:
                    raise StackError(
                        f"flow exited with code {self.popen.returncode}; see {self.log}"
                    )
                if time.monotonic() > deadline:
                    raise StackError(f"flow workers not online within {timeout_s}s; see {self.log}")
        finally:
            client.disconnect()
            client.loop_stop()

    def wait(self, timeout_s: float) -> int:
        """Wait for the flow to end by itself; raise StackError (and stop it) on timeout."""
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise StackError(f"flow did not finish within {timeout_s}s; see {self.log}") from None

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup of any kind."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def error(self) -> str | None:
        """The ``iotflow.errors`` message the flow died with, read from its log."""
        try:
            return iotflow_error(self.log.read_text(errors="replace"))
        except OSError:
            return None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
