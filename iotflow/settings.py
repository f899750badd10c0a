"""Settings from ``IOTFLOW_*`` environment variables (and a ``.env`` file).

When ``IOTFLOW_MQTT_URL`` or ``IOTFLOW_KAFKA_BOOTSTRAP`` is unset, the address
of the local stack started by ``iotflow stack up`` (or ``iotflow demo``) is
used, read from its state file. Secrets never appear in ``repr`` or logs:
``Settings.mqtt_url`` is a ``SecretStr`` and ``redact_url`` masks passwords.

``EnvSettings`` is the small environment reader behind ``Settings`` (and the
edge gateway's ``EdgeSettings``): a plain pydantic model, so a process that
reads its settings does not carry pydantic-settings (about 2 MB resident on a
gateway).
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from iotflow.errors import ConfigError

__all__ = ["EnvSettings", "Settings", "read_dotenv", "redact_url", "stack_state_path"]

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


def read_dotenv(path: str | Path) -> dict[str, str]:
    """``NAME=value`` lines of a ``.env`` file (empty when there is none).

    Blank lines and ``#`` comments are skipped, an ``export`` prefix is
    allowed, a value in matching single or double quotes is taken as written,
    and an unquoted value ends at `` #`` (a comment).
    """
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the settings file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        values[name.strip()] = value
    return values


def _kinds(annotation: Any) -> list[Any]:
    """The types a field's annotation allows, without ``None`` (``list[str] | None`` -> ``[list]``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [k for a in get_args(annotation) if a is not type(None) for k in _kinds(a)]
    return [get_origin(annotation) or annotation]


def _takes_json(annotation: Any) -> bool:
    """Whether a field's environment value is JSON (lists, dicts, models), as with pydantic-settings."""
    return any(
        isinstance(k, type) and issubclass(k, list | dict | set | tuple | BaseModel)
        for k in _kinds(annotation)
    )


def _json_example(annotation: Any) -> str:
    mapping = any(
        isinstance(k, type) and issubclass(k, dict | BaseModel) for k in _kinds(annotation)
    )
    return '{"name": "value"}' if mapping else '["a", "b"]'


class EnvSettings(BaseModel):
    """A frozen settings model whose fields also come from ``{env_prefix}NAME`` variables.

    Precedence, highest first: keyword arguments, the environment, the
    ``_env_file`` (``.env`` by default; ``None`` reads none), the defaults.
    Names match without regard to case; list, dict and model fields take
    JSON (``IOTFLOW_MQTT_TOPICS='["a/+"]'``); every value is validated as the
    field says, and a bad one raises pydantic's ``ValidationError`` naming the
    field. Unknown variables are ignored. A subclass sets ``env_prefix``.

    Example::

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
        prefix = self.env_prefix.lower()
        found = {} if _env_file is None else read_dotenv(_env_file)
        found.update(os.environ)
        by_name = {k.lower(): (k, v) for k, v in found.items() if k.lower().startswith(prefix)}
        from_env: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            if name in values or prefix + name not in by_name:
                continue
            var, raw = by_name[prefix + name]
            if _takes_json(field.annotation):
                try:
                    from_env[name] = json.loads(raw)
                except ValueError as exc:
                    example = _json_example(field.annotation)
                    msg = (
                        f"{var} is not valid JSON ({exc}); write it as JSON, e.g. {var}='{example}'"
                    )
                    raise ConfigError(msg) from None
            else:
                from_env[name] = raw
        super().__init__(**from_env, **values)


class Settings(EnvSettings):
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
