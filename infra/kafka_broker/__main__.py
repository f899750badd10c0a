"""``python -m infra.kafka_broker --host 127.0.0.1 --port 9092``.

Prints one line ``embedded Kafka broker listening on HOST:PORT`` once it
accepts connections; SIGTERM or SIGINT stop it cleanly (exit code 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from infra.kafka_broker.broker import KafkaBroker
from infra.threaded import serve_until_signal


async def _serve(args: argparse.Namespace) -> None:
    broker = KafkaBroker(
        advertised_host=args.host,
        default_partitions=args.default_partitions,
        auto_create_topics=not args.no_auto_create_topics,
        retention_bytes=args.retention_mb * 1024 * 1024,
    )
    await serve_until_signal(
        broker,
        args.host,
        args.port,
        lambda port: print(f"embedded Kafka broker listening on {args.host}:{port}", flush=True),
    )
    stats = broker.stats()
    print(
        f"embedded Kafka broker stopped: {stats.batches_in} batches ({stats.bytes_in} bytes) in, "
        f"{stats.fetches} fetches, {stats.produce_errors} produce errors",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.kafka_broker",
        description="A small Kafka-protocol broker for local use.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9092, help="0 picks a free port")
    parser.add_argument("--default-partitions", type=int, default=1)
    parser.add_argument("--no-auto-create-topics", action="store_true")
    parser.add_argument(
        "--retention-mb", type=int, default=512, help="per partition; the oldest batches go past it"
    )
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
    args = parser.parse_args(argv)
    if args.default_partitions < 1:
        parser.error(f"--default-partitions {args.default_partitions} must be at least 1")
    if args.retention_mb < 1:
        parser.error(f"--retention-mb {args.retention_mb} must be at least 1")
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
