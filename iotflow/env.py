"""Settings from ``{prefix}NAME`` environment variables without pydantic.

``iotflow.settings.Settings`` (pydantic) is the authority on settings. Importing
pydantic and building its models costs a process about 10 MiB resident, a
sixth of an edge gateway's budget, so the gateway reads the settings it needs
through this module, which imports only the standard library and msgspec:

* ``read_env(cls, prefix)`` builds a frozen msgspec Struct from the
  environment and ``.env`` with the same rules as ``EnvSettings`` (which
  reads its variables through ``env_values`` here);
* ``LeanSettings`` is the subset of ``Settings`` the edge flow and its
  connectors read, with the same defaults and checks (``SettingsMixin`` holds
  the checks and methods both classes share);
* ``lean_settings()`` reads it, and lets pydantic decide what it refuses.

Secrets (``Secret``) never appear in a ``repr``, a log line or an error
message; ``redact_url`` masks the password of a URL.
"""

from __future__ import annotations

import json
import os
import re
import sys
import types
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import msgspec

from iotflow.errors import ConfigError

if TYPE_CHECKING:
    from iotflow.settings import Settings

__all__ = [
    "Before",
    "Check",
    "LeanSettings",
    "Secret",
    "SettingsMixin",
    "env_values",
    "lean_settings",
    "plain_name",
    "read_dotenv",
    "read_env",
    "redact_url",
    "stack_state_path",
    "upper",
]

DEFAULT_STATE_DIR = Path(".iotflow")
T = TypeVar("T", bound=msgspec.Struct)


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


class Secret:
    """A secret string (a password, a URL that holds one); ``repr`` and ``str`` mask it,
    as pydantic's ``SecretStr`` does.

    Example::

        >>> s = Secret("pw")
        >>> s, str(s), s.get_secret_value()
        (Secret('**********'), '**********', 'pw')
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __repr__(self) -> str:
        return f"Secret('{self}')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# -- reading variables (shared with iotflow.settings.EnvSettings) -----------------------------


def _kinds(annotation: Any) -> list[Any]:
    """The types a field's annotation allows, without ``None`` (``list[str] | None`` -> ``[list]``)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kinds(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [k for a in get_args(annotation) if a is not type(None) for k in _kinds(a)]
    return [origin or annotation]


def _is_model(kind: Any) -> bool:
    # pydantic models are recognised by their API, so this module never imports pydantic
    return isinstance(kind, type) and (
        issubclass(kind, msgspec.Struct) or hasattr(kind, "model_validate")
    )


def _takes_json(annotation: Any) -> bool:
    """Whether a field's environment value is JSON (lists, dicts, models), as with pydantic-settings."""
    return any(
        (isinstance(k, type) and issubclass(k, list | dict | set | tuple)) or _is_model(k)
        for k in _kinds(annotation)
    )


def _json_example(annotation: Any) -> str:
    mapping = any(
        (isinstance(k, type) and issubclass(k, dict)) or _is_model(k) for k in _kinds(annotation)
    )
    return '{"name": "value"}' if mapping else '["a", "b"]'


def env_values(
    prefix: str,
    fields: Mapping[str, Any],
    env_file: str | Path | None = ".env",
    given: Container[str] = (),
) -> dict[str, tuple[str, Any]]:
    """``{field: (variable, value)}`` for the ``fields`` (name -> annotation) that a
    ``{prefix}NAME`` variable sets and ``given`` does not.

    The environment wins over ``env_file`` (``None``: none is read); names
    match without regard to case. A list, dict or model field's value is
    decoded from JSON, and bad JSON is a ``ConfigError`` naming the variable
    with an example; every other value stays the variable's text.
    """
    prefix = prefix.lower()
    found = {} if env_file is None else read_dotenv(env_file)
    found.update(os.environ)
    by_name = {k.lower(): (k, v) for k, v in found.items() if k.lower().startswith(prefix)}
    values: dict[str, tuple[str, Any]] = {}
    for name, annotation in fields.items():
        if name in given or prefix + name not in by_name:
            continue
        var, raw = by_name[prefix + name]
        if _takes_json(annotation):
            try:
                values[name] = (var, json.loads(raw))
            except ValueError as exc:
                example = _json_example(annotation)
                msg = f"{var} is not valid JSON ({exc}); write it as JSON, e.g. {var}='{example}'"
                raise ConfigError(msg) from None
        else:
            values[name] = (var, raw)
    return values


# -- building a msgspec Struct from them ------------------------------------------------------


@dataclass(frozen=True)
class Before:
    """``Annotated`` metadata for ``read_env``: apply ``function`` to a field's value
    before conversion (pydantic's ``field_validator(mode="before")``)."""

    function: Callable[[Any], Any]


@dataclass(frozen=True)
class Check:
    """``Annotated`` metadata for ``read_env``: ``function`` raises ``ValueError`` when a
    converted field value is unusable (pydantic's ``field_validator``)."""

    function: Callable[[Any], object]


# pydantic's int syntax without its extras ("1_000", "10.0", spaces): msgspec would also
# take "1e3" and round "10.000000000000001" to an int, which pydantic refuses
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_AT = re.compile(
    r"^(?P<what>.*) - at `\$\.(?P<field>[A-Za-z_][A-Za-z0-9_]*)(?P<where>[^`]*)`$", re.S
)


class _Refused(Exception):
    """A field value ``read_env`` refuses outside msgspec: its text, or a ``Check``."""

    def __init__(self, field: str, what: str) -> None:
        super().__init__(what)
        self.field = field
        self.what = what


def _decode(kind: type, value: Any) -> Any:
    """msgspec's ``dec_hook``: ``Path`` and ``Secret`` from text (or as given)."""
    if kind in (Path, Secret) and isinstance(value, kind):
        return value
    if kind in (Path, Secret) and isinstance(value, str):
        return kind(value)
    if kind is Secret and hasattr(value, "get_secret_value"):  # pydantic's SecretStr
        return Secret(value.get_secret_value())
    raise TypeError(f"Expected `{kind.__name__}` or `str`, got `{type(value).__name__}`")


def _metadata(annotation: Any, kind: type) -> list[Any]:
    if get_origin(annotation) is not Annotated:
        return []
    return [m for m in get_args(annotation)[1:] if isinstance(m, kind)]


def _null_is_none(annotation: Any) -> bool:
    """Whether msgspec's lenient mode would read the text ``null`` as None for this field
    (an optional field that takes no text), which pydantic refuses."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _null_is_none(get_args(annotation)[0])
    allows_none = origin in (Union, types.UnionType) and type(None) in get_args(annotation)
    return allows_none and not any(k in (str, Path, Secret) for k in _kinds(annotation))


def _prepare(name: str, annotation: Any, value: Any) -> Any:
    """A raw value as msgspec should see it: ``Before`` hooks applied, whole numbers parsed,
    and what msgspec would read otherwise than pydantic refused."""
    for before in _metadata(annotation, Before):
        value = before.function(value)
    if isinstance(value, str) and value.lower() == "null" and _null_is_none(annotation):
        raise _Refused(name, "text 'null' does not mean None here")
    if isinstance(value, str) and _kinds(annotation) == [int]:
        if not _WHOLE_NUMBER.fullmatch(value):
            raise _Refused(name, "Expected `int` (a whole number such as 10)")
        try:
            return int(value)
        except ValueError:  # more digits than Python converts, as pydantic refuses too
            raise _Refused(
                name, f"Expected `int` of at most {sys.get_int_max_str_digits()} digits"
            ) from None
    return value


def _shown(value: Any, secret: bool) -> str:
    if secret:
        return "'***'"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def read_env(cls: type[T], prefix: str, env_file: str | Path | None = ".env", **values: Any) -> T:
    """An instance of the msgspec Struct ``cls`` from ``{prefix}NAME`` variables.

    The rules of ``iotflow.settings.EnvSettings``: keyword arguments win over
    the environment, which wins over ``env_file`` (``None``: none is read),
    which wins over the defaults; names match without regard to case; list,
    dict and Struct fields take JSON; unknown variables and keywords are
    ignored. Values convert as msgspec converts leniently (``"10"`` -> 10,
    ``"true"`` -> True; ``Path`` and ``Secret`` from text; an int only from
    whole-number text), then the ``Check``s of the fields' ``Annotated``
    metadata and the Struct's ``__post_init__`` run.

    A value that does not fit is a ``ConfigError`` that names the variable,
    says what is wrong and shows the value (a ``Secret``'s as ``***``).

    Example::

        >>> class Demo(msgspec.Struct, frozen=True):
        ...     window_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
        >>> os.environ["DEMO_WINDOW_S"] = "10"
        >>> read_env(Demo, "DEMO_", None).window_s
        10.0
        >>> os.environ["DEMO_WINDOW_S"] = "0"
        >>> read_env(Demo, "DEMO_", None)
        Traceback (most recent call last):
        ...
        iotflow.errors.ConfigError: DEMO_WINDOW_S='0' is not valid: Expected `float` > 0.0; fix it or unset it (default: 60.0)
        >>> del os.environ["DEMO_WINDOW_S"]
    """
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    found = env_values(prefix, {n: f.type for n, f in fields.items()}, env_file, values)
    data = {name: value for name, (_, value) in found.items()}
    data.update((name, value) for name, value in values.items() if name in fields)
    try:
        prepared = {n: _prepare(n, fields[n].type, v) for n, v in data.items()}
        result = msgspec.convert(prepared, cls, strict=False, dec_hook=_decode)
        for name, field in fields.items():
            for check in _metadata(field.type, Check):
                try:
                    check.function(getattr(result, name))
                except ValueError as exc:
                    raise _Refused(name, str(exc)) from None
    except _Refused as exc:
        raise _refusal(fields[exc.field], found, data, exc.what, "") from None
    except msgspec.ValidationError as exc:
        at = _AT.match(str(exc))
        if at is None:  # a check of several fields (__post_init__), which names them
            raise ConfigError(str(exc)) from None
        raise _refusal(fields[at["field"]], found, data, at["what"], at["where"]) from None
    return result


def _refusal(
    field: msgspec.structs.FieldInfo,
    found: Mapping[str, tuple[str, Any]],
    data: Mapping[str, Any],
    what: str,
    where: str,
) -> ConfigError:
    """The ``ConfigError`` for ``field``: its variable (or keyword), the value, what msgspec
    or the check said, the valid choices or the fix, and the default."""
    name = field.name
    var = found[name][0] if name in found else name  # else a keyword argument
    default = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    value = data.get(name, default)
    choices = _literals(field.type)
    fix = f"choose one of {', '.join(map(repr, choices))}" if choices else "fix it"
    at_part = f" at {where}" if where else ""
    return ConfigError(
        f"{var}={_shown(value, Secret in _kinds(field.type))} is not valid: {what}{at_part}; "
        f"{fix} or unset it (default: {default!r})"
    )


def _literals(annotation: Any) -> list[Any]:
    """The values a ``Literal`` (possibly inside ``Annotated``/``| None``) allows."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _literals(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [v for a in get_args(annotation) for v in _literals(a)]
    return list(get_args(annotation)) if origin is Literal else []


# -- the settings the edge gateway reads -------------------------------------------------------


def upper(value: object) -> object:
    """Text in upper case (``sasl_ssl`` -> ``SASL_SSL``); anything else as it is."""
    return value.upper() if isinstance(value, str) else value


def plain_name(value: str) -> str:
    """``value`` when it can be one level of a topic name; ``ValueError`` otherwise."""
    bad = set(value) & set("+#/ \t\n\0")
    if not value or bad:
        msg = f"{value!r} must be a non-empty name without '+', '#', '/' or spaces"
        raise ValueError(msg)
    return value


class SettingsMixin:
    """The checks and broker look-ups shared by ``Settings`` (pydantic) and ``LeanSettings``.

    A plain class without fields, so both a pydantic model and a msgspec
    Struct can inherit it.
    """

    __slots__ = ()

    if TYPE_CHECKING:  # provided by the settings classes; not fields of this mixin
        mqtt_url: Any
        kafka_bootstrap: str | None
        mqtt_ca_file: Path | None
        mqtt_cert_file: Path | None
        mqtt_key_file: Path | None

    def check_tls_files(self) -> None:
        """``ValueError`` when MQTT TLS files are set but the MQTT URL is not ``mqtts://``."""
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


_NAME = Check(plain_name)
_UPPER = Before(upper)


class LeanSettings(SettingsMixin, msgspec.Struct, frozen=True, kw_only=True):
    """The ``IOTFLOW_*`` settings the edge flow and its connectors read, without pydantic.

    Fields, defaults and checks are those of ``iotflow.settings.Settings``
    (see there for what each does); read it with ``lean_settings()``.
    """

    mqtt_url: Secret | None = None
    kafka_bootstrap: str | None = None
    topic_prefix: Annotated[str, _NAME] = "iot"
    mqtt_base: Annotated[str, _NAME] = "iotflow"
    mqtt_topics: list[str] = msgspec.field(default_factory=list)
    source_mapping: dict[str, str] | None = None
    max_payload_bytes: Annotated[int, msgspec.Meta(gt=0)] = 256 * 1024
    max_future_skew_s: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    mqtt_idle_stop_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    mqtt_client_id: str = "iotflow-telemetry"
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    kafka_security_protocol: Annotated[
        Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] | None, _UPPER
    ] = None
    kafka_sasl_mechanism: Annotated[
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None, _UPPER
    ] = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: Secret | None = None
    kafka_ca_file: Path | None = None

    def __post_init__(self) -> None:
        self.check_tls_files()


def lean_settings(env_file: str | Path | None = ".env") -> LeanSettings | Settings:
    """The ``IOTFLOW_*`` settings, read without pydantic when they can be.

    Returns a ``LeanSettings`` when ``read_env`` accepts every variable it
    reads. When it refuses one (it is stricter in a few spellings, such as
    ``1_000`` for a number), pydantic decides: ``iotflow.settings`` is imported
    then and ``Settings(_env_file=env_file)`` returned, or its error raised.
    Either result offers the same fields and methods.

    Example::

        >>> type(lean_settings(None)).__name__
        'LeanSettings'
    """
    try:
        return read_env(LeanSettings, "IOTFLOW_", env_file)
    except ConfigError:
        from iotflow.settings import Settings  # pydantic, only when needed

        return Settings(_env_file=env_file)
