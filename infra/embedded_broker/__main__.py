"""``python -m infra.embedded_broker --host 127.0.0.1 --port 1883``.

Prints one line ``embedded MQTT broker listening on mqtt://HOST:PORT`` once
it accepts connections; SIGTERM or SIGINT stop it cleanly (exit code 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from infra.embedded_broker.broker import MqttBroker
from infra.threaded import serve_until_signal


async def _serve(args: argparse.Namespace) -> None:
    broker = MqttBroker(max_queued_messages=args.max_queued_messages)
    await serve_until_signal(
        broker,
        args.host,
        args.port,
        lambda port: print(
            f"embedded MQTT broker listening on mqtt://{args.host}:{port}", flush=True
        ),
    )
    stats = broker.stats()
    print(
        f"embedded MQTT broker stopped: {stats.received} received, {stats.delivered} delivered, "
        f"{stats.dropped_queue_full} dropped (queue full), {stats.expired} expired",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.embedded_broker", description="A small MQTT 5 broker for local use."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883, help="0 picks a free port")
    parser.add_argument(
        "--max-queued-messages",
        type=int,
        default=1_000_000,
        help="per client; beyond it new messages are dropped and counted",
    )
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
    args = parser.parse_args(argv)
    if args.max_queued_messages < 1:
        parser.error(f"--max-queued-messages {args.max_queued_messages} must be at least 1")
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
