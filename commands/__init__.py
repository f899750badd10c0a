"""Command orchestration: validated device writes with sequencing, priorities, conflicts,
acks, retries, expiry, coordinators (plans, sagas, rollouts) and an audit trail.

Modules, all pure logic (no Bytewax, no connectors):

- ``commands.model``: the lifecycle (``CommandState``, guarded moves) and ``CommandRecord``;
- ``commands.validation``: decoding requests and device messages, ``CommandValidator``;
- ``commands.instructions``: high-level instructions (target group + steps) -> commands;
- ``commands.orchestrator``: ``Orchestrator``, the stateful step;
- ``commands.writers``: device writers (MQTT, Kafka, HTTP messages for a ``Write``);
- ``commands.audit``: lifecycle events as Kafka records and DuckDB ``command_audit`` rows;
- ``commands.coordinator``, ``plans``, ``saga``, ``rollout``, ``preview``: multi-step coordinators.
"""

__all__: list[str] = []
