"""A single-node Kafka-protocol broker in pure asyncio, memory only, for local use.

The local stack starts it (``python -m infra.kafka_broker --port N``) when
``IOTFLOW_KAFKA_BROKER=embedded``; the default local Kafka broker stays Tansu
(DESIGN.md). It exists because Tansu 0.6's memory storage adds ~30 ms (p50)
to every produce-to-fetch hop and more as a topic grows, which hides the
framework's own latency in the benchmarks. Loopback use only.

Guarantees (what librdkafka clients such as confluent-kafka and Bytewax's
Kafka connectors rely on):

- Protocol: the non-flexible versions of Produce (3-8), Fetch (4-11),
  ListOffsets (1-5), Metadata (0-8), OffsetCommit (2-7), OffsetFetch (1-5),
  FindCoordinator (0-2), JoinGroup (0-5), SyncGroup (0-3), Heartbeat (0-3),
  LeaveGroup (0-2), ApiVersions (0-2), CreateTopics (0-4), DeleteTopics
  (0-3), InitProducerId (0-1) and DescribeConfigs (0-2); clients negotiate
  down to them.
- Consumer groups (``subscribe()``): partitions shared among members and
  rebalanced when one joins, leaves or goes silent past its session timeout
  (``infra.kafka_broker.groups``); committed offsets per group.
- A batch is stored as the producer sent it (record batch v2, any
  compression) and fetched byte for byte; offsets are dense per partition.
- Idempotent producers: a resent batch is not appended twice, a sequence gap
  is refused, an older producer epoch is fenced.
- A fetch long-polls up to its ``max_wait_ms`` and returns the moment a batch
  arrives on a partition it asked for.
- Topics: legal names only, auto-created on a producer's metadata request
  (as Kafka's default), configs kept and reported by DescribeConfigs,
  ``max.message.bytes`` enforced per batch. Each partition keeps at most
  ``--retention-mb`` (oldest batches go first; the log start offset moves).

Not supported: static group membership, the initial rebalance delay, transactions, compaction (the policy is recorded,
nothing is compacted), SASL/TLS, CRC checks on produce, more than one node,
persistence across restarts.
"""

from infra.kafka_broker.broker import API_VERSIONS, BrokerStats, KafkaBroker
from infra.kafka_broker.runner import EmbeddedKafka

__all__ = ["API_VERSIONS", "BrokerStats", "EmbeddedKafka", "KafkaBroker"]
