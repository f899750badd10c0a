"""What CEP patterns emit besides detections, and how actions expand a detection (no polars).

``CommandRequest``, ``TwinUpdate`` and ``TimedOutMatch`` are the outputs of both
pattern engines: the columnar ``operators.cep.CepEngine`` (cloud) and the
per-reading ``operators.cep_rows.RowEngine`` (edge gateways). ``expand_actions``
turns a pattern's detections into its action requests, in the same way for
both, so a rule that fires at the edge asks for exactly the command (under
exactly the same ``request_id``) that it would ask for in the cloud.

Example::

    >>> from datetime import UTC, datetime
    >>> from operators.cep_patterns import PatternSet
    >>> p = PatternSet.from_dict([{"name": "smoke", "kind": "threshold", "condition": "smoke > 0",
    ...     "actions": [{"type": "command", "device": "valve-{key}", "name": "close"}]}]).patterns[0]
    >>> d = Detection(rule="smoke", key="k1", ts=datetime(2026, 1, 1, tzinfo=UTC))
    >>> [(r.request_id, r.device_id, r.name) for r in expand_actions(p, [d])]
    [('smoke|k1|1767225600000|0', 'valve-k1', 'close')]
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from iotflow.events import Detection, to_ms

if TYPE_CHECKING:  # or its msgspec mirror (operators.cep_lean): actions go by type
    from operators.cep_patterns import Pattern

__all__ = ["CommandRequest", "TimedOutMatch", "TwinUpdate", "expand_actions"]


class CommandRequest(msgspec.Struct, frozen=True):
    """A command a pattern asks for (``type: command`` action), ``{key}`` substituted.

    ``request_id`` is deterministic (pattern, key, detection time, action
    index), so a replay after recovery asks for the same command again under
    the same id and the orchestrator can de-duplicate it.
    """

    request_id: str
    pattern: str
    key: str
    device_id: str
    name: str
    params: dict[str, Any]
    ts: datetime
    ttl_s: float


class TwinUpdate(msgspec.Struct, frozen=True):
    """A twin update a pattern asks for (``type: twin_update`` action)."""

    request_id: str
    pattern: str
    key: str
    device_id: str
    properties: dict[str, Any]
    ts: datetime


class TimedOutMatch(msgspec.Struct, frozen=True):
    """A partial sequence match that can no longer complete.

    ``reason``: ``within`` (its time ran out), ``capacity`` (the oldest of too
    many partial matches of a key) or ``end_of_input`` (no ``within``; input ended).
    ``events`` lists the matched events so far as ``{"step", "ts_ms"}``.
    """

    pattern: str
    key: str
    started: datetime
    timed_out_at: datetime
    reason: str
    events: list[dict[str, Any]]


def expand_actions(pattern: Pattern, items: list[Any]) -> list[Any]:
    """Each detection of ``items`` followed by its action requests, in declaration order.

    A ``detect`` action keeps the detection itself; ``command`` and ``twin_update``
    become ``CommandRequest``/``TwinUpdate`` with ``{key}``/``{pattern}`` substituted
    and ``request_id = pattern|key|ts_ms|action index``. Other items pass through.
    """
    if not items:
        return []
    actions = pattern.actions
    if len(actions) == 1 and actions[0].type == "detect":
        return items
    out: list[Any] = []
    for item in items:
        if not isinstance(item, Detection):
            out.append(item)
            continue
        for i, action in enumerate(actions):
            if action.type == "detect":
                out.append(item)
                continue
            subst = {"{key}": item.key, "{pattern}": pattern.name}
            request_id = f"{pattern.name}|{item.key}|{to_ms(item.ts)}|{i}"
            device = _substitute(action.device, subst)
            if action.type == "command":
                out.append(
                    CommandRequest(
                        request_id=request_id,
                        pattern=pattern.name,
                        key=item.key,
                        device_id=device,
                        name=_substitute(action.name, subst),
                        params=_substitute(action.params, subst),
                        ts=item.ts,
                        ttl_s=action.ttl.total_seconds(),
                    )
                )
            elif action.type == "twin_update":
                out.append(
                    TwinUpdate(
                        request_id=request_id,
                        pattern=pattern.name,
                        key=item.key,
                        device_id=device,
                        properties=_substitute(action.properties, subst),
                        ts=item.ts,
                    )
                )
    return out


def _substitute(value: Any, subst: dict[str, str]) -> Any:
    # plain text replacement of the two placeholders (never str.format on user text)
    if isinstance(value, str):
        for token, text in subst.items():
            value = value.replace(token, text)
        return value
    if isinstance(value, dict):
        return {k: _substitute(v, subst) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, subst) for v in value]
    return value
