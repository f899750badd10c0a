"""Source mappings: paths parse at load time and read topics and payloads as documented."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import connectors.mapping
from connectors.mapping import FieldPath, SourceMapping, is_missing


def test_docstring_examples_run() -> None:
    result = doctest.testmod(connectors.mapping)
    assert result.failed == 0
    assert result.attempted > 0


# --- parsing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "source", "steps"),
    [
        ("topic[0]", "topic", (0,)),
        ("topic[1]", "topic", (1,)),
        ("topic[-2]", "topic", (-2,)),
        ("payload", "payload", ()),
        ("payload.value", "payload", ("value",)),
        ("payload.a.b", "payload", ("a", "b")),
        ("payload.a.b[0]", "payload", ("a", "b", 0)),
        ("payload.a[0][12]", "payload", ("a", 0, 12)),
        ("payload._private", "payload", ("_private",)),
        ("payload.kebab-case.x2", "payload", ("kebab-case", "x2")),
    ],
)
def test_parse_valid_paths(text: str, source: str, steps: tuple[str | int, ...]) -> None:
    path = FieldPath.parse(text)
    assert path == FieldPath(source, steps, text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "neither topic[N] nor payload.<field>"),
        ("topic", "neither"),
        ("topic[]", "neither"),
        ("topic[x]", "neither"),
        ("topic[1]x", "neither"),
        ("topic[1]\n", "neither"),  # `$` used to accept a trailing newline
        ("topic[\u0661]", "neither"),  # Arabic-Indic digit one is not an index
        ("$.value", "neither"),
        ("payload[0]", "neither"),
        ("Payload.value", "neither"),
        ("payload.", "bad segment ''"),
        ("payload..a", "bad segment ''"),
        ("payload.a.", "bad segment ''"),
        ("payload.a[", "bad segment 'a['"),
        ("payload.a[-1]", "bad segment 'a[-1]'"),
        ("payload.a[b]", "bad segment 'a[b]'"),
        ("payload.1a", "bad segment '1a'"),
        ("payload.a b", "bad segment 'a b'"),
        ("payload.a\n", "bad segment 'a\\n'"),
        ("payload.a[\u0661]", "bad segment"),
    ],
)
def test_parse_invalid_paths_name_the_path(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        FieldPath.parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert fragment in message


@given(st.text(max_size=40))
def test_parse_raises_only_value_error(text: str) -> None:
    try:
        path = FieldPath.parse(text)
    except ValueError as exc:
        assert repr(text) in str(exc)
    else:
        assert path.text == text
        assert path.source in {"topic", "payload"}


_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,8}", fullmatch=True)
_segments = st.tuples(_names, st.lists(st.integers(0, 99), max_size=3))


@given(st.lists(_segments, min_size=1, max_size=5))
def test_payload_paths_round_trip(segments: list[tuple[str, list[int]]]) -> None:
    text = "payload." + ".".join(name + "".join(f"[{i}]" for i in idx) for name, idx in segments)
    expected: list[str | int] = []
    for name, idx in segments:
        expected.append(name)
        expected.extend(idx)
    path = FieldPath.parse(text)
    assert path == FieldPath("payload", tuple(expected), text)


# --- reading values --------------------------------------------------------


@given(st.lists(st.text(max_size=5), min_size=1, max_size=8), st.integers(-10, 10))
def test_topic_paths_read_a_level_or_nothing(levels: list[str], index: int) -> None:
    value = FieldPath.parse(f"topic[{index}]").get(levels, {})
    if -len(levels) <= index < len(levels):
        assert value == levels[index]
    else:
        assert is_missing(value)


def test_payload_paths_read_nested_values() -> None:
    payload = {"a": {"b": [7, {"c": None}]}, "value": 1.5}
    assert FieldPath.parse("payload.value").get([], payload) == 1.5
    assert FieldPath.parse("payload.a.b[0]").get([], payload) == 7
    assert FieldPath.parse("payload.a.b[1].c").get([], payload) is None  # present, null
    assert FieldPath.parse("payload").get([], payload) is payload


@pytest.mark.parametrize(
    "text",
    [
        "payload.missing",
        "payload.a.missing",
        "payload.a.b[2]",  # index past the end
        "payload.value.x",  # a field of a number
        "payload.a[0]",  # an index into an object
        "payload.a.b.c",  # a field of a list
    ],
)
def test_payload_paths_report_missing_not_errors(text: str) -> None:
    payload = {"a": {"b": [7, {"c": None}]}, "value": 1.5}
    assert is_missing(FieldPath.parse(text).get([], payload))


def test_payload_path_on_non_object_payload_is_missing() -> None:
    assert is_missing(FieldPath.parse("payload.a").get([], [1, 2]))
    assert is_missing(FieldPath.parse("payload.a").get([], "oops"))


# --- SourceMapping ---------------------------------------------------------


def test_default_mapping_is_the_flat_layout() -> None:
    mapping = SourceMapping()
    assert mapping.device_path == FieldPath("topic", (2,), "topic[2]")
    assert mapping.ts_path == FieldPath("payload", ("ts",), "payload.ts")
    assert mapping.metric_paths == {}


def test_zigbee2mqtt_mapping() -> None:
    mapping = SourceMapping.model_validate(
        {"device_id": "topic[1]", "temperature": "payload.temperature"}
    )
    assert mapping.device_path.get(["zigbee2mqtt", "living_room"], {}) == "living_room"
    assert mapping.metric_paths == {
        "temperature": FieldPath("payload", ("temperature",), "payload.temperature")
    }


def test_iot2mqtt_mapping() -> None:
    mapping = SourceMapping.model_validate(
        {"device_id": "topic[-2]", "ts": "payload.meta.ts", "brightness": "payload.value"}
    )
    levels = ["iot2mqtt", "v1", "instances", "hue", "devices", "lamp_3", "state"]
    assert mapping.device_path.get(levels, {}) == "lamp_3"
    assert mapping.ts_path.steps == ("meta", "ts")
    assert set(mapping.metric_paths) == {"brightness"}


def test_mapping_loads_from_json() -> None:
    mapping = SourceMapping.model_validate_json('{"device_id": "topic[1]", "t": "payload.a.b[0]"}')
    assert mapping.metric_paths["t"].steps == ("a", "b", 0)


def test_mapping_is_frozen() -> None:
    mapping = SourceMapping()
    with pytest.raises(ValidationError):
        mapping.device_id = "topic[1]"  # type: ignore[misc]


@pytest.mark.parametrize("field", ["device_id", "ts"])
@pytest.mark.parametrize("bad", ["topic[x]", "payload..a", "payload.a[b]", "value", "topic[1]\n"])
def test_bad_special_path_fails_at_load_naming_field_and_path(field: str, bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        SourceMapping.model_validate({field: bad})
    errors = info.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == (field,)
    message = str(info.value)
    assert field in message
    assert repr(bad) in message


@pytest.mark.parametrize("bad", ["payload..a", "payload.a[b]", "value", "topic[]", "payload.a\n"])
def test_bad_metric_path_fails_at_load_naming_metric_and_path(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        SourceMapping.model_validate({"device_id": "topic[1]", "temperature": bad})
    message = str(info.value)
    assert "metric 'temperature'" in message
    assert repr(bad) in message


@pytest.mark.parametrize("bad", [5, 2.5, None, True, ["payload.a"], {"path": "payload.a"}])
def test_metric_mapped_to_non_string_fails(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        SourceMapping.model_validate({"temperature": bad})
    message = str(info.value)
    assert "metric 'temperature'" in message
    assert "must be a string" in message
    assert repr(bad) in message


@pytest.mark.parametrize("bad", [42, None, ["topic[1]"]])
def test_device_id_mapped_to_non_string_fails(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        SourceMapping.model_validate({"device_id": bad})
    assert info.value.errors()[0]["loc"] == ("device_id",)
