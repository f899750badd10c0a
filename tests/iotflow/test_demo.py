"""``iotflow demo`` end to end, as a user runs it (its own brokers, the real flow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb


def test_demo_checks_itself_and_leaves_duckdb(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLOW_")}
    env["IOTFLOW_STATE_DIR"] = str(tmp_path / "state")
    db = tmp_path / "demo.duckdb"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "iotflow.cli",
            "demo",
            "--duration",
            "6",
            "--devices",
            "40",
            "--rate",
            "2",
            "--duckdb",
            str(db),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout
    lines = {
        line[:34].strip(): line[34:].split() for line in proc.stdout.splitlines() if len(line) > 34
    }
    assert lines["dead letters for them"][0] == lines["malformed payloads published"][0]
    assert lines["readings on Kafka telemetry"][0] == lines["valid readings published"][0]
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(DISTINCT key) FROM aggregates").fetchone() == (40,)
