"""The edge gateway's IOTFLOW_EDGE_* settings, read without pydantic."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from iotflow.edge_settings import EdgeSettings
from iotflow.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_edge_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.upper().startswith("IOTFLOW_EDGE_")]:
        monkeypatch.delenv(name)


def test_the_defaults() -> None:
    edge = EdgeSettings.from_env(None)
    assert edge == EdgeSettings()
    assert (edge.gateway_id, edge.buffer, edge.durability) == (
        "gw1",
        Path(".iotflow/edge-buffer.db"),
        "FULL",
    )
    assert (edge.checkpoint_ms, edge.checkpoint_messages, edge.batch_size) == (100, 800, 1000)
    assert edge.definitions is True and edge.backfill_per_s is None and edge.idle_stop_s is None


def test_good_values_from_the_environment_the_file_and_keywords(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "IOTFLOW_EDGE_GATEWAY_ID=kitchen-gw\n"
        "IOTFLOW_EDGE_WORKFLOW=/etc/iotflow/workflow.json\n"
        "IOTFLOW_EDGE_DURABILITY=NORMAL\n"
        "IOTFLOW_EDGE_BACKFILL_PER_S=400\n"
    )
    monkeypatch.setenv("IOTFLOW_EDGE_DEFINITIONS", "0")
    monkeypatch.setenv("iotflow_edge_status_s", "2.5")
    monkeypatch.setenv("IOTFLOW_EDGE_DURABILITY", "FULL")  # the environment wins over the file
    edge = EdgeSettings.from_env(env_file, checkpoint_ms=50)
    assert edge.gateway_id == "kitchen-gw" and edge.workflow == Path("/etc/iotflow/workflow.json")
    assert edge.durability == "FULL" and edge.backfill_per_s == 400.0
    assert edge.definitions is False and edge.status_s == 2.5 and edge.checkpoint_ms == 50


def test_infinity_is_positive_and_nan_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTFLOW_EDGE_STATUS_S", "inf")
    assert EdgeSettings.from_env(None).status_s == math.inf
    monkeypatch.setenv("IOTFLOW_EDGE_STATUS_S", "nan")
    with pytest.raises(ConfigError, match=r"^IOTFLOW_EDGE_STATUS_S='nan' is not valid"):
        EdgeSettings.from_env(None)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "IOTFLOW_EDGE_GATEWAY_ID",
            "gw|1",
            r"IOTFLOW_EDGE_GATEWAY_ID='gw\|1' is not valid: gateway id 'gw\|1' is not usable: "
            r"contains \|; fix it or unset it \(default: 'gw1'\)",
        ),
        (
            "IOTFLOW_EDGE_GATEWAY_ID",
            "site/gw",
            r"IOTFLOW_EDGE_GATEWAY_ID='site/gw' is not valid: .* contains '/'",
        ),
        ("IOTFLOW_EDGE_GATEWAY_ID", "", r"IOTFLOW_EDGE_GATEWAY_ID='' is not valid: .* empty"),
        (
            "IOTFLOW_EDGE_CHECKPOINT_MS",
            "0",
            r"IOTFLOW_EDGE_CHECKPOINT_MS='0' is not valid: Expected `int` >= 1; "
            r"fix it or unset it \(default: 100\)",
        ),
        ("IOTFLOW_EDGE_BUFFER_MAX_BYTES", "64MB", r"IOTFLOW_EDGE_BUFFER_MAX_BYTES='64MB'"),
        ("IOTFLOW_EDGE_IDLE_STOP_S", "-1", r"IOTFLOW_EDGE_IDLE_STOP_S='-1' .* > 0.0"),
        (
            "IOTFLOW_EDGE_DURABILITY",
            "full",
            r"IOTFLOW_EDGE_DURABILITY='full' is not valid: Invalid enum value 'full'; "
            r"choose one of 'FULL', 'NORMAL'",
        ),
        ("IOTFLOW_EDGE_DEFINITIONS", "maybe", r"IOTFLOW_EDGE_DEFINITIONS='maybe' .* `bool`"),
    ],
)
def test_a_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{message}"):
        EdgeSettings.from_env(None)
