"""The monitoring declaration: the README's example loads, bad ones name the field."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from iotflow.errors import ConfigError
from operators.monitoring import DEFAULT, Monitoring, to_wide

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_example_loads() -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(aggregation:.*?)```", text, re.S)
    assert block is not None
    m = Monitoring.from_yaml(block.group(1))
    assert [r.name for r in m.reading_rules] == ["zscore:temperature"]
    assert len(m.peer_rules) == 1
    assert m.patterns is not None and [p.name for p in m.patterns.patterns] == [
        "overheating",
        "zone_surge",
    ]
    assert m.aggregation.group_by == [["device"], ["zone"], ["building", "floor"]]


def test_the_default_deployment_is_valid() -> None:
    assert DEFAULT.aggregation.window.kind == "tumbling"
    assert DEFAULT.reading_rules and DEFAULT.patterns is not None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "aggregation: {window: {kind: tumbling, length: soon}}",
            "aggregation.window.tumbling.length",
        ),
        ("aggregation: {window: {kind: tumbling, length: 1m}}\nextra: 1", "extra"),
        ("aggregation: [", "not valid YAML"),
        ("anomalies: []", "aggregation"),
        ("aggregation: {window: {kind: tumbling, length: 1m}}\nshards: 0", "shards"),
    ],
)
def test_bad_declarations_name_the_field(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        Monitoring.from_yaml(text)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read monitoring file"):
        Monitoring.load(tmp_path / "nope.yaml")


def test_to_wide_makes_metric_stat_columns() -> None:
    results = pl.DataFrame(
        {
            "group_by": ["device", "device"],
            "key": ["d", "d"],
            "metric": ["t", "h"],
            "window_start_ms": [0, 0],
            "window_end_ms": [60_000, 60_000],
            "count": [2, 1],
            "avg": [1.5, 40.0],
        }
    )
    wide = to_wide(results)
    assert wide.columns == [
        "group_by",
        "key",
        "window_start_ms",
        "window_end_ms",
        "t_count",
        "t_avg",
        "h_count",
        "h_avg",
    ]
    assert wide.row(0) == ("device", "d", 0, 60_000, 2, 1.5, 1, 40.0)
