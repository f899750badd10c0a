"""Columnar reading batches, the hot-path currency between operators.

A *reading frame* is a ``polars.DataFrame`` with a ``device_id`` (Utf8)
column, a ``ts_ms`` (Int64, epoch milliseconds, the device's timestamp)
column, and one Float64 column per metric. A reading that does not carry a
metric has a null there. Operators take and return frames a batch at a time,
so per-event Python work stays off the hot path (DESIGN.md principle 2).

Example::

    >>> frame = from_readings([Reading("d1", 1000, {"t": 2.0}), Reading("d2", 2000, {"h": 5.0})])
    >>> frame.columns
    ['device_id', 'ts_ms', 't', 'h']
    >>> metric_columns(frame)
    ['t', 'h']
    >>> to_readings(frame) == [Reading("d1", 1000, {"t": 2.0}), Reading("d2", 2000, {"h": 5.0})]
    True
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from iotflow.events import Reading

__all__ = ["DEVICE", "TS", "empty_frame", "from_readings", "metric_columns", "to_readings"]

DEVICE = "device_id"
TS = "ts_ms"


def empty_frame(metrics: Iterable[str] = ()) -> pl.DataFrame:
    """A frame with no rows and the given metric columns."""
    schema: dict[str, pl.DataType] = {DEVICE: pl.Utf8(), TS: pl.Int64()}
    schema.update({name: pl.Float64() for name in metrics})
    return pl.DataFrame(schema=schema)


def from_readings(readings: Iterable[Reading]) -> pl.DataFrame:
    """Readings -> a frame; metric columns appear in first-seen order."""
    devices: list[str] = []
    stamps: list[int] = []
    columns: dict[str, list[float | None]] = {}
    for n, reading in enumerate(readings):
        devices.append(reading.device_id)
        stamps.append(reading.ts_ms)
        for name, value in reading.metrics.items():
            column = columns.get(name)
            if column is None:
                column = columns[name] = [None] * n
            column.append(float(value))
        for column in columns.values():
            if len(column) <= n:
                column.append(None)
    data: dict[str, pl.Series] = {
        DEVICE: pl.Series(DEVICE, devices, dtype=pl.Utf8),
        TS: pl.Series(TS, stamps, dtype=pl.Int64),
    }
    for name, values in columns.items():
        data[name] = pl.Series(name, values, dtype=pl.Float64)
    return pl.DataFrame(data)


def metric_columns(frame: pl.DataFrame) -> list[str]:
    """The metric column names of a reading frame."""
    return [name for name in frame.columns if name not in (DEVICE, TS)]


def to_readings(frame: pl.DataFrame) -> list[Reading]:
    """A frame -> readings (nulls left out of each reading's metrics)."""
    metrics = metric_columns(frame)
    out: list[Reading] = []
    for row in frame.iter_rows(named=True):
        values = {name: row[name] for name in metrics if row[name] is not None}
        out.append(Reading(row[DEVICE], row[TS], values))
    return out
