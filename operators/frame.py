"""Re-exports ``iotflow.frame`` (the reading frame is shared vocabulary)."""

from iotflow.frame import DEVICE, TS, empty_frame, from_readings, metric_columns, to_readings

__all__ = ["DEVICE", "TS", "empty_frame", "from_readings", "metric_columns", "to_readings"]
