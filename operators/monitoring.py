"""A monitoring deployment as data: windows, anomaly rules and CEP patterns over one telemetry stream.

``Monitoring`` composes the operator declarations (``Aggregation``, the rules
of ``operators.anomaly``, a ``PatternSet``) and device dimensions they group
by (``dimensions``: added to, or overriding, the device registry's metadata,
which the monitoring flow reads). It loads from a dict, JSON or YAML; a wrong declaration fails at
load time naming the field. ``DEFAULT`` is the embedded deployment the
``monitoring`` flow runs without a file.

Example::

    >>> m = Monitoring.from_yaml('''
    ... aggregation: {window: {kind: tumbling, length: 1m}, stats: [avg, p95], group_by: [[device], [zone]]}
    ... anomalies: [{kind: zscore, metric: temperature, window: 20, k: 4}]
    ... patterns: {patterns: [{name: hot, kind: threshold, input: windows, condition: temperature_avg > 30, times: 3}]}
    ... dimensions: {t1: {zone: z1}}
    ... ''')
    >>> m.aggregation.window.length, [r.name for r in m.reading_rules], m.patterns.patterns[0].name
    (datetime.timedelta(seconds=60), ['zscore:temperature'], 'hot')
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from iotflow.declarations import load_file, parse_text, validate
from iotflow.durations import Duration
from operators.aggregation import Aggregation, to_wide
from operators.anomaly import EwmaRule, MadRule, PeerRule, Rule, ZScoreRule
from operators.cep_patterns import PatternSet

__all__ = ["DEFAULT", "Monitoring", "to_wide"]


class Monitoring(BaseModel):
    """What the monitoring flow computes and detects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    aggregation: Aggregation
    anomalies: list[Rule] = Field(default_factory=list)
    patterns: PatternSet | None = None
    dimensions: dict[str, dict[str, str]] = Field(default_factory=dict)
    shards: int = Field(8, ge=1)
    """Keys each stateful step spreads its devices (or groups) over: the unit Bytewax
    hands to workers, so at least the number of workers. Every shard costs a fixed
    ~1 ms per batch, which dominates at low rates (small batches): one worker is
    fastest, with the lowest latency, at ``shards: 1``. Changing it needs a fresh
    recovery store (a device's state stays with its old shard)."""
    ingest_linger: Duration = timedelta(0)
    """How long MQTT input may wait for a batch to gather (``MqttSource.linger``):
    each batch costs the flow a fixed ~3.5 ms of CPU, so at high rates a few tens of
    milliseconds here (``20ms``) cut the flow's CPU by half or more, at that much
    extra latency per reading. 0 (the default) hands over whatever waits at once."""

    @field_validator("ingest_linger")
    @classmethod
    def _linger(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError(
                f"ingest_linger {value.total_seconds()}s must not be negative (e.g. 20ms, or 0)"
            )
        return value

    @property
    def reading_rules(self) -> list[ZScoreRule | EwmaRule | MadRule]:
        """Rules scored on each reading against the device's own baseline."""
        return [r for r in self.anomalies if not isinstance(r, PeerRule)]

    @property
    def peer_rules(self) -> list[PeerRule]:
        """Rules comparing a device's window results with its peers'."""
        return [r for r in self.anomalies if isinstance(r, PeerRule)]

    @classmethod
    def from_dict(cls, data: Any) -> Monitoring:
        return validate(cls, data, "monitoring")

    @classmethod
    def from_yaml(cls, text: str) -> Monitoring:
        return cls.from_dict(parse_text(text, "yaml", "monitoring"))

    @classmethod
    def load(cls, path: Path | str) -> Monitoring:
        """From a ``.yaml``/``.yml`` or ``.json`` file."""
        return cls.from_dict(load_file(path, "monitoring"))


DEFAULT = Monitoring.from_yaml(
    """
aggregation:
  window: {kind: tumbling, length: 1m}
  allowed_lateness: 5s
  stats: [avg, min, max, p95, device_count]
  group_by: [[device], [zone]]
anomalies:
  - {kind: zscore, metric: temperature, window: 30, k: 4.0}
patterns:
  # window results of different shards close at different times: more than a window
  allowed_lateness: 2m
  patterns:
    - name: overheating
      kind: threshold
      input: windows
      condition: temperature_avg > 30
      times: 3
    - name: temperature_rising_fast
      kind: rate
      input: readings
      value: temperature
      exceeds: 2
      per: 1m
"""
)
