"""Benchmarks that print JSON figures: ``python -m bench NAME [--json FILE]``.

One module per benchmark (``bench/flow_throughput.py``, ``bench/ingest_mqtt.py``);
each exposes ``DESCRIPTION``, ``DEFAULTS`` (its parameters), ``QUICK`` (the
tiny sizes of ``--quick``) and ``run(params) -> Measured``. Every benchmark
starts its own brokers on free loopback ports and stops them, and checks
that what it processed equals what it sent before it reports a rate.
"""

from bench.harness import BENCHMARKS, BenchError, Figure, Measured, machine_info, run_benchmark

__all__ = ["BENCHMARKS", "BenchError", "Figure", "Measured", "machine_info", "run_benchmark"]
