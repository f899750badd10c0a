"""A compact MQTT 5.0 broker in pure asyncio, for machines without Mosquitto.

The local stack starts it (``python -m infra.embedded_broker --port N``) when
Mosquitto is not installed or ``IOTFLOW_EMBEDDED_MQTT=1``; tests can run it
in-process with ``EmbeddedBroker``. Loopback use only: anonymous, no TLS,
nothing persisted to disk.

Guarantees (what the project's clients rely on):

- MQTT 5.0 and 3.1.1 CONNECT; user name and password are accepted and ignored.
  An empty client id gets an assigned one; a second connection with the same
  client id takes the session over (the old one gets DISCONNECT 0x8E).
- Sessions live in memory for their Session Expiry Interval: subscriptions,
  queued QoS 1 messages for an offline client, and unacknowledged QoS 1
  messages, resent with DUP in their original order on reconnect.
- Per-subscriber order is publish order. No more than the client's Receive
  Maximum QoS 1 messages are unacknowledged at once; the rest wait in a
  queue of at most ``max_queued_messages`` (default 1,000,000) per client,
  beyond which new messages are dropped and counted (``stats()``), like
  Mosquitto's ``max_queued_messages``.
- ``+``/``#`` wildcards (``$``-topics are not matched by a leading wildcard),
  ``$share/{group}/{filter}`` (each message to one member, round robin,
  preferring online members), No Local, Retain As Published, Retain Handling.
- Retained messages (an empty payload clears), wills (with Will Delay),
  Message Expiry (a queued message past its expiry is dropped and counted;
  what is sent carries the time left). An expiry of 0 means no expiry.
- A PUBLISH topic with a wildcard closes the connection with 0x90 and a
  reason string; keepalive is enforced at 1.5x (the will is then published).

Not supported: QoS 2 delivery to subscribers (subscriptions are granted at
most QoS 1; QoS 2 publishes are accepted exactly once and forwarded at QoS
1), topic aliases (Topic Alias Maximum 0), subscription identifiers,
enhanced authentication (AUTH), request/response information, TLS,
WebSockets, persistence across restarts, ``$SYS`` topics, QoS 0 messages
queued for offline clients (skipped and counted, as Mosquitto does by
default).
"""

from infra.embedded_broker.broker import BrokerStats, MqttBroker
from infra.embedded_broker.runner import EmbeddedBroker

__all__ = ["BrokerStats", "EmbeddedBroker", "MqttBroker"]
