"""``KafkaBroker``: a single-node Kafka-protocol broker in asyncio, memory only.

Each connection is served in order, one request at a time, as a Kafka broker
does: a fetch that long-polls holds the responses behind it on that
connection, and is woken the moment a batch is appended to any partition it
asked for. Requests that do not parse, an API the broker does not speak, or
an unsupported version of one close the connection (ApiVersions answers an
unsupported version with the supported list, as the protocol asks).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from infra.kafka_broker.codec import ProtocolError, Reader, Writer
from infra.kafka_broker.groups import GroupCoordinator
from infra.kafka_broker.log import AppendError, PartitionLog

__all__ = ["API_VERSIONS", "BrokerStats", "KafkaBroker"]

log = logging.getLogger("infra.kafka_broker")

# api key: (min, max) - every max is the API's last version before its flexible encoding
API_VERSIONS: dict[int, tuple[int, int]] = {
    0: (3, 8),  # Produce (3 is the first with record batches)
    1: (4, 11),  # Fetch
    2: (1, 5),  # ListOffsets
    3: (0, 8),  # Metadata
    8: (2, 7),  # OffsetCommit
    9: (1, 5),  # OffsetFetch
    10: (0, 2),  # FindCoordinator
    11: (0, 5),  # JoinGroup
    12: (0, 3),  # Heartbeat
    13: (0, 2),  # LeaveGroup
    14: (0, 3),  # SyncGroup
    18: (0, 2),  # ApiVersions
    19: (0, 4),  # CreateTopics
    20: (0, 3),  # DeleteTopics
    22: (0, 1),  # InitProducerId
    32: (0, 2),  # DescribeConfigs
}

NONE = 0
OFFSET_OUT_OF_RANGE = 1
UNKNOWN_TOPIC_OR_PARTITION = 3
INVALID_TOPIC = 17
INVALID_REQUIRED_ACKS = 21
UNSUPPORTED_VERSION = 35
TOPIC_ALREADY_EXISTS = 36
INVALID_PARTITIONS = 37
INVALID_REPLICATION_FACTOR = 38
INVALID_CONFIG = 40

MAX_REQUEST_BYTES = 100 * 1024 * 1024  # Kafka's socket.request.max.bytes
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588  # Kafka's message.max.bytes
NODE_ID = 1
CLUSTER_ID = "iotflow-local"
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
_CLEANUP_POLICIES = {"delete", "compact", "compact,delete", "delete,compact"}
_TOPIC_DEFAULTS = {
    "cleanup.policy": "delete",
    "max.message.bytes": str(DEFAULT_MAX_MESSAGE_BYTES),
    "retention.ms": "604800000",
    "compression.type": "producer",
}


@dataclass
class BrokerStats:
    """Counters since start."""

    batches_in: int = 0
    bytes_in: int = 0
    fetches: int = 0
    produce_errors: int = 0
    connections: int = 0


@dataclass
class _Topic:
    name: str
    partitions: list[PartitionLog]
    configs: dict[str, str] = field(default_factory=dict)

    def max_message_bytes(self) -> int:
        return int(self.configs.get("max.message.bytes", DEFAULT_MAX_MESSAGE_BYTES))


def topic_name_problem(name: str) -> str | None:
    """Why ``name`` is not a legal Kafka topic name, or None."""
    if name in (".", "..") or not _TOPIC_NAME.fullmatch(name):
        return f"topic name {name[:300]!r} must be 1-249 of [A-Za-z0-9._-], not '.' or '..'"
    return None


class KafkaBroker:
    """Topics, offsets and the request handlers; ``start()`` listens on TCP.

    Not supported: static group membership, transactions, compaction (``cleanup.policy`` is kept and reported, nothing
    is compacted), SASL/TLS, more than one node, persistence across restarts.
    """

    def __init__(
        self,
        *,
        advertised_host: str = "127.0.0.1",
        default_partitions: int = 1,
        auto_create_topics: bool = True,
        retention_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.advertised_host = advertised_host
        self.port = 0
        self.default_partitions = default_partitions
        self.auto_create_topics = auto_create_topics
        self.retention_bytes = retention_bytes
        self.topics: dict[str, _Topic] = {}
        self.committed: dict[tuple[str, str, int], tuple[int, str | None]] = {}
        self._next_producer_id = 1000
        self.groups = GroupCoordinator()
        self._expiry: asyncio.Task[None] | None = None
        self._stats = BrokerStats()
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._handlers: dict[int, Callable[[int, Reader], Awaitable[Writer | None]]] = {
            0: self._produce,
            1: self._fetch,
            2: self._list_offsets,
            3: self._metadata,
            8: self._offset_commit,
            9: self._offset_fetch,
            10: self._find_coordinator,
            11: self._join_group,
            12: self._heartbeat,
            13: self._leave_group,
            14: self._sync_group,
            18: self._api_versions,
            19: self._create_topics,
            20: self._delete_topics,
            22: self._init_producer_id,
            32: self._describe_configs,
        }

    def stats(self) -> BrokerStats:
        return BrokerStats(**vars(self._stats))

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks one); return the port."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self._expiry = asyncio.get_running_loop().create_task(self._expire_members())
        return self.port

    async def _expire_members(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.groups.expire()

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            self._server.close()
        for writer, task in list(self._connections.items()):
            writer.close()
            task.cancel()
        await asyncio.gather(*self._connections.values(), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- connections ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        if task is not None:
            self._connections[writer] = task
        self._stats.connections += 1
        peer = writer.get_extra_info("peername")
        try:
            while True:
                head = await reader.readexactly(4)
                size = int.from_bytes(head, "big", signed=True)
                if size < 8 or size > MAX_REQUEST_BYTES:
                    log.warning(
                        "closing %s: request size %d outside 8..%d", peer, size, MAX_REQUEST_BYTES
                    )
                    return
                body = await reader.readexactly(size)
                response = await self._request(body, peer)
                if response is None:
                    continue
                writer.write(len(response).to_bytes(4, "big") + response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # close(): end quietly, the loop is going away
            pass
        except _CloseConnection as exc:
            log.warning("closing %s: %s", peer, exc)
        finally:
            self._connections.pop(writer, None)
            writer.close()

    async def _request(self, body: bytes, peer: object) -> bytes | None:
        request = Reader(body)
        try:
            api_key, version, correlation_id = request.int16(), request.int16(), request.int32()
            request.nstring()  # client id
        except ProtocolError as exc:
            raise _CloseConnection(f"bad request header: {exc}") from exc
        supported = API_VERSIONS.get(api_key)
        header = correlation_id.to_bytes(4, "big", signed=True)
        if api_key == 18 and (supported is None or version > supported[1]):
            return header + bytes(self._api_versions_body(0, UNSUPPORTED_VERSION).buf)
        if supported is None or not supported[0] <= version <= supported[1]:
            raise _CloseConnection(
                f"api key {api_key} version {version} is not supported ({supported})"
            )
        try:
            out = await self._handlers[api_key](version, request)
        except ProtocolError as exc:
            raise _CloseConnection(f"api key {api_key} v{version}: {exc}") from exc
        return None if out is None else header + bytes(out.buf)

    # -- ApiVersions, Metadata, FindCoordinator, InitProducerId ---------------------

    async def _api_versions(self, version: int, request: Reader) -> Writer:
        return self._api_versions_body(version, NONE)

    def _api_versions_body(self, version: int, error: int) -> Writer:
        out = Writer().int16(error)
        out.array(
            sorted(API_VERSIONS.items()),
            lambda w, kv: w.int16(kv[0]).int16(kv[1][0]).int16(kv[1][1]),
        )
        if version >= 1:
            out.int32(0)
        return out

    async def _metadata(self, version: int, request: Reader) -> Writer:
        names = request.narray(Reader.string)
        allow_create = request.bool() if version >= 4 else True
        if version >= 8:
            request.bool()
            request.bool()
        if names is None or (version == 0 and not names):
            names = sorted(self.topics)
        out = Writer()
        if version >= 3:
            out.int32(0)

        def broker(w: Writer, _: object) -> None:
            w.int32(NODE_ID).nstring(self.advertised_host).int32(self.port)
            if version >= 1:
                w.nstring(None)

        out.array([None], broker)
        if version >= 2:
            out.nstring(CLUSTER_ID)
        if version >= 1:
            out.int32(NODE_ID)

        def partition(w: Writer, index: int) -> None:
            w.int16(NONE).int32(index).int32(NODE_ID)
            if version >= 7:
                w.int32(0)
            w.array([NODE_ID], Writer.int32).array([NODE_ID], Writer.int32)
            if version >= 5:
                w.array([], Writer.int32)

        def topic(w: Writer, name: str) -> None:
            found = self.topics.get(name)
            error = NONE
            if found is None:
                problem = topic_name_problem(name)
                if problem is not None:
                    error = INVALID_TOPIC
                elif allow_create and self.auto_create_topics:
                    found = self._create(name, self.default_partitions, {})
                else:
                    error = UNKNOWN_TOPIC_OR_PARTITION
            w.int16(error).nstring(name)
            if version >= 1:
                w.bool(False)
            w.array(range(len(found.partitions)) if found else [], partition)
            if version >= 8:
                w.int32(-2147483648)

        out.array(names, topic)
        if version >= 8:
            out.int32(-2147483648)
        return out

    async def _find_coordinator(self, version: int, request: Reader) -> Writer:
        request.string()
        if version >= 1:
            request.int8()
        out = Writer()
        if version >= 1:
            out.int32(0)
        out.int16(NONE)
        if version >= 1:
            out.nstring(None)
        return out.int32(NODE_ID).nstring(self.advertised_host).int32(self.port)

    async def _init_producer_id(self, version: int, request: Reader) -> Writer:
        request.nstring()
        request.int32()
        self._next_producer_id += 1
        return Writer().int32(0).int16(NONE).int64(self._next_producer_id).int16(0)

    # -- topics ----------------------------------------------------------------------

    def _create(self, name: str, partitions: int, configs: dict[str, str]) -> _Topic:
        topic = _Topic(
            name, [PartitionLog(self.retention_bytes) for _ in range(partitions)], configs
        )
        self.topics[name] = topic
        return topic

    def _partition(self, name: str, index: int) -> PartitionLog | None:
        topic = self.topics.get(name)
        if topic is None or not 0 <= index < len(topic.partitions):
            return None
        return topic.partitions[index]

    async def _create_topics(self, version: int, request: Reader) -> Writer:
        def read_topic(r: Reader) -> tuple[str, int, int, int, dict[str, str | None]]:
            name, partitions, replication = r.string(), r.int32(), r.int16()
            assignments = r.array(lambda a: (a.int32(), a.array(Reader.int32)))
            configs = dict(r.array(lambda c: (c.string(), c.nstring())))
            return name, partitions, replication, len(assignments), configs

        topics = request.array(read_topic)
        request.int32()  # timeout
        validate_only = request.bool() if version >= 1 else False
        results: list[tuple[str, int, str | None]] = []
        for name, partitions, replication, assigned, configs in topics:
            error, message = self._check_new_topic(name, partitions, replication, assigned, configs)
            if error == NONE and not validate_only:
                count = assigned or (self.default_partitions if partitions == -1 else partitions)
                self._create(name, count, {k: v for k, v in configs.items() if v is not None})
            results.append((name, error, message))
        out = Writer()
        if version >= 2:
            out.int32(0)

        def result(w: Writer, item: tuple[str, int, str | None]) -> None:
            w.nstring(item[0]).int16(item[1])
            if version >= 1:
                w.nstring(item[2])

        return out.array(results, result)

    def _check_new_topic(
        self,
        name: str,
        partitions: int,
        replication: int,
        assigned: int,
        configs: dict[str, str | None],
    ) -> tuple[int, str | None]:
        problem = topic_name_problem(name)
        if problem is not None:
            return INVALID_TOPIC, problem
        if name in self.topics:
            return TOPIC_ALREADY_EXISTS, f"topic {name!r} already exists"
        if not assigned and (partitions == 0 or partitions < -1 or partitions > 10_000):
            return (
                INVALID_PARTITIONS,
                f"num_partitions {partitions} must be -1 (default) or 1..10000",
            )
        if replication not in (-1, 1):
            return (
                INVALID_REPLICATION_FACTOR,
                f"replication factor {replication}: this broker has one node",
            )
        policy = configs.get("cleanup.policy")
        if policy is not None and policy not in _CLEANUP_POLICIES:
            return (
                INVALID_CONFIG,
                f"cleanup.policy {policy!r} must be one of {sorted(_CLEANUP_POLICIES)}",
            )
        size = configs.get("max.message.bytes")
        if size is not None and not (size.isdigit() and int(size) > 0):
            return INVALID_CONFIG, f"max.message.bytes {size!r} must be a positive integer"
        return NONE, None

    async def _delete_topics(self, version: int, request: Reader) -> Writer:
        names = request.array(Reader.string)
        request.int32()
        out = Writer()
        if version >= 1:
            out.int32(0)

        def result(w: Writer, name: str) -> None:
            w.nstring(name).int16(
                NONE if self.topics.pop(name, None) else UNKNOWN_TOPIC_OR_PARTITION
            )

        return out.array(names, result)

    async def _describe_configs(self, version: int, request: Reader) -> Writer:
        resources = request.array(lambda r: (r.int8(), r.string(), r.narray(Reader.string)))
        if version >= 1:
            request.bool()
        out = Writer().int32(0)

        def config(w: Writer, item: tuple[str, str, bool]) -> None:
            name, value, is_default = item
            w.nstring(name).nstring(value).bool(False)
            if version == 0:
                w.bool(is_default)
            else:
                w.int8(5 if is_default else 1)  # DEFAULT_CONFIG or DYNAMIC_TOPIC_CONFIG
            w.bool(False)
            if version >= 1:
                w.array([], lambda _w, _s: None)

        def resource(w: Writer, item: tuple[int, str, list[str] | None]) -> None:
            kind, name, keys = item
            topic = self.topics.get(name) if kind == 2 else None
            if kind == 2 and topic is None:
                w.int16(UNKNOWN_TOPIC_OR_PARTITION).nstring(f"unknown topic {name!r}")
                w.int8(kind).nstring(name).array([], config)
                return
            if kind == 2 and topic is not None:
                values = {**_TOPIC_DEFAULTS, **topic.configs}
                defaults = set(_TOPIC_DEFAULTS) - set(topic.configs)
            else:
                values = {
                    "auto.create.topics.enable": str(self.auto_create_topics).lower(),
                    "num.partitions": str(self.default_partitions),
                    "message.max.bytes": str(DEFAULT_MAX_MESSAGE_BYTES),
                }
                defaults = set(values)
            wanted = sorted(values) if keys is None else [k for k in keys if k in values]
            w.int16(NONE).nstring(None).int8(kind).nstring(name)
            w.array([(k, values[k], k in defaults) for k in wanted], config)

        return out.array(resources, resource)

    # -- produce and fetch -------------------------------------------------------

    async def _produce(self, version: int, request: Reader) -> Writer | None:
        request.nstring()  # transactional id: transactions are not supported
        acks = request.int16()
        request.int32()  # timeout
        topics = request.array(lambda t: (t.string(), t.array(lambda p: (p.int32(), p.nbytes()))))
        results: list[tuple[str, list[tuple[str, int, int, int, str | None]]]] = []
        for name, partitions in topics:
            topic = self.topics.get(name)
            rows = [
                (name, index, *self._append(topic, index, records, acks))
                for index, records in partitions
            ]
            results.append((name, rows))
        if acks == 0:
            return None
        out = Writer()

        def part(w: Writer, row: tuple[str, int, int, int, str | None]) -> None:
            name, index, error, base, message = row
            w.int32(index).int16(error).int64(base).int64(-1)
            if version >= 5:
                partition = self._partition(name, index)
                w.int64(partition.start_offset if partition else -1)
            if version >= 8:
                w.array([], lambda _w, _e: None).nstring(message)

        out.array(results, lambda w, item: w.nstring(item[0]).array(item[1], part))
        return out.int32(0)

    def _append(
        self, topic: _Topic | None, index: int, records: memoryview | None, acks: int
    ) -> tuple[int, int, str | None]:
        if acks not in (-1, 0, 1):
            return INVALID_REQUIRED_ACKS, -1, f"acks {acks} must be -1, 0 or 1"
        if topic is None or not 0 <= index < len(topic.partitions):
            self._stats.produce_errors += 1
            return UNKNOWN_TOPIC_OR_PARTITION, -1, "unknown topic or partition"
        try:
            base = topic.partitions[index].append(
                records or memoryview(b""), topic.max_message_bytes()
            )
        except AppendError as exc:
            self._stats.produce_errors += 1
            return exc.code, -1, str(exc)
        self._stats.batches_in += 1
        self._stats.bytes_in += len(records or b"")
        return NONE, base, None

    async def _fetch(self, version: int, request: Reader) -> Writer:
        request.int32()  # replica id
        max_wait_ms, min_bytes, max_bytes = request.int32(), request.int32(), request.int32()
        request.int8()  # isolation level: without transactions every record is committed
        if version >= 7:
            request.int32()  # session id: sessions are declined (every fetch is a full one)
            request.int32()

        def read_partition(p: Reader) -> tuple[int, int, int]:
            index = p.int32()
            if version >= 9:
                p.int32()
            offset = p.int64()
            if version >= 5:
                p.int64()
            return index, offset, p.int32()

        wanted = request.array(lambda t: (t.string(), t.array(read_partition)))
        if version >= 7:
            request.array(lambda t: (t.string(), t.array(Reader.int32)))
        if version >= 11:
            request.string()
        self._stats.fetches += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_ms / 1000
        while True:
            body, total = self._fetch_body(version, wanted, max_bytes)
            remaining = deadline - loop.time()
            if total >= min_bytes or remaining <= 0:
                return body
            woken: asyncio.Future[None] = loop.create_future()
            logs = [
                p
                for name, parts in wanted
                for index, _o, _m in parts
                if (p := self._partition(name, index))
            ]
            for partition in logs:
                partition.waiter(woken)
            try:
                await asyncio.wait([woken], timeout=remaining)
            finally:
                for partition in logs:
                    partition.forget(woken)

    def _fetch_body(
        self, version: int, wanted: list[tuple[str, list[tuple[int, int, int]]]], max_bytes: int
    ) -> tuple[Writer, int]:
        out = Writer().int32(0)
        if version >= 7:
            out.int16(NONE).int32(0)
        total = 0
        out.int32(len(wanted))
        for name, parts in wanted:
            out.nstring(name).int32(len(parts))
            for index, offset, partition_max in parts:
                partition = self._partition(name, index)
                batches: list[bytes] = []
                if partition is None:
                    error, high, start = UNKNOWN_TOPIC_OR_PARTITION, -1, -1
                elif not partition.start_offset <= offset <= partition.next_offset:
                    error, high, start = (
                        OFFSET_OUT_OF_RANGE,
                        partition.next_offset,
                        partition.start_offset,
                    )
                else:
                    error, high, start = NONE, partition.next_offset, partition.start_offset
                    budget = min(partition_max, max_bytes - total) if total else partition_max
                    batches = partition.read(offset, max(budget, 1))
                out.int32(index).int16(error).int64(high).int64(high)
                if version >= 5:
                    out.int64(start)
                out.int32(0)  # no aborted transactions
                if version >= 11:
                    out.int32(-1)
                size = sum(len(b) for b in batches)
                total += size
                out.int32(size)
                for batch in batches:
                    out.buf += batch
        return out, total

    async def _list_offsets(self, version: int, request: Reader) -> Writer:
        request.int32()
        if version >= 2:
            request.int8()

        def read_partition(p: Reader) -> tuple[int, int]:
            index = p.int32()
            if version >= 4:
                p.int32()
            return index, p.int64()

        wanted = request.array(lambda t: (t.string(), t.array(read_partition)))
        out = Writer()
        if version >= 2:
            out.int32(0)

        def part(w: Writer, row: tuple[str, int, int]) -> None:
            name, index, ts = row
            partition = self._partition(name, index)
            error, offset = NONE, -1
            if partition is None:
                error = UNKNOWN_TOPIC_OR_PARTITION
            elif ts == -1:
                offset = partition.next_offset
            elif ts == -2:
                offset = partition.start_offset
            else:
                found = partition.offset_for_time(ts)
                offset = -1 if found is None else found
            w.int32(index).int16(error).int64(-1).int64(offset)
            if version >= 4:
                w.int32(0)

        out.array(
            wanted, lambda w, t: w.nstring(t[0]).array([(t[0], i, ts) for i, ts in t[1]], part)
        )
        return out

    # -- committed offsets (simple consumers: assign() and commit) -------------------

    async def _offset_commit(self, version: int, request: Reader) -> Writer:
        group = request.string()
        generation, member_id = request.int32(), request.string()
        if version >= 7:
            request.nstring()
        if 2 <= version <= 4:
            request.int64()

        def read_partition(p: Reader) -> tuple[int, int, str | None]:
            index, offset = p.int32(), p.int64()
            if version >= 6:
                p.int32()
            return index, offset, p.nstring()

        wanted = request.array(lambda t: (t.string(), t.array(read_partition)))
        membership = self.groups.generation_ok(group, generation, member_id)
        out = Writer()
        if version >= 3:
            out.int32(0)

        def part(w: Writer, row: tuple[str, int, int, str | None]) -> None:
            name, index, offset, metadata = row
            if self._partition(name, index) is None:
                w.int32(index).int16(UNKNOWN_TOPIC_OR_PARTITION)
                return
            if membership != NONE:
                w.int32(index).int16(membership)
                return
            self.committed[(group, name, index)] = (offset, metadata)
            w.int32(index).int16(NONE)

        out.array(wanted, lambda w, t: w.nstring(t[0]).array([(t[0], *p) for p in t[1]], part))
        return out

    async def _offset_fetch(self, version: int, request: Reader) -> Writer:
        group = request.string()
        wanted = request.narray(lambda t: (t.string(), t.array(Reader.int32)))
        if wanted is None:
            by_topic: dict[str, list[int]] = {}
            for g, name, index in sorted(self.committed):
                if g == group:
                    by_topic.setdefault(name, []).append(index)
            wanted = list(by_topic.items())
        out = Writer()
        if version >= 3:
            out.int32(0)

        def part(w: Writer, row: tuple[str, int]) -> None:
            offset, metadata = self.committed.get((group, *row), (-1, ""))
            w.int32(row[1]).int64(offset)
            if version >= 5:
                w.int32(-1)
            w.nstring(metadata).int16(NONE)

        out.array(wanted, lambda w, t: w.nstring(t[0]).array([(t[0], i) for i in t[1]], part))
        if version >= 2:
            out.int16(NONE)
        return out

    # -- consumer groups (see infra.kafka_broker.groups) --------------------------

    async def _join_group(self, version: int, request: Reader) -> Writer:
        group, session_ms = request.string(), request.int32()
        rebalance_ms = request.int32() if version >= 1 else session_ms
        member_id = request.string()
        if version >= 5:
            request.nstring()  # static membership is not supported: treated as dynamic
        protocol_type = request.string()
        protocols = [
            (name, bytes(meta or b""))
            for name, meta in request.array(lambda p: (p.string(), p.nbytes()))
        ]
        result = await self.groups.join(
            group, member_id, protocol_type, protocols, session_ms, rebalance_ms
        )
        out = Writer()
        if version >= 2:
            out.int32(0)
        out.int16(result.error).int32(result.generation).nstring(result.protocol)
        out.nstring(result.leader).nstring(result.member_id)

        def member(w: Writer, item: tuple[str, bytes]) -> None:
            w.nstring(item[0])
            if version >= 5:
                w.nstring(None)
            w.nbytes(item[1])

        return out.array(result.members, member)

    async def _sync_group(self, version: int, request: Reader) -> Writer:
        group, generation, member_id = request.string(), request.int32(), request.string()
        if version >= 3:
            request.nstring()
        assignments = [
            (m, bytes(a or b"")) for m, a in request.array(lambda a: (a.string(), a.nbytes()))
        ]
        error, assignment = await self.groups.sync(group, generation, member_id, assignments)
        out = Writer()
        if version >= 1:
            out.int32(0)
        return out.int16(error).nbytes(assignment)

    async def _heartbeat(self, version: int, request: Reader) -> Writer:
        group, generation, member_id = request.string(), request.int32(), request.string()
        if version >= 3:
            request.nstring()
        out = Writer()
        if version >= 1:
            out.int32(0)
        return out.int16(self.groups.heartbeat(group, generation, member_id))

    async def _leave_group(self, version: int, request: Reader) -> Writer:
        group, member_id = request.string(), request.string()
        out = Writer()
        if version >= 1:
            out.int32(0)
        return out.int16(self.groups.leave(group, member_id))


class _CloseConnection(Exception):
    """The connection cannot go on (unparseable or unsupported request)."""
