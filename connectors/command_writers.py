"""The client-library side of the device writers: an HTTP sink on httpx.

``commands.writers`` turns each orchestrator ``Write`` into a transport
message; MQTT commands go out through ``connectors.mqtt.MqttSink`` and Kafka
ones through ``connectors.kafka.KafkaOutput``. HTTP calls (a REST device API,
a Home Assistant-style service call) go out through ``HttpSink`` here.

Guarantees of ``HttpSink``: ``expires_at`` is checked right before each call
(an expired command is never sent, and is logged); a bearer token comes from
settings (``IOTFLOW_HTTP_TOKEN``) and never appears in a ``repr``, a log line
or an error; a failed call (unreachable API, timeout, non-2xx answer) is
logged with the method, path, command id and status, and does not stop the
flow: the orchestrator's ack timeout re-sends the command under the same id,
then reports it FAILED or EXPIRED. Confirmation comes from the device's ack
or reported state, not from the HTTP status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from pydantic import SecretStr

from commands.writers import HttpCall
from iotflow.errors import ConfigError
from iotflow.settings import Settings, redact_url

__all__ = ["HttpSink", "HttpStats"]

log = logging.getLogger("iotflow.commands.http")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class HttpStats:
    """What one sink partition did: calls answered 2xx, failed, and not made because expired."""

    sent: int = 0
    failed: int = 0
    expired: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


class _HttpPartition(StatelessSinkPartition[HttpCall]):
    def __init__(
        self, client: httpx.Client, shown: str, now: Callable[[], datetime], stats: HttpStats
    ) -> None:
        self._client = client
        self._shown = shown
        self._now = now
        self.stats = stats

    def write_batch(self, items: list[HttpCall]) -> None:
        for call in items:
            if self._now() >= call.expires_at:
                self.stats.expired += 1
                log.warning(
                    "HTTP writer: command %s for %s expired at %s before it could be sent; not sent",
                    call.command_id,
                    call.device_id,
                    call.expires_at.isoformat(),
                )
                continue
            try:
                response = self._client.request(call.method, call.path, json=call.json)
            except httpx.HTTPError as exc:
                self.stats.failed += 1
                log.warning(
                    "HTTP writer: %s %s%s for command %s failed: %s (%s); the orchestrator retries",
                    call.method,
                    self._shown,
                    call.path,
                    call.command_id,
                    type(exc).__name__,
                    exc,
                )
                continue
            code = response.status_code
            self.stats.statuses[code] = self.stats.statuses.get(code, 0) + 1
            if response.is_success:
                self.stats.sent += 1
            else:
                self.stats.failed += 1
                log.warning(
                    "HTTP writer: %s %s%s for command %s answered %d: %.200s",
                    call.method,
                    self._shown,
                    call.path,
                    call.command_id,
                    code,
                    response.text,
                )

    def close(self) -> None:
        self._client.close()


class HttpSink(DynamicSink[HttpCall]):
    """Make each ``HttpCall`` against ``base_url`` with a bearer token (see the module docstring).

    ``transport`` replaces httpx's network transport (a device API simulated in
    a test); ``stats`` of every built partition are kept in ``partitions_stats``.

    Example::

        >>> sink = HttpSink("http://ha.local:8123", token="s3cret")
        >>> "s3cret" in repr(sink)
        False
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: SecretStr | str | None = None,
        timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = f"HTTP writer URL {redact_url(base_url)!r} must look like http(s)://host[:port][/prefix]"
            raise ConfigError(msg)
        if timeout_s <= 0:
            raise ConfigError(f"HTTP writer timeout {timeout_s} s must be positive")
        self._base_url = base_url
        self._shown = redact_url(base_url).rstrip("/")
        self._token = token if isinstance(token, SecretStr) or token is None else SecretStr(token)
        self._timeout_s = timeout_s
        self._transport = transport
        self._now = now
        self.partitions_stats: list[HttpStats] = []

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> HttpSink:
        """The sink for ``IOTFLOW_HTTP_URL`` and ``IOTFLOW_HTTP_TOKEN``."""
        if settings.http_url is None:
            msg = "devices use the http protocol but IOTFLOW_HTTP_URL is not set; set it to the device API's base URL"
            raise ConfigError(msg)
        return cls(settings.http_url, token=settings.http_token, **kwargs)

    def __repr__(self) -> str:
        auth = ", token=***" if self._token is not None else ""
        return f"HttpSink({self._shown!r}{auth})"

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _HttpPartition:
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        client = httpx.Client(
            base_url=self._base_url,
            headers=headers,
            timeout=self._timeout_s,
            transport=self._transport,
        )
        stats = HttpStats()
        self.partitions_stats.append(stats)
        return _HttpPartition(client, self._shown, self._now, stats)
