"""Each benchmark, run briefly through its CLI: the JSON shape and complete, correct work.

Correctness only: no figure is compared with a threshold (DESIGN.md, Benchmarks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos import FAULTS, QUICK, fault_schedule
from bench.harness import BENCHMARKS, load

ROOT = Path(__file__).resolve().parents[2]

# figures each benchmark must report, and the counts that must equal what was sent
EXPECTED = {name: (load(name).FIGURES, load(name).COMPLETE_COUNTS) for name in BENCHMARKS}


def bench(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_every_benchmark_in_the_design_table_is_present() -> None:
    design_table = {"ingest_mqtt", "flow_throughput"}
    assert design_table <= set(BENCHMARKS)


# Smaller than --quick where the quick size buys the smoke test nothing: the run's shape and
# complete counts are the same at this size. The recovery scenario itself is
# tests/dataflows/test_recovery.py (100,000 readings, 5 kills); the edge fleet runs publish
# for a fixed time (12 s quick), the latency runs likewise (6 s).
SMOKE_OVERRIDES = {
    "recovery": ["--readings", "10000"],
    "edge_bandwidth": ["--duration-s", "4"],
    "edge_memory": ["--duration-s", "4"],
    "detection_latency": ["--duration-s", "3", "--warmup-s", "1"],
    "twin_sync_latency": ["--duration-s", "2.5", "--warmup-s", "0.5"],
    "edge_decision_latency": ["--duration-s", "2.5", "--warmup-s", "0.5"],
}


# chaos takes about a minute even quick: its own test below checks the shape too
@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"chaos"}))
def test_quick_run_prints_one_json_result_with_complete_counts(name: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = bench(name, "--quick", *SMOKE_OVERRIDES.get(name, []), "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert json.loads(out.read_text()) == result
    assert_result_shape(name, result)


def assert_result_shape(name: str, result: dict) -> None:
    """DESIGN.md's benchmark JSON: figures with value and unit, params, machine, complete counts."""
    assert result["name"] == name
    assert set(result) >= {"name", "figures", "params", "machine", "counts"}
    figures, counted = EXPECTED[name]
    assert set(result["figures"]) >= figures
    for figure in result["figures"].values():
        assert set(figure) == {"value", "unit"}
        assert isinstance(figure["value"], int | float) and figure["value"] > 0
        assert isinstance(figure["unit"], str) and figure["unit"]
    assert result["params"]["quick"] is True
    assert set(result["machine"]) == {
        "cpu_model",
        "cores",
        "memory_gib",
        "python",
        "bytewax",
        "platform",
        "kafka_broker",
    }
    assert result["machine"]["kafka_broker"] in {"tansu", "embedded", "external"}

    counts = result["counts"]
    assert counts["sent"] > 0
    for key in counted:
        assert counts[key] == counts["sent"], (key, counts)


def test_flow_throughput_windows_each_device_once_per_window() -> None:
    done = bench("flow_throughput", "--quick", "--events", "600", "--devices", "10")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    counts = result["counts"]
    # 10 devices x 60 readings 1 s apart = one 60 s window each, two metrics
    assert counts["expected_aggregates"] == 20
    assert counts["kafka_aggregates"] == counts["duckdb_rows"] == 20
    assert counts["kafka_deadletter"] == 0
    assert result["params"]["events"] == 600 and result["params"]["devices"] == 10


def test_list_names_every_benchmark() -> None:
    done = bench("--list")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert listed == set(BENCHMARKS)


def test_unknown_benchmark_is_a_usage_error_listing_valid_names() -> None:
    done = bench("no_such_bench")
    assert done.returncode == 2
    assert "no_such_bench" in done.stderr
    for name in BENCHMARKS:
        assert name in done.stderr
    assert done.stdout == ""


def test_unknown_parameter_is_a_usage_error() -> None:
    done = bench("flow_throughput", "--quick", "--no-such-param", "3")
    assert done.returncode == 2
    assert "--no-such-param" in done.stderr


def test_chaos_with_a_fixed_seed_loses_nothing_and_runs_nothing_twice() -> None:
    done = bench("chaos", "--quick", "--seed", "7", timeout_s=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert_result_shape("chaos", result)
    counts = result["counts"]
    # the same seed gives the same fault schedule, every kind of fault once
    planned = fault_schedule(7, QUICK["duration"], QUICK["interval"], list(FAULTS))
    assert result["params"]["schedule"] == [f.to_json() for f in planned]
    assert {kind: counts[f"{kind}.injected"] for kind in FAULTS} == dict.fromkeys(FAULTS, 1)
    assert counts["readings_lost"] == counts["commands_executed_twice"] == 0
    assert counts["expired_executed"] == 0
    for kind in ("bridge_kill", "flow_kill"):
        assert counts[f"{kind}.readings_lost"] == 0
    for kind in (
        "duplicate_request",
        "redelivery",
        "link_drop",
        "orchestrator_kill",
        "device_offline",
    ):
        assert counts[f"{kind}.executed_twice"] == 0
    # the faults did happen: copies came and were dropped, the expiring command expired
    assert counts["duplicate_request.duplicates_before_dedup"] == 2
    assert counts["redelivery.duplicates_before_dedup"] >= 1
    assert counts["device_offline.expiring_audited_expired"] == 1
    assert counts["device_offline.valid_executed"] == 2
    assert counts["commands_done"] == counts["commands_requested"] - counts["commands_expired"]
