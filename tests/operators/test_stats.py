"""operators.stats: the one-pass statistics of several metrics agree with one metric at a time."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.stats import STATISTICS, StatSpec, exact, exact_columns

SPEC = StatSpec.parse([*STATISTICS, "median", "p90", "p99"])

rows = st.lists(
    st.tuples(
        st.sampled_from(["d1", "d2", "d3"]),
        st.integers(0, 10_000),
        st.floats(-1e6, 1e6, allow_nan=False),
        st.floats(-1e3, 1e3, allow_nan=False),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None)
@given(rows)
def test_exact_columns_equals_exact_of_each_metric(data: list[tuple]) -> None:
    frame = pl.DataFrame(data, schema=["device_id", "ts_ms", "a", "b"], orient="row")
    together = exact_columns(frame, ["device_id"], SPEC, ["a", "b"])
    assert list(together) == ["a", "b"]
    for metric, got in together.items():
        one = frame.select("device_id", "ts_ms", pl.col(metric).alias("value"))
        want = exact(one, ["device_id"], SPEC)
        assert got.columns == want.columns
        assert got.sort("device_id").equals(want.sort("device_id"))
