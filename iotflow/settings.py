"""Settings from ``IOTFLOW_*`` environment variables (and a ``.env`` file).

When ``IOTFLOW_MQTT_URL`` or ``IOTFLOW_KAFKA_BOOTSTRAP`` is unset, the address
of the local stack started by ``iotflow stack up`` (or ``iotflow demo``) is
used, read from its state file. Secrets never appear in ``repr`` or logs:
``Settings.mqtt_url`` is a ``SecretStr`` and ``redact_url`` masks passwords.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from iotflow.errors import ConfigError

__all__ = ["Settings", "redact_url", "stack_state_path"]

DEFAULT_STATE_DIR = Path(".iotflow")


def stack_state_path() -> Path:
    """Where the local stack records its brokers (``IOTFLOW_STATE_DIR``, default ``.iotflow``)."""
    return Path(os.environ.get("IOTFLOW_STATE_DIR", DEFAULT_STATE_DIR)) / "stack.json"


def redact_url(url: str) -> str:
    """``mqtt://user:secret@host:1883`` -> ``mqtt://user:***@host:1883``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Settings(BaseSettings):
    """Everything a flow or command needs to find its brokers and stores.

    Example::

        >>> s = Settings(mqtt_url="mqtt://u:pw@localhost:1883", kafka_bootstrap="h:9092")
        >>> s.mqtt_url_redacted
        'mqtt://u:***@localhost:1883'
    """

    model_config = SettingsConfigDict(
        env_prefix="IOTFLOW_", env_file=".env", extra="ignore", frozen=True
    )

    mqtt_url: SecretStr | None = None
    kafka_bootstrap: str | None = None
    duckdb: Path = Path(".iotflow/iotflow.duckdb")
    topic_prefix: str = "iot"
    mqtt_base: str = "iotflow"
    ingest: Literal["mqtt", "kafka"] = "mqtt"
    # With IOTFLOW_INGEST=kafka: end the input at the ingest topic's end offsets seen at
    # start (backfills, tests) instead of following it.
    ingest_until_end: bool = False
    # With IOTFLOW_INGEST=kafka: how many recent device messages the flow remembers to drop
    # the bridge's redelivered duplicates (connectors.reading_dedupe), over 16 shards of
    # devices, 8 bytes each; 0 turns the de-duplication off.
    ingest_dedupe_records: int = Field(262_144, ge=0)
    recovery_dir: Path | None = None
    # The monitoring flow's deployment (operators.monitoring.Monitoring) as YAML or JSON.
    monitoring: Path | None = None
    # The device registry (twins.registry: models, devices, patterns, groups) as YAML or JSON;
    # unset: the built-in registry matching the simulator's device kinds.
    registry: Path | None = None
    # Maintenance predictions for the twins flow (twins.prediction.PredictionRule list) as YAML
    # or JSON; unset: none.
    predictions: Path | None = None
    # The orchestrator's declaration (commands.orchestrator.OrchestratorConfig: ack timeouts per
    # protocol, retries, back-off, limits) as YAML or JSON; unset: its defaults.
    orchestrator: Path | None = None
    # The HTTP device writer (commands.writers.HttpWriter): base URL of a REST device API or a
    # Home Assistant (style "home_assistant"), and its bearer token (a secret, never logged).
    http_url: str | None = None
    http_token: SecretStr | None = None
    http_style: Literal["rest", "home_assistant"] = "rest"
    window_s: float = Field(60.0, gt=0)
    lateness_s: float = Field(5.0, ge=0)
    max_payload_bytes: int = Field(256 * 1024, gt=0)
    max_future_skew_s: float = Field(300.0, ge=0)
    mqtt_idle_stop_s: float | None = Field(None, gt=0)
    mqtt_client_id: str = "iotflow-telemetry"
    # Topic filters to subscribe (default: {base}/devices/+/telemetry) and how to map
    # them (see connectors.mapping.SourceMapping), e.g. for zigbee2mqtt:
    # IOTFLOW_MQTT_TOPICS='["zigbee2mqtt/+"]' IOTFLOW_SOURCE_MAPPING='{"device_id": "topic[1]"}'
    mqtt_topics: list[str] = Field(default_factory=list)
    source_mapping: dict[str, str] | None = None
    # Broker security (README "Security"): TLS files for mqtts:// URLs (connectors.mqtt.MqttTls)
    # and Kafka SASL/TLS (connectors.kafka.security_config). Secrets are SecretStr.
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None = None
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ca_file: Path | None = None

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_files_need_mqtts(self) -> Settings:
        files = [
            name
            for name in ("mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file")
            if getattr(self, name) is not None
        ]
        url = self.mqtt_url.get_secret_value() if self.mqtt_url is not None else None
        if files and url is not None and not url.startswith("mqtts://"):
            names = ", ".join(f"IOTFLOW_{n.upper()}" for n in files)
            msg = f"{names} set but IOTFLOW_MQTT_URL {redact_url(url)!r} is not mqtts://; use mqtts:// for TLS"
            raise ValueError(msg)
        return self

    @field_validator("topic_prefix", "mqtt_base")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        bad = set(value) & set("+#/ \t\n\0")
        if not value or bad:
            msg = f"{value!r} must be a non-empty name without '+', '#', '/' or spaces"
            raise ValueError(msg)
        return value

    @property
    def mqtt_url_redacted(self) -> str | None:
        """The MQTT URL with its password masked, safe to print."""
        url = self.resolved_mqtt_url()
        return None if url is None else redact_url(url)

    def _stack(self) -> dict[str, str]:
        path = stack_state_path()
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            msg = (
                f"stack state file {path} is unreadable ({exc}); run `iotflow stack down` then `up`"
            )
            raise ConfigError(msg) from exc

    def resolved_mqtt_url(self) -> str | None:
        """``IOTFLOW_MQTT_URL``, else the local stack's broker, else None."""
        if self.mqtt_url is not None:
            return self.mqtt_url.get_secret_value()
        return self._stack().get("mqtt_url")

    def resolved_kafka_bootstrap(self) -> str | None:
        """``IOTFLOW_KAFKA_BOOTSTRAP``, else the local stack's broker, else None."""
        return self.kafka_bootstrap or self._stack().get("kafka_bootstrap")

    def require_mqtt_url(self) -> str:
        url = self.resolved_mqtt_url()
        if url is None:
            msg = "no MQTT broker: set IOTFLOW_MQTT_URL or start one with `iotflow stack up`"
            raise ConfigError(msg)
        return url

    def require_kafka_bootstrap(self) -> str:
        bootstrap = self.resolved_kafka_bootstrap()
        if bootstrap is None:
            msg = (
                "no Kafka broker: set IOTFLOW_KAFKA_BOOTSTRAP or start one with `iotflow stack up`"
            )
            raise ConfigError(msg)
        return bootstrap

    def to_env(self) -> dict[str, str]:
        """These settings as ``IOTFLOW_*`` variables, to hand to a flow subprocess.

        Brokers are resolved (the local stack's when unset); secrets are
        included, so never log the result.
        """
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json", exclude_none=True).items():
            if name in ("mqtt_url", "kafka_bootstrap", "kafka_sasl_password", "http_token"):
                continue
            text = value if isinstance(value, str) else json.dumps(value)
            env[f"IOTFLOW_{name.upper()}"] = text
        mqtt_url, bootstrap = self.resolved_mqtt_url(), self.resolved_kafka_bootstrap()
        if mqtt_url is not None:
            env["IOTFLOW_MQTT_URL"] = mqtt_url
        if bootstrap is not None:
            env["IOTFLOW_KAFKA_BOOTSTRAP"] = bootstrap
        if self.kafka_sasl_password is not None:
            env["IOTFLOW_KAFKA_SASL_PASSWORD"] = self.kafka_sasl_password.get_secret_value()
        if self.http_token is not None:
            env["IOTFLOW_HTTP_TOKEN"] = self.http_token.get_secret_value()
        return env
