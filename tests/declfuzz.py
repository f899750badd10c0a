"""Damaged valid declarations, for the property tests of the msgspec mirrors.

Near a valid declaration is where a mirror and its pydantic authority are most
likely to disagree. ``single_edits(base)`` lists every declaration one edit away
from ``base`` (each value replaced by each of ``EDGE_VALUES``, each key removed);
``mutated(base)`` draws up to three random edits anywhere (a value replaced by
junk, a key removed, a key added).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

__all__ = ["EDGE_VALUES", "JUNK", "mutated", "single_edits"]

EDGE_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    2**64,
    0.5,
    -0.0,
    float("inf"),
    float("-inf"),
    float("nan"),
    1e308,
    "",
    "a",
    "a\n",  # Python's $ matches before a final newline; pydantic's does not
    "1",
    "10s",
    "-1s",
    "0s",
    "P1D",
    "t > 1",
    "t + 1",
    "{bad}",
    "edge",
    [],
    ["a"],
    {},
    {"name": "a", "kind": "threshold"},
]

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(min_value=2**63, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "",
            "a",
            "a\n",  # Python's $ matches before a final newline; pydantic's does not
            "A-1",
            "10s",
            "-1s",
            "0s",
            "0",
            "1h30m",
            "P1D",
            "abc",
            "t > 1",
            "t + 1",
            "x.__class__",
            "{key}",
            "{bad}",
            "1e400",
            "edge",
            "auto",
            "nope",
            "readings",
            "stats",
            "windows",
            "no_skip",
            "rises",
            "detect",
            "command",
        ]
    ),
    st.lists(st.sampled_from(["a", "*", 1, "smoke"]), max_size=2),
    st.dictionaries(
        st.sampled_from(["name", "kind", "type", "x"]),
        st.sampled_from(["a", 1, None, "threshold"]),
        max_size=2,
    ),
)
_ADDED_KEYS = ["extra", "kind", "type", "version", "after", "inputs", "name", "input", "ttl"]


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _dicts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _dicts(v)


def _paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path (keys and indexes) of every value inside ``value``."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        yield (*at, key)
        if isinstance(v, dict | list):
            yield from _paths(v, (*at, key))


def single_edits(base: dict[str, Any]) -> Iterator[Any]:
    """Every declaration one edit away from ``base``."""
    for path in _paths(base):
        for value in [*EDGE_VALUES, _DELETE]:
            data = copy.deepcopy(base)
            node = data
            for key in path[:-1]:
                node = node[key]
            if value is _DELETE:
                if isinstance(node, dict):
                    del node[path[-1]]
            else:
                node[path[-1]] = value
            yield data


_DELETE = object()


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> Any:
    data = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        node = draw(st.sampled_from(list(_dicts(data))))
        edit = draw(st.sampled_from(["set", "delete", "add"]))
        if edit == "set" and node:
            node[draw(st.sampled_from(sorted(node)))] = draw(JUNK)
        elif edit == "delete" and node:
            del node[draw(st.sampled_from(sorted(node)))]
        else:
            node[draw(st.sampled_from(_ADDED_KEYS))] = draw(JUNK)
    return data
