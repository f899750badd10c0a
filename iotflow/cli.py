"""The ``iotflow`` command: ``stack up|down|status``, ``demo``, ``simulate``, ``tail``.

The CLI is the application layer: it imports the connectors, the local stack
and the simulator inside each command, so ``import iotflow`` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from iotflow.errors import IotflowError
from iotflow.settings import Settings, stack_state_path

__all__ = ["main"]


def _stack(args: argparse.Namespace) -> int:
    from infra.stack import LocalStack

    recorded = LocalStack.read_state()
    if args.action == "up":
        if recorded is not None and all(LocalStack.alive(recorded).values()):
            print(f"already up: mqtt {recorded.mqtt_url}  kafka {recorded.kafka_bootstrap}")
            return 0
        if recorded is not None:
            LocalStack.stop_recorded(recorded)
        stack = LocalStack.start(stack_state_path().parent)
        for proc in stack.info.processes:
            print(f"started {proc.name} (pid {proc.pid}) on 127.0.0.1:{proc.port}")
        print(f"IOTFLOW_MQTT_URL={stack.info.mqtt_url}")
        print(f"IOTFLOW_KAFKA_BOOTSTRAP={stack.info.kafka_bootstrap}")
        print(f"recorded in {stack_state_path()}")
        return 0
    if recorded is None:
        print("no local stack is recorded (start one with `iotflow stack up`)")
        return 0 if args.action == "down" else 1
    if args.action == "down":
        stopped = LocalStack.stop_recorded(recorded)
        print(f"stopped: {', '.join(stopped) or 'nothing (already gone)'}")
        return 0
    alive = LocalStack.alive(recorded)
    for proc in recorded.processes:
        state = "up" if alive[proc.name] else "DOWN"
        print(f"{proc.name:10} {state:5} pid {proc.pid} port {proc.port}")
    print(f"mqtt {recorded.mqtt_url}  kafka {recorded.kafka_bootstrap}")
    return 0 if all(alive.values()) else 1


def _tail(args: argparse.Namespace) -> int:
    from connectors.kafka import tail

    settings = Settings()
    topic = args.topic if "." in args.topic else f"{settings.topic_prefix}.{args.topic}"
    for count, record in enumerate(
        tail(
            settings.require_kafka_bootstrap(),
            topic,
            from_beginning=not args.new,
            idle_timeout_s=args.idle,
        ),
        start=1,
    ):
        value: object
        try:
            value = json.loads(record.value) if record.value is not None else None
        except ValueError:
            value = record.value.decode("utf-8", "replace") if record.value else None
        line = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": record.key.decode("utf-8", "replace") if record.key else None,
            "value": value,
        }
        print(json.dumps(line), flush=True)
        if args.max is not None and count >= args.max:
            break
    return 0


def _demo(args: argparse.Namespace) -> int:
    from iotflow.demo import run_demo

    return run_demo(
        duration_s=args.duration,
        devices=args.devices,
        rate_hz=args.rate,
        duckdb_path=args.duckdb,
        seed=args.seed,
    )


def _simulate(args: argparse.Namespace) -> int:
    from iotflow.demo import run_simulator

    return run_simulator(
        devices=args.devices,
        rate_hz=args.rate,
        duration_s=args.duration,
        seed=args.seed,
        malformed_rate=args.malformed_rate,
    )


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iotflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="start, stop or inspect the local brokers")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(func=_stack)

    demo = sub.add_parser("demo", help="brokers, a simulated fleet and the telemetry flow")
    demo.add_argument(
        "--duration",
        type=_positive(float),
        default=30.0,
        help="seconds of simulated traffic (default 30)",
    )
    demo.add_argument(
        "--devices", type=_positive(int), default=200, help="simulated devices (default 200)"
    )
    demo.add_argument(
        "--rate",
        type=_positive(float),
        default=1.0,
        help="readings per second per device (default 1)",
    )
    demo.add_argument(
        "--duckdb",
        type=Path,
        default=Path(".iotflow/demo.duckdb"),
        help="DuckDB file to (re)create",
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(func=_demo)

    sim = sub.add_parser(
        "simulate", help="run a simulated fleet against the configured MQTT broker"
    )
    sim.add_argument("--devices", type=_positive(int), default=200)
    sim.add_argument(
        "--rate", type=_positive(float), default=1.0, help="readings per second per device"
    )
    sim.add_argument(
        "--duration", type=_positive(float), default=None, help="seconds (default: until Ctrl-C)"
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--malformed-rate", type=float, default=0.0, help="share of malformed payloads, 0..1"
    )
    sim.set_defaults(func=_simulate)

    tail = sub.add_parser("tail", help="print a Kafka topic's records as JSON lines")
    tail.add_argument(
        "topic", help="full name, or a short one like 'aggregates' for {prefix}.aggregates"
    )
    tail.add_argument("--new", action="store_true", help="only records that arrive from now on")
    tail.add_argument(
        "--idle", type=_positive(float), default=None, help="stop after this many idle seconds"
    )
    tail.add_argument(
        "--max", type=_positive(int), default=None, help="stop after this many records"
    )
    tail.set_defaults(func=_tail)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except IotflowError as exc:
        print(f"iotflow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
