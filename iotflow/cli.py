"""The ``iotflow`` command: ``stack up|down|status``, ``demo``, ``simulate``, ``tail``, ``bridge``, ``run``, ``preview``.

The CLI is the application layer: it imports the connectors, the local stack
and the simulator inside each command, so ``import iotflow`` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from iotflow.errors import ConfigError, IotflowError
from iotflow.settings import Settings, stack_state_path

__all__ = ["main"]


def _settings() -> Settings:
    """Settings from the environment; a bad ``IOTFLOW_*`` value is a ConfigError naming it."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"IOTFLOW_{'_'.join(str(p) for p in err['loc']).upper()}={err.get('input')!r}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


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

    settings = _settings()
    topic = args.topic if "." in args.topic else f"{settings.topic_prefix}.{args.topic}"
    records = tail(
        settings.require_kafka_bootstrap(),
        topic,
        from_beginning=not args.new,
        idle_timeout_s=args.idle,
    )
    if args.dedupe:
        from connectors.dedupe import Deduper, key_for_topic

        key = key_for_topic(topic, settings.topic_prefix)
        deduper: Deduper = Deduper(key)
        records = (r for r in records if deduper.is_new(_json_value(r.value)))
    for count, record in enumerate(records, start=1):
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


def _json_value(raw: bytes | None) -> object:
    try:
        return json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}


def _bridge(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    from datetime import timedelta

    from connectors.bridge import IngestBridge, default_subscriptions

    settings = _settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bridge = IngestBridge(
        settings.require_mqtt_url(),
        settings.require_kafka_bootstrap(),
        prefix=settings.topic_prefix,
        base=settings.mqtt_base,
        subscriptions=args.topic or default_subscriptions(settings.mqtt_base, settings.mqtt_topics),
        client_id=args.client_id,
        session_expiry=timedelta(seconds=args.session_expiry),
        max_in_flight=args.max_in_flight,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    bridge.start()
    print(f"bridge online: {', '.join(bridge.subscriptions)} -> {bridge.topic}", flush=True)
    bridge.run_until(stop, stats_every_s=args.stats_every)
    print(f"bridge stopped: {bridge.stats.line()}", flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    import os
    import signal
    import subprocess
    import threading

    from infra.flowproc import flow_argv, flow_target, iotflow_error

    settings = _settings()
    target = flow_target(args.flow)
    if args.no_recovery:
        settings = settings.model_copy(update={"recovery_dir": None})
    argv = flow_argv(
        target, settings, workers=args.workers, snapshot_s=args.snapshot, backup_s=args.backup
    )
    env = {**os.environ, **settings.to_env()}
    if args.no_recovery:
        env.pop("IOTFLOW_RECOVERY_DIR", None)
    print(f"running: python {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    child = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    lines: list[str] = []

    def pump() -> None:
        for line in child.stderr or ():
            sys.stderr.write(line)
            lines.append(line)
            del lines[:-200]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _f: child.send_signal(signal.SIGINT))
    code = child.wait()
    reader.join(5)
    why = iotflow_error("".join(lines)) if code != 0 else None
    if why is not None:
        # The flow's own traceback is above; repeat its message where the eye lands.
        print(f"iotflow: the flow stopped: {why}", file=sys.stderr)
        return 2
    return code


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


def _max_in_flight(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text} must be within 1..65535 (the MQTT 5 receive maximum)"
        )
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _preview(args: argparse.Namespace) -> int:
    from commands.plans import PlanSpec
    from commands.preview import preview
    from commands.rollout import RolloutSpec
    from commands.saga import SagaSpec
    from iotflow.declarations import load_file, validate
    from twins.registry import load_registry

    data = load_file(args.file, "plan")
    kind = args.kind
    if kind == "auto":
        steps = data.get("steps") if isinstance(data, dict) else None
        if isinstance(steps, list):
            saga = any(isinstance(s, dict) and "compensation" in s for s in steps)
            kind = "saga" if saga else "plan"
        else:
            kind = "rollout"
    model = {"plan": PlanSpec, "saga": SagaSpec, "rollout": RolloutSpec}[kind]
    spec = validate(model, data, kind)
    twins = {} if args.twins is None else load_file(args.twins, "twins")
    if not isinstance(twins, dict) or not all(isinstance(v, dict) for v in twins.values()):
        raise ConfigError(f"twins file {args.twins} must map device ids to reported states")
    result = preview(spec, load_registry(_settings().registry), twins)
    print(
        json.dumps(result.to_dict(), default=str) if args.json else result.render(limit=args.limit)
    )
    return 0


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
    tail.add_argument(
        "--dedupe",
        action="store_true",
        help="show each natural key once (aggregates, twins, commands.events, commands.requests)",
    )
    tail.set_defaults(func=_tail)

    bridge = sub.add_parser(
        "bridge",
        help="forward device MQTT topics to Kafka {prefix}.ingest, acking only what Kafka holds",
    )
    bridge.add_argument(
        "--client-id",
        default="iotflow-bridge",
        help="stable MQTT client id: the broker keeps this session while the bridge is down",
    )
    bridge.add_argument(
        "--topic",
        action="append",
        default=None,
        help="MQTT topic filter to forward (repeatable; default: telemetry, state and ack)",
    )
    bridge.add_argument(
        "--max-in-flight",
        type=_max_in_flight,
        default=1000,
        help="unacknowledged messages at most (MQTT receive maximum, 1..65535; default 1000)",
    )
    bridge.add_argument(
        "--session-expiry",
        type=_positive(int),
        default=86_400,
        help="seconds the broker keeps the session while the bridge is down (default 86400)",
    )
    bridge.add_argument(
        "--stats-every", type=_positive(float), default=10.0, help="seconds between stats lines"
    )
    bridge.set_defaults(func=_bridge)

    run = sub.add_parser(
        "run",
        help="run a flow with python -m bytewax.run, on a recovery store when "
        "IOTFLOW_RECOVERY_DIR is set",
    )
    run.add_argument("flow", help="a flow name such as 'telemetry', or module:attribute")
    run.add_argument("-w", "--workers", type=_positive(int), default=1, help="workers (default 1)")
    run.add_argument(
        "-s", "--snapshot", type=_positive(int), default=5, help="snapshot interval, whole seconds"
    )
    run.add_argument(
        "-b",
        "--backup",
        type=_non_negative_int,
        default=0,
        help="seconds to keep superseded snapshots (default 0)",
    )
    run.add_argument(
        "--no-recovery", action="store_true", help="ignore IOTFLOW_RECOVERY_DIR for this run"
    )
    run.set_defaults(func=_run)

    pre = sub.add_parser(
        "preview",
        help="dry run of a plan, saga or rollout file: the writes it would send, in order, "
        "against IOTFLOW_REGISTRY; sends nothing",
    )
    pre.add_argument("file", type=Path, help="the declaration (.yaml, .yml or .json)")
    pre.add_argument("--kind", choices=["auto", "plan", "saga", "rollout"], default="auto")
    pre.add_argument(
        "--twins", type=Path, default=None, help="YAML/JSON file: device id -> reported state"
    )
    pre.add_argument("--json", action="store_true", help="print the preview as JSON")
    pre.add_argument(
        "--limit", type=_positive(int), default=200, help="rows shown per table (default 200)"
    )
    pre.set_defaults(func=_preview)
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
