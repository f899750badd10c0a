from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotflow.durations import label, parse_duration
from iotflow.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("30s", timedelta(seconds=30)),
        ("1h30m", timedelta(minutes=90)),
        ("2d", timedelta(days=2)),
        ("-5m", timedelta(minutes=-5)),
        (90, timedelta(seconds=90)),
    ],
)
def test_parses_the_documented_forms(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("value", ["9999999999d", 1e30, -1e30, "1e400s"])
def test_absurdly_long_durations_are_a_config_error_not_an_overflow(value: object) -> None:
    with pytest.raises(ConfigError, match="too long|not understood"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["", "5 parsecs", "m5", float("nan"), float("inf"), None, True, [1]])
def test_nonsense_is_a_config_error_naming_the_value(value: object) -> None:
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(value)


@given(st.integers(min_value=1, max_value=10**12))
def test_label_round_trips(ms: int) -> None:
    duration = timedelta(milliseconds=ms)
    assert parse_duration(label(duration)) == duration
