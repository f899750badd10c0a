"""edge_bandwidth: bytes the edge gateway sends to the cloud vs bytes its devices send it.

``devices`` devices publish one flat reading each (``{"ts": ..., "temperature": ...,
"humidity": ...}``, about 60 bytes) every ``1 / rate_hz`` s to the gateway's local
Mosquitto (QoS 0, ``publishers`` raw-socket processes), for ``duration_s``. The
real edge flow (``python -m bytewax.run dataflows.edge:flow``) runs a local rule
and 10 s tumbling windows per device and metric (count, sum, min, max), and sends
one compact record per window to ``{prefix}.edge.uplink`` through its
store-and-forward buffer; raw readings are not forwarded (the workflow does not
ask). It stops 3 s after the last reading (every window flushed).

``reduction_factor`` = bytes received (MQTT topic + payload of every reading) /
bytes uplinked (Kafka key + value of every record the gateway sent, its status
records included; envelopes and ids are counted, Kafka's own framing is not).
The run fails unless the aggregates count every reading sent and the buffer is
empty at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench._edge import fleet_run
from bench.harness import BenchError, Figure, Measured
from bench.workload import private_stack

__all__ = ["COMPLETE_COUNTS", "DEFAULTS", "DESCRIPTION", "FIGURES", "QUICK", "run"]

DESCRIPTION = (
    "edge gateway: bytes received / bytes uplinked, 1,000 devices at 1 Hz, 10 s pre-aggregation"
)
DEFAULTS: dict[str, Any] = {"devices": 1000, "rate_hz": 1.0, "duration_s": 60.0, "publishers": 2}
QUICK: dict[str, Any] = {"devices": 100, "duration_s": 12.0, "publishers": 1}
FIGURES = {"reduction_factor"}
COMPLETE_COUNTS = ("aggregated",)


def run(params: dict[str, Any]) -> Measured:
    with tempfile.TemporaryDirectory(prefix="iotflow-bench-") as tmp, private_stack() as info:
        r = fleet_run(
            info,
            Path(tmp),
            devices=params["devices"],
            rate_hz=params["rate_hz"],
            duration_s=params["duration_s"],
            publishers=params["publishers"],
        )
    if r.aggregated != r.sent or r.buffered_after:
        raise BenchError(
            f"incomplete: {r.aggregated} of {r.sent} readings aggregated, {r.buffered_after} records still buffered"
        )
    return Measured(
        figures={
            "reduction_factor": Figure(round(r.bytes_received / r.bytes_uplinked, 1), "x"),
            "bytes_received": Figure(r.bytes_received, "bytes"),
            "bytes_uplinked": Figure(r.bytes_uplinked, "bytes"),
        },
        counts={"sent": r.sent, "aggregated": r.aggregated, "records_uplinked": r.records_uplinked},
    )
