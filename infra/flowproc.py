"""Run a flow as ``python -m bytewax.run`` in a subprocess, as a user would.

Used by ``iotflow demo``, the integration tests and the benchmarks. The
subprocess gets its settings as ``IOTFLOW_*`` variables; readiness is the
MQTT source's retained ``online`` status of every worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

from connectors.mqtt import connect_client
from iotflow.errors import StackError
from iotflow.settings import Settings

__all__ = ["FlowProcess"]


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
    ) -> Self:
        env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        argv = [sys.executable, "-m", "bytewax.run", target, "-w", str(workers)]
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
