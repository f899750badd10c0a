"""The benchmark registry, the result shape and the machine description.

A result is one JSON object::

    {"name": ..., "figures": {FIGURE: {"value": v, "unit": u}},
     "params": {...}, "counts": {...}, "machine": {...}}

``counts`` holds what was sent and what came out, so a reader (and the smoke
test) can see that the rate was measured on complete, correct work.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import platform
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "BENCHMARKS",
    "BenchError",
    "Figure",
    "Measured",
    "load",
    "machine_info",
    "params_for",
    "run_benchmark",
]

# Support modules of the package; every other module is a benchmark named after
# its file, defining DESCRIPTION, DEFAULTS, QUICK, FIGURES, COMPLETE_COUNTS and run().
_SUPPORT = frozenset({"harness", "workload", "ingest_flow"})

# name -> module path; a module is imported only when its benchmark runs or is listed.
BENCHMARKS: dict[str, str] = {
    info.name: f"bench.{info.name}"
    for info in pkgutil.iter_modules([str(Path(__file__).parent)])
    if not info.name.startswith("_") and info.name not in _SUPPORT
}


class BenchError(Exception):
    """A benchmark could not produce a trustworthy figure (lost data, a broker failed, ...)."""


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit}


@dataclass(frozen=True)
class Measured:
    """What ``run(params)`` returns: the figures, the counts that vouch for them, and
    parameters the run resolved (``publisher="auto"`` -> the one used), echoed in ``params``."""

    figures: dict[str, Figure]
    counts: dict[str, int] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)


def load(name: str) -> ModuleType:
    """The module of benchmark ``name``; raise BenchError listing the valid names."""
    module = BENCHMARKS.get(name)
    if module is None:
        msg = f"unknown benchmark {name!r}; valid names: {', '.join(sorted(BENCHMARKS))}"
        raise BenchError(msg)
    return importlib.import_module(module)


def params_for(
    module: ModuleType, *, quick: bool = False, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The module's defaults, then its quick sizes, then the overrides (names checked)."""
    params = dict(module.DEFAULTS)
    if quick:
        params.update(module.QUICK)
    for key, value in (overrides or {}).items():
        if key not in module.DEFAULTS:
            msg = f"unknown parameter {key!r}; valid: {', '.join(sorted(module.DEFAULTS))}"
            raise BenchError(msg)
        params[key] = value
    return params


def run_benchmark(
    name: str, *, quick: bool = False, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one benchmark and return its result object (see the module docstring)."""
    module = load(name)
    params = params_for(module, quick=quick, overrides=overrides)
    measured: Measured = module.run(params)
    return {
        "name": name,
        "figures": {k: f.to_json() for k, f in measured.figures.items()},
        "params": {**params, **measured.resolved, "quick": quick},
        "counts": measured.counts,
        "machine": machine_info(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, Python and Bytewax versions, platform, the Kafka broker."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "bytewax": importlib.metadata.version("bytewax"),
        "platform": platform.platform(),
        "kafka_broker": _kafka_broker(),
    }


def _kafka_broker() -> str:
    """Which Kafka broker a benchmark's local stack talks to (see infra.stack)."""
    if os.environ.get("IOTFLOW_KAFKA_BOOTSTRAP"):
        return "external"
    return os.environ.get("IOTFLOW_KAFKA_BROKER", "").strip().lower() or "tansu"
