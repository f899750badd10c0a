"""The columnar decoder gives exactly what the per-message decoder gives."""

from __future__ import annotations

import math

import msgspec
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.decode import TelemetryDecoder
from connectors.mapping import SourceMapping
from iotflow.events import DeviceMessage
from iotflow.frame import to_readings

NOW = 1_767_268_800_000


def columnar() -> TelemetryDecoder:
    """A decoder that takes the columnar path for batches of any size."""
    return TelemetryDecoder(columnar_min=1)


def msg(device: str, payload: bytes, received: int = NOW) -> DeviceMessage:
    return DeviceMessage(f"iotflow/devices/{device}/telemetry", payload, received)


def same_as_exact(decoder: TelemetryDecoder, messages: list[DeviceMessage]) -> None:
    """decode_frame == decode: the same readings in the same order, the same dead letters."""
    framed = decoder.decode_frame(messages)
    exact = decoder.decode(messages)
    assert to_readings(framed.ok) == exact.ok
    assert sorted(d.reason for d in framed.dead) == sorted(d.reason for d in exact.dead)


def test_clean_batch_takes_the_columnar_path_and_keeps_order() -> None:
    messages = [msg(f"d{i}", b'{"ts": %d, "t": %d.5, "h": 1}' % (NOW + i, i)) for i in range(50)]
    out = columnar().decode_frame(messages)
    assert out.dead == []
    assert out.ok.columns == ["device_id", "ts_ms", "t", "h"]
    assert out.ok.schema["t"] == pl.Float64 and out.ok.schema["ts_ms"] == pl.Int64
    assert out.ok.get_column("device_id").to_list() == [f"d{i}" for i in range(50)]
    assert out.ok.get_column("t").to_list() == [i + 0.5 for i in range(50)]


def test_bad_messages_become_dead_letters_and_valid_neighbours_survive() -> None:
    messages = [
        msg("a", b'{"ts": 1767268800000, "t": 1}'),
        msg("b", b"{not json}"),
        msg("c", b'{"ts": 1767268800, "t": 1}'),  # seconds, not ms
        msg("d", b'{"ts": 1867268800000, "t": 1}'),  # far future
        msg("e", b'{"ts": 1767268800000, "t": 1e400}'),  # not finite
        msg("f", b'{"ts": 1767268800000, "label": "x"}'),  # no metric
        msg("g+", b'{"ts": 1767268800000, "t": 1}'),  # hostile device id
        msg("h", b'{"ts": 1767268800000, "ts_ms": 3, "t": 1}'),  # reserved name
        msg("i", b'[{"ts": 1767268800000, "t": 2}, {"ts": "x", "t": 3}]'),
        msg("j", b'{"ts": 1767268800000, "t": 4}'),
    ]
    out = columnar().decode_frame(messages)
    assert out.ok.get_column("device_id").to_list() == ["a", "i", "j"]
    assert out.ok.get_column("t").to_list() == [1.0, 2.0, 4.0]
    reasons = " | ".join(d.reason for d in out.dead)
    assert len(out.dead) == 8, reasons
    for part in ("invalid JSON", "before 2000", "in the future", "reserved", "item 1"):
        assert part in reasons
    assert {d.topic.split("/")[2] for d in out.dead} == {"b", "c", "d", "e", "f", "g+", "h", "i"}


def test_missing_or_null_ts_takes_the_receive_time() -> None:
    out = columnar().decode_frame(
        [msg("a", b'{"t": 1}', NOW + 7), msg("b", b'{"ts": null, "t": 2}', NOW + 9)]
    )
    assert out.ok.get_column("ts_ms").to_list() == [NOW + 7, NOW + 9]


def test_a_string_field_sends_the_batch_down_the_exact_path_with_the_same_result() -> None:
    messages = [msg("a", b'{"ts": 1767268800000, "t": 1, "s": "ok"}'), msg("b", b'{"t": "hot"}')]
    same_as_exact(columnar(), messages)


def test_a_source_mapping_uses_the_exact_path() -> None:
    decoder = TelemetryDecoder(
        SourceMapping.model_validate({"temperature": "payload.v"}), columnar_min=1
    )
    out = decoder.decode_frame([msg("a", b'{"ts": 1767268800000, "v": 3}')])
    assert out.ok.rows() == [("a", NOW, 3.0)]


def test_oversized_payload_is_rejected_with_its_size() -> None:
    big = b'{"t": 1, "pad": "' + b"x" * 2000 + b'"}'
    out = TelemetryDecoder(max_payload_bytes=1000, columnar_min=1).decode_frame([msg("a", big)])
    assert out.ok.height == 0
    assert "bytes; the limit is 1000" in out.dead[0].reason


def test_empty_batch() -> None:
    out = columnar().decode_frame([])
    assert out.ok.height == 0 and out.dead == []


_values = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.none(),
    st.sampled_from(["on", "", "12"]),
)
_objects = st.dictionaries(st.sampled_from(["t", "h", "p", "ts", "state"]), _values, max_size=4)
_payloads = st.one_of(
    _objects.map(msgspec.json.encode),
    st.lists(_objects, min_size=1, max_size=3).map(msgspec.json.encode),
    st.sampled_from(
        [b"{", b"[]", b"null", b"{}", b'{"t": 1}\n', b'{"ts": "2026-01-01T00:00:00Z", "t": 1}']
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c+", "d"]), _payloads, st.integers(0, 10)),
        max_size=12,
    )
)
def test_columnar_and_exact_decoders_agree_on_any_batch(
    batch: list[tuple[str, bytes, int]],
) -> None:
    messages = [msg(device, payload, NOW + skew) for device, payload, skew in batch]
    framed = columnar().decode_frame(messages)
    exact = columnar().decode(messages)
    expected = [r for r in exact.ok if not {"device_id", "ts_ms"} & set(r.metrics)]
    got = to_readings(framed.ok)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert (a.device_id, a.ts_ms) == (b.device_id, b.ts_ms)
        assert a.metrics.keys() == b.metrics.keys()
        assert all(math.isclose(a.metrics[k], b.metrics[k], rel_tol=1e-12) for k in a.metrics)
    assert len(framed.dead) == len(exact.dead)


def test_a_field_first_seen_after_the_inferred_rows_is_kept() -> None:
    # polars infers the schema from the first rows; a later new field must not vanish
    messages = [msg("a", b'{"ts": %d, "t": 1}' % (NOW + i)) for i in range(300)]
    messages.append(msg("b", b'{"ts": 1767268800000, "t": 2, "late": 7}'))
    messages.append(msg("c", b'{"ts": 1767268800000, "t": 2.5, "n": null}'))
    out = columnar().decode_frame(messages)
    assert out.ok.height == 302
    assert out.ok.get_column("late").to_list()[-2:] == [7.0, None]
    same_as_exact(columnar(), messages)


def test_integer_metric_turning_float_later_is_exact() -> None:
    messages = [msg("a", b'{"ts": %d, "n": 3}' % (NOW + i)) for i in range(200)]
    messages.append(msg("a", b'{"ts": 1767268800000, "n": 3.25}'))
    same_as_exact(columnar(), messages)
    assert columnar().decode_frame(messages).ok.get_column("n").to_list()[-1] == 3.25


def test_stray_closing_brace_or_key_with_braces_decodes_like_the_exact_path() -> None:
    # the columnar path counts "{" only; a stray "}" must still be invalid JSON there
    messages = [msg(f"d{i}", b'{"ts": %d, "t": 1}' % (NOW + i)) for i in range(150)]
    messages += [
        msg("x", b'{"ts": 1767268800000, "t": 2}}'),
        msg("y", b'{"ts": 1767268800000, "a}": 3}'),
        msg("z", b'{"ts": 1767268800000, "b{": 4}'),
    ]
    same_as_exact(columnar(), messages)
    out = columnar().decode_frame(messages)
    assert [d.topic.split("/")[2] for d in out.dead] == ["x"]
    assert out.ok.get_column("a}").to_list()[-2:] == [3.0, None]


def test_a_late_new_field_named_like_null_is_kept() -> None:
    # "null" inside a key name must not pass for a null value and hide the dropped field
    messages = [msg(f"d{i}", b'{"ts": %d, "t": 1}' % (NOW + i)) for i in range(150)]
    messages.append(msg("x", b'{"ts": 1767268800000, "t": 1, "nullx": 5}'))
    messages.append(msg("y", b'{"ts": 1767268800000, "t": null, "h": 2}'))
    same_as_exact(columnar(), messages)
    assert columnar().decode_frame(messages).ok.get_column("nullx").to_list()[-2:] == [
        5.0,
        None,
    ]


def test_topics_without_a_valid_device_level_are_dead_letters_in_every_batch() -> None:
    decoder = columnar()
    good = msg("a", b'{"ts": 1767268800000, "t": 1}')
    short = DeviceMessage("iotflow", b'{"ts": 1767268800000, "t": 2}', NOW)
    hostile = msg("b#", b'{"ts": 1767268800000, "t": 3}')
    for _ in range(2):  # the second batch meets the topics already resolved
        out = decoder.decode_frame([good, short, hostile, good])
        assert out.ok.get_column("t").to_list() == [1.0, 1.0]
        assert [d.topic for d in out.dead] == ["iotflow", hostile.topic]
        same_as_exact(decoder, [good, short, hostile, good])


def test_small_batches_decode_one_by_one_with_the_same_result() -> None:
    messages = [msg(f"d{i}", b'{"ts": %d, "t": %d.5, "h": 1}' % (NOW + i, i)) for i in range(300)]
    messages[7] = msg("bad", b"{not json}")
    default = TelemetryDecoder()
    assert default.columnar_min == 200
    for size in (1, 10, 199, 200, 300):
        batch = messages[:size]
        same_as_exact(default, batch)
        assert default.decode_frame(batch).ok.equals(columnar().decode_frame(batch).ok)


def test_the_topic_cache_is_bounded_and_starts_over_without_changing_results(
    monkeypatch,
) -> None:
    import connectors.decode

    monkeypatch.setattr(connectors.decode, "_KNOWN_TOPICS_MAX", 3)
    decoder = columnar()
    for round_ in range(3):
        batch = [msg(f"d{i}", b'{"ts": %d, "t": %d}' % (NOW + i, i)) for i in range(5)]
        batch.append(msg("b#", b'{"t": 1}'))
        out = decoder.decode_frame(batch)
        assert out.ok.get_column("device_id").to_list() == [f"d{i}" for i in range(5)], round_
        assert len(out.dead) == 1
        same_as_exact(decoder, batch)
