"""Device groups over dimensions: the one way every operator names a device's group.

A *grouping set* is a list of dimension names (``["zone"]``, ``["building",
"floor"]``); a device's group in it is the key ``zone=z1`` or
``building=A|floor=2`` built from its dimensions (device id -> ``{name:
value}``, e.g. from the registry's metadata, see ``dataflows.monitoring``). A
device without every dimension of the set has no group there. Window
statistics per group (``operators.aggregation``), their sharding
(``operators.steps``) and the peer rule (``operators.anomaly.PeerRule``) all
use these functions, so a peer group and the aggregate row of that group carry
the same key.

Pure Python, no polars, no numpy.

Example::

    >>> dims = {"t1": {"building": "A", "floor": "2"}, "t2": {"building": "A"}}
    >>> group_key(dims["t1"], ["building", "floor"])
    'building=A|floor=2'
    >>> group_keys(dims, ["building", "floor"])
    {'t1': 'building=A|floor=2'}
    >>> set_label(["building", "floor"])
    'building+floor'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["group_key", "group_keys", "set_label"]


def group_key(dimensions: Mapping[str, str], names: Sequence[str]) -> str | None:
    """The group key of a device with ``dimensions`` in the set ``names``; None when a
    dimension is missing."""
    parts = []
    for name in names:
        value = dimensions.get(name)
        if value is None:
            return None
        parts.append(f"{name}={value}")
    return "|".join(parts)


def group_keys(dimensions: Mapping[str, Mapping[str, str]], names: Sequence[str]) -> dict[str, str]:
    """Device id -> group key in the set ``names``, for every device that has one."""
    keys = {}
    for device, dims in dimensions.items():
        key = group_key(dims, names)
        if key is not None:
            keys[device] = key
    return keys


def set_label(names: Sequence[str]) -> str:
    """A grouping set's name in results: its dimensions joined by ``+``."""
    return "+".join(names)
