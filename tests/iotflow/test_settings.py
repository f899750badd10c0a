"""Settings: environment, validation, secrets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from iotflow.errors import ConfigError
from iotflow.settings import Settings, redact_url


def test_env_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLOW_MQTT_URL", "mqtt://u:topsecret@h:1884")
    monkeypatch.setenv("IOTFLOW_TOPIC_PREFIX", "plant7")
    monkeypatch.setenv("IOTFLOW_WINDOW_S", "10")
    s = Settings(_env_file=None)
    assert s.topic_prefix == "plant7" and s.window_s == 10
    assert s.resolved_mqtt_url() == "mqtt://u:topsecret@h:1884"
    assert "topsecret" not in repr(s) and "topsecret" not in str(s)
    assert s.mqtt_url_redacted == "mqtt://u:***@h:1884"


@pytest.mark.parametrize("prefix", ["", "a/b", "x+", "y#", "with space"])
def test_hostile_topic_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValidationError, match="topic_prefix"):
        Settings(_env_file=None, topic_prefix=prefix)


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValidationError, match="window_s"):
        Settings(_env_file=None, window_s=0)
    with pytest.raises(ValidationError, match="ingest"):
        Settings(_env_file=None, ingest="carrier-pigeon")


def test_missing_brokers_say_how_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("IOTFLOW_STATE_DIR", str(tmp_path))
    s = Settings(_env_file=None, mqtt_url=None, kafka_bootstrap=None)
    with pytest.raises(ConfigError, match="iotflow stack up"):
        s.require_mqtt_url()
    with pytest.raises(ConfigError, match="IOTFLOW_KAFKA_BOOTSTRAP"):
        s.require_kafka_bootstrap()


def test_env_round_trip_keeps_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(
        _env_file=None,
        mqtt_url="mqtt://h:1",
        kafka_bootstrap="k:9",
        mqtt_topics=["z2m/+"],
        source_mapping={"device_id": "topic[1]"},
    )
    env = s.to_env()
    assert env["IOTFLOW_SOURCE_MAPPING"] == '{"device_id": "topic[1]"}'
    assert env["IOTFLOW_MQTT_URL"] == "mqtt://h:1"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings(_env_file=None) == s


def test_redact_url_leaves_password_free_urls_alone() -> None:
    assert redact_url("mqtt://h:1883") == "mqtt://h:1883"
    assert redact_url("mqtts://me:pw@h") == "mqtts://me:***@h"


def test_dotenv_file_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# a gateway\n"
        'export IOTFLOW_TOPIC_PREFIX="plant9"\n'
        "IOTFLOW_WINDOW_S=15  # seconds\n"
        'IOTFLOW_MQTT_TOPICS=["z2m/+"]\n'
        "OTHER_TOOL=1\n"
    )
    monkeypatch.setenv("IOTFLOW_WINDOW_S", "20")
    s = Settings(_env_file=env)
    assert (s.topic_prefix, s.window_s, s.mqtt_topics) == ("plant9", 20, ["z2m/+"])
    assert Settings(_env_file=env, topic_prefix="given").topic_prefix == "given"


def test_a_list_setting_that_is_not_json_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IOTFLOW_MQTT_TOPICS", "z2m/+")
    with pytest.raises(
        ConfigError, match=r"IOTFLOW_MQTT_TOPICS is not valid JSON.*\[\"a\", \"b\"\]"
    ):
        Settings(_env_file=None)


def test_the_environment_helpers_are_iotflow_envs_own() -> None:
    # one copy, shared with the edge's pydantic-free reader
    import iotflow.env
    import iotflow.settings

    for name in ("read_dotenv", "redact_url", "stack_state_path"):
        assert getattr(iotflow.settings, name) is getattr(iotflow.env, name)
