"""Reading settings without pydantic: read_env, Secret, LeanSettings against Settings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from iotflow.env import LeanSettings, Secret, lean_settings, read_env
from iotflow.errors import ConfigError
from iotflow.settings import Settings

LEAN_FIELDS = [f.name for f in msgspec.structs.fields(LeanSettings)]
REPO = Path(__file__).resolve().parents[2]


class Demo(msgspec.Struct, frozen=True, kw_only=True):
    count: Annotated[int, msgspec.Meta(gt=0)] = 5
    rate: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    names: list[str] = msgspec.field(default_factory=list)
    token: Secret | None = None
    where: Path | None = None


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Exactly ``values`` as the IOTFLOW_* variables for the block (restored after)."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("IOTFLOW_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.upper().startswith("IOTFLOW_")]:
            del os.environ[name]
        os.environ.update(saved)


# -- read_env ---------------------------------------------------------------------------------


def test_keywords_win_over_the_environment_which_wins_over_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DEMO_COUNT=7\nDEMO_RATE=2.5\n")
    assert read_env(Demo, "DEMO_", env_file) == Demo(count=7, rate=2.5)
    monkeypatch.setenv("DEMO_COUNT", "8")
    assert read_env(Demo, "DEMO_", env_file) == Demo(count=8, rate=2.5)
    assert read_env(Demo, "DEMO_", env_file, count=9) == Demo(count=9, rate=2.5)
    assert read_env(Demo, "DEMO_", None) == Demo(count=8)
    monkeypatch.delenv("DEMO_COUNT")
    assert read_env(Demo, "DEMO_", tmp_path / "missing.env") == Demo()


def test_names_match_without_regard_to_case_and_unknown_ones_are_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("demo_Count", "3")
    monkeypatch.setenv("DEMO_NOT_A_FIELD", "whatever")
    assert read_env(Demo, "DEMO_", None, unknown_keyword=1) == Demo(count=3)


def test_lists_take_json_and_text_converts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_NAMES", '["a/+", "b"]')
    monkeypatch.setenv("DEMO_TOKEN", "s3cret")
    monkeypatch.setenv("DEMO_WHERE", "/etc/x.pem")
    got = read_env(Demo, "DEMO_", None)
    assert got.names == ["a/+", "b"]
    assert got.token == Secret("s3cret") and got.where == Path("/etc/x.pem")


def test_bad_json_says_what_envsettings_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLOW_MQTT_TOPICS", "z2m/+")
    with pytest.raises(ConfigError) as lean:
        read_env(LeanSettings, "IOTFLOW_", None)
    with pytest.raises(ConfigError) as pydantic:
        Settings(_env_file=None)
    assert str(lean.value) == str(pydantic.value)
    assert "IOTFLOW_MQTT_TOPICS is not valid JSON" in str(lean.value)
    assert """e.g. IOTFLOW_MQTT_TOPICS='["a", "b"]'""" in str(lean.value)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DEMO_COUNT", "ten", r"DEMO_COUNT='ten' is not valid: Expected `int`"),
        ("DEMO_COUNT", "1e3", r"DEMO_COUNT='1e3' is not valid: Expected `int`"),
        ("DEMO_COUNT", "-4", r"DEMO_COUNT='-4' is not valid: Expected `int` >= 1; "),
        ("DEMO_COUNT", "0", r"Expected `int` >= 1; fix it or unset it \(default: 5\)"),
        ("DEMO_RATE", "nan", r"DEMO_RATE='nan' is not valid: Expected `float` > 0.0"),
        ("DEMO_RATE", "-inf", r"DEMO_RATE='-inf' is not valid: Expected `float` > 0.0"),
        ("DEMO_NAMES", '["a", 1]', r"DEMO_NAMES=\['a', 1\] is not valid: .*`int` at \[1\]"),
    ],
)
def test_a_bad_value_names_the_variable_the_problem_and_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        read_env(Demo, "DEMO_", None)


def test_infinity_is_a_positive_float_as_for_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_RATE", "inf")
    assert read_env(Demo, "DEMO_", None).rate == math.inf
    monkeypatch.setenv("IOTFLOW_MQTT_IDLE_STOP_S", "Infinity")
    assert read_env(LeanSettings, "IOTFLOW_", None).mqtt_idle_stop_s == math.inf
    assert Settings(_env_file=None).mqtt_idle_stop_s == math.inf


def test_a_bad_choice_lists_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLOW_KAFKA_SECURITY_PROTOCOL", "tls")
    with pytest.raises(
        ConfigError,
        match=r"IOTFLOW_KAFKA_SECURITY_PROTOCOL='tls' is not valid: Invalid enum value 'TLS'; "
        r"choose one of 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT', 'SASL_SSL'",
    ):
        read_env(LeanSettings, "IOTFLOW_", None)
    monkeypatch.setenv("IOTFLOW_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")  # upper-cased, as pydantic
    assert read_env(LeanSettings, "IOTFLOW_", None).kafka_security_protocol == "SASL_SSL"


@pytest.mark.parametrize("variable", ["IOTFLOW_MQTT_IDLE_STOP_S", "IOTFLOW_KAFKA_SASL_MECHANISM"])
def test_null_text_is_not_none_as_for_pydantic(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # msgspec's lenient mode alone would read it as None
    monkeypatch.setenv(variable, "Null")
    with pytest.raises(ConfigError, match=f"^{variable}='Null' is not valid: text 'null'"):
        read_env(LeanSettings, "IOTFLOW_", None)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)
    monkeypatch.setenv("IOTFLOW_MQTT_CA_FILE", "null")  # text fields keep it
    monkeypatch.delenv(variable)
    assert read_env(LeanSettings, "IOTFLOW_", None).mqtt_ca_file == Path("null")


def test_a_keyword_is_named_by_its_field() -> None:
    with pytest.raises(ConfigError, match=r"^count=0 is not valid"):
        read_env(Demo, "DEMO_", None, count=0)


def test_the_shared_checks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLOW_TOPIC_PREFIX", "a/b")
    with pytest.raises(ConfigError, match=r"IOTFLOW_TOPIC_PREFIX='a/b' is not valid: 'a/b' must"):
        read_env(LeanSettings, "IOTFLOW_", None)
    monkeypatch.delenv("IOTFLOW_TOPIC_PREFIX")
    monkeypatch.setenv("IOTFLOW_MQTT_URL", "mqtt://u:hunter2@h:1883")
    monkeypatch.setenv("IOTFLOW_MQTT_CA_FILE", "/etc/ca.pem")
    with pytest.raises(ConfigError, match="IOTFLOW_MQTT_CA_FILE set but") as refused:
        read_env(LeanSettings, "IOTFLOW_", None)
    assert "hunter2" not in str(refused.value) and "u:***@h:1883" in str(refused.value)


# -- secrets and hostile values ---------------------------------------------------------------


def test_a_secret_is_masked_everywhere() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    assert s.get_secret_value() == "hunter2" and s == Secret("hunter2") != Secret("other")
    lean = read_env(LeanSettings, "IOTFLOW_", None, mqtt_url="mqtt://u:hunter2@h:1")
    assert "hunter2" not in repr(lean)
    assert lean.mqtt_url_redacted == "mqtt://u:***@h:1"
    assert lean.require_mqtt_url() == "mqtt://u:hunter2@h:1"


def test_a_refused_secret_is_not_shown() -> None:
    with pytest.raises(ConfigError, match=r"^kafka_sasl_password='\*\*\*' is not valid") as e:
        read_env(LeanSettings, "IOTFLOW_", None, kafka_sasl_password=["hunter2"])
    assert "hunter2" not in str(e.value)


def test_huge_numbers_are_refused_as_pydantic_refuses_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limit = "9" * sys.get_int_max_str_digits()
    monkeypatch.setenv("IOTFLOW_MAX_PAYLOAD_BYTES", limit)
    assert read_env(LeanSettings, "IOTFLOW_", None).max_payload_bytes == int(limit)
    assert Settings(_env_file=None).max_payload_bytes == int(limit)
    monkeypatch.setenv("IOTFLOW_MAX_PAYLOAD_BYTES", limit + "9")
    with pytest.raises(ConfigError) as refused:
        read_env(LeanSettings, "IOTFLOW_", None)
    # the message names the variable and stays short
    assert str(refused.value).startswith("IOTFLOW_MAX_PAYLOAD_BYTES='999")
    assert len(str(refused.value)) < 300
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


@pytest.mark.parametrize("value", ["a\nb", "\x1b[31mred", "x" * 10_000, "\u202eevil"])
def test_hostile_values_are_escaped_and_shortened(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("IOTFLOW_MAX_FUTURE_SKEW_S", value)
    with pytest.raises(ConfigError) as refused:
        read_env(LeanSettings, "IOTFLOW_", None)
    message = str(refused.value)
    assert message.isprintable() and len(message) < 300
    assert message.startswith("IOTFLOW_MAX_FUTURE_SKEW_S=")


# -- LeanSettings agrees with Settings ---------------------------------------------------------

_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)


def _json(values: st.SearchStrategy[Any]) -> st.SearchStrategy[str]:
    return values.map(json.dumps)


_NUMBER_TEXT = st.one_of(
    st.sampled_from(
        [
            *("0", "-0", "+5", "007", "1e3", "1.0e1", "10.0", "10.000000000000001", " 10"),
            *("1_000", "0x10", "\u0663", "nan", "-nan", "inf", "+inf", "-inf", "Infinity"),
            *("1e400", "1e-400", "", "null", "Null", "None", "true", "9" * 4301, ".5", "5."),
            "1E5",
        ]
    ),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    _TEXT,
)
_NAME_TEXT = st.one_of(st.sampled_from(["iot", "plant-7", "a/b", "x+", "y#", " ", ""]), _TEXT)
_CHOICE_TEXT = st.one_of(
    st.sampled_from(["SSL", "sasl_ssl", "Sasl_Plaintext", "PLAINTEXT", "tls", ""]),
    st.sampled_from(["PLAIN", "scram-sha-256", "SCRAM-SHA-512", "scram", "ß", "null", "NULL"]),
    _TEXT,
)
_URL_TEXT = st.one_of(
    st.sampled_from(["mqtt://u:pw@h:1883", "mqtts://h:8883", "mqtt://h", ""]), _TEXT
)
_FILE_TEXT = st.one_of(st.sampled_from(["/etc/ca.pem", "certs/c.pem", ""]), _TEXT)
_LIST_TEXT = st.one_of(
    _json(st.lists(_TEXT, max_size=3)),
    st.sampled_from(['["a", 1]', "null", '"a/+"', "a/+", '{"a": "b"}', "[true]", ""]),
)
_MAPPING_TEXT = st.one_of(
    _json(st.dictionaries(_TEXT, _TEXT, max_size=3)),
    st.sampled_from(['{"device_id": 5}', "null", "[]", "{bad", '{"a": null}']),
)
_FIELD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "mqtt_url": _URL_TEXT,
    "kafka_bootstrap": _TEXT,
    "topic_prefix": _NAME_TEXT,
    "mqtt_base": _NAME_TEXT,
    "mqtt_topics": _LIST_TEXT,
    "source_mapping": _MAPPING_TEXT,
    "max_payload_bytes": _NUMBER_TEXT,
    "max_future_skew_s": _NUMBER_TEXT,
    "mqtt_idle_stop_s": _NUMBER_TEXT,
    "mqtt_client_id": _TEXT,
    "mqtt_ca_file": _FILE_TEXT,
    "mqtt_cert_file": _FILE_TEXT,
    "mqtt_key_file": _FILE_TEXT,
    "kafka_security_protocol": _CHOICE_TEXT,
    "kafka_sasl_mechanism": _CHOICE_TEXT,
    "kafka_sasl_username": _TEXT,
    "kafka_sasl_password": _TEXT,
    "kafka_ca_file": _FILE_TEXT,
}


def test_the_strategies_cover_every_lean_field() -> None:
    assert sorted(_FIELD_VALUES) == sorted(LEAN_FIELDS)


@st.composite
def _environments(draw: st.DrawFn) -> dict[str, str]:
    names = draw(st.lists(st.sampled_from(LEAN_FIELDS), unique=True, max_size=6))
    env = {}
    for name in names:
        var = f"IOTFLOW_{name.upper()}"
        env[var.lower() if draw(st.booleans()) else var] = draw(_FIELD_VALUES[name])
    return env


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, Secret | SecretStr) else value


def _pydantic_verdict() -> Settings | None:
    try:
        return Settings(_env_file=None)
    except ValueError:  # ValidationError or ConfigError
        return None


@settings(max_examples=400, deadline=None)
@given(_environments())
def test_what_the_lean_read_accepts_pydantic_accepts_alike(env: dict[str, str]) -> None:
    with environment(env):
        try:
            lean: LeanSettings | None = read_env(LeanSettings, "IOTFLOW_", None)
        except ConfigError:
            lean = None
        pydantic = _pydantic_verdict()
        if lean is not None:
            assert pydantic is not None, f"pydantic refuses what the lean read took: {env}"
            for name in LEAN_FIELDS:
                assert _plain(getattr(lean, name)) == _plain(getattr(pydantic, name)), name
        # lean_settings() ends with pydantic's verdict
        if pydantic is None:
            with pytest.raises(ValueError):
                lean_settings(None)
        else:
            chosen = lean_settings(None)
            assert isinstance(chosen, LeanSettings if lean is not None else Settings)
            for name in LEAN_FIELDS:
                assert _plain(getattr(chosen, name)) == _plain(getattr(pydantic, name)), name


def test_lean_settings_hands_what_it_refuses_to_pydantic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLOW_MAX_PAYLOAD_BYTES", "1_000")  # pydantic's spelling only
    chosen = lean_settings(None)
    assert isinstance(chosen, Settings) and chosen.max_payload_bytes == 1000
    monkeypatch.setenv("IOTFLOW_MAX_PAYLOAD_BYTES", "lots")
    with pytest.raises(ValidationError, match="max_payload_bytes"):
        lean_settings(None)


def test_the_lean_read_shares_the_stack_lookup(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IOTFLOW_STATE_DIR", str(tmp_path))
    (tmp_path / "stack.json").write_text(
        json.dumps({"mqtt_url": "mqtt://s:pw@stack:1", "kafka_bootstrap": "stack:9"})
    )
    for s in (read_env(LeanSettings, "IOTFLOW_", None), Settings(_env_file=None)):
        assert s.require_mqtt_url() == "mqtt://s:pw@stack:1"
        assert s.require_kafka_bootstrap() == "stack:9"
        assert s.mqtt_url_redacted == "mqtt://s:***@stack:1"


# -- the edge's imports load no pydantic -------------------------------------------------------


def test_reading_edge_settings_loads_no_pydantic(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import iotflow.env, iotflow.edge_settings, connectors.mqtt, connectors.kafka_client\n"
        "iotflow.env.lean_settings()\n"
        "iotflow.edge_settings.EdgeSettings.from_env()\n"
        "connectors.mqtt.MqttTls.from_settings()\n"
        "connectors.kafka_client.security_config()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')"
        " or m == 'iotflow.settings'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("IOTFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert done.stdout.strip() == "[]"
