"""Settings from ``IOTFLOW_*`` environment variables (and a ``.env`` file).

When ``IOTFLOW_MQTT_URL`` or ``IOTFLOW_KAFKA_BOOTSTRAP`` is unset, the address
of the local stack started by ``iotflow stack up`` (or ``iotflow demo``) is
used, read from its state file. Secrets never appear in ``repr`` or logs:
``Settings.mqtt_url`` is a ``SecretStr`` and ``redact_url`` masks passwords.

``EnvSettings`` is the small environment reader behind ``Settings``: a plain
pydantic model, so a process that reads its settings does not carry
pydantic-settings (about 2 MB resident on a gateway). The edge gateway reads
the part of ``Settings`` it needs without pydantic (``iotflow.env``, which also
holds the checks and methods both share).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from iotflow.env import (
    SettingsMixin,
    env_values,
    plain_name,
    read_dotenv,
    redact_url,
    stack_state_path,
    upper,
)

__all__ = ["EnvSettings", "Settings", "read_dotenv", "redact_url", "stack_state_path"]


class EnvSettings(BaseModel):
    """A frozen settings model whose fields also come from ``{env_prefix}NAME`` variables.

    Precedence, highest first: keyword arguments, the environment, the
    ``_env_file`` (``.env`` by default; ``None`` reads none), the defaults.
    Names match without regard to case; list, dict and model fields take
    JSON (``IOTFLOW_MQTT_TOPICS='["a/+"]'``); every value is validated as the
    field says, and a bad one raises pydantic's ``ValidationError`` naming the
    field. Unknown variables are ignored. A subclass sets ``env_prefix``.

    Example::

        >>> import os
        >>> class Demo(EnvSettings):
        ...     env_prefix = "DEMO_"
        ...     window_s: float = 60.0
        >>> os.environ["DEMO_WINDOW_S"] = "10"
        >>> Demo(_env_file=None).window_s
        10.0
        >>> del os.environ["DEMO_WINDOW_S"]
    """

    model_config = ConfigDict(extra="ignore", frozen=True)
    env_prefix: ClassVar[str] = "IOTFLOW_"

    def __init__(self, _env_file: str | Path | None = ".env", **values: Any) -> None:
        fields = {name: field.annotation for name, field in type(self).model_fields.items()}
        found = env_values(self.env_prefix, fields, _env_file, values)
        super().__init__(**{name: value for name, (_, value) in found.items()}, **values)


class Settings(EnvSettings, SettingsMixin):
    """Everything a flow or command needs to find its brokers and stores.

    Example::

        >>> s = Settings(mqtt_url="mqtt://u:pw@localhost:1883", kafka_bootstrap="h:9092")
        >>> s.mqtt_url_redacted
        'mqtt://u:***@localhost:1883'
    """

    mqtt_url: SecretStr | None = None
    kafka_bootstrap: str | None = None
    duckdb: Path = Path(".iotflow/iotflow.duckdb")
    topic_prefix: str = "iot"
    mqtt_base: str = "iotflow"
    ingest: Literal["mqtt", "kafka"] = "mqtt"
    # With IOTFLOW_INGEST=kafka: end the input at the ingest topic's end offsets seen at
    # start (backfills, tests) instead of following it.
    ingest_until_end: bool = False
    # With IOTFLOW_INGEST=kafka: how many recent device messages the flow remembers per
    # partition of the ingest topic to drop the bridge's redelivered duplicates
    # (connectors.reading_dedupe), 8 bytes each; 0 turns the de-duplication off.
    # The default stays under a bridge session's 65,535 packet ids over 3 partitions, so a
    # reused packet id is never taken for a resend.
    ingest_dedupe_records: int = Field(16_384, ge=0)
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
        return upper(value)

    @model_validator(mode="after")
    def _tls_files_need_mqtts(self) -> Settings:
        self.check_tls_files()
        return self

    @field_validator("topic_prefix", "mqtt_base")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return plain_name(value)

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
