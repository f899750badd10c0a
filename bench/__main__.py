"""``python -m bench NAME [--json FILE] [--quick] [--kafka tansu|embedded] [--PARAM VALUE ...]`` and ``--list``.

Prints one JSON object on stdout (and writes it to FILE with ``--json``).
Exit codes: 0 done, 1 the benchmark failed, 2 a usage error (unknown
benchmark or parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.harness import BENCHMARKS, BenchError, load, run_benchmark


def _base_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run one iotflow benchmark and print its figures as JSON.",
        epilog="Parameter overrides are benchmark specific: python -m bench NAME --help.",
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--kafka",
        choices=["tansu", "embedded"],
        help="the local Kafka broker to start (sets IOTFLOW_KAFKA_BROKER; default tansu)",
    )
    return parser


def _param_parser(name: str, defaults: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m bench {name}", add_help=False)
    for key, value in defaults.items():
        kind = type(value)
        flags = [f"--{key.replace('_', '-')}"] + ([f"--{key}"] if "_" in key else [])
        parser.add_argument(
            *flags, dest=key, type=kind, metavar=kind.__name__.upper(), help=f"default {value}"
        )
    return parser


def _list() -> str:
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"{name:<{width}}  {load(name).DESCRIPTION}" for name in sorted(BENCHMARKS))


def main(argv: list[str] | None = None) -> int:
    base = _base_parser()
    args, rest = base.parse_known_args(argv)
    if args.help and args.name is None:
        base.print_help()
        return 0
    if args.list:
        print(_list())
        return 0
    if args.name is None:
        base.error(f"name a benchmark: {', '.join(sorted(BENCHMARKS))} (or --list)")
    if args.name not in BENCHMARKS:
        print(
            f"python -m bench: unknown benchmark {args.name!r}; valid names: "
            f"{', '.join(sorted(BENCHMARKS))}",
            file=sys.stderr,
        )
        return 2
    module = load(args.name)
    params = _param_parser(args.name, module.DEFAULTS)
    if args.help:
        base.print_help()
        print(f"\n{args.name}: {module.DESCRIPTION}\nparameters:")
        params.print_help()
        return 0
    overrides = {k: v for k, v in vars(params.parse_args(rest)).items() if v is not None}
    if args.kafka is not None:
        os.environ["IOTFLOW_KAFKA_BROKER"] = (
            args.kafka
        )  # read by infra.stack in this and child processes
    try:
        result = run_benchmark(args.name, quick=args.quick, overrides=overrides)
    except BenchError as exc:
        print(f"python -m bench {args.name}: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
