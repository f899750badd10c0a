"""The msgspec mirrors of the per-reading CEP patterns agree with the pydantic models."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotflow.errors import ConfigError
from iotflow.workflow_lean import dump, lean
from operators.cep_lean import LeanPatternSet, load_patterns
from operators.cep_patterns import PatternSet
from operators.cep_rows import SUPPORTED_KINDS
from tests.declfuzz import mutated, single_edits

SETS: list[dict[str, Any]] = [
    {
        "patterns": [
            {
                "name": "smoke",
                "kind": "threshold",
                "condition": "smoke > 0",
                "times": 2,
                "value": "smoke * 10",
                "after_match": "no_skip",
                "actions": [
                    {"type": "detect"},
                    {
                        "type": "command",
                        "device": "valve-{key}",
                        "name": "close",
                        "params": {"why": "{pattern}", "level": [1, 2]},
                        "ttl": "30s",
                    },
                    {"type": "twin_update", "properties": {"alarm": True}},
                ],
            },
            {
                "name": "heating",
                "kind": "rate",
                "value": "temperature",
                "exceeds": 2.5,
                "per": "1m",
                "direction": "either",
                "description": "fast change",
            },
            {"name": "quiet", "kind": "absence", "within": "30s", "expect": "battery > 0"},
        ],
        "allowed_lateness": "2s",
        "max_future_skew": 600,
    },
    {
        "patterns": [{"name": "hb", "kind": "absence", "within": 5, "input": "beats"}],
        "inputs": {"beats": {"key": "gw", "time": "at_ms", "start": None}},
        "max_future_skew": None,
    },
]


def _authority(data: Any) -> PatternSet | None:
    try:
        return PatternSet.from_dict(data)
    except ConfigError:
        return None


def _agree(data: Any) -> bool:
    """The mirror accepts nothing pydantic refuses, with the same dump and fingerprints;
    pydantic's own form of a per-reading set takes the mirror."""
    mirror = lean(LeanPatternSet, data)
    truth = _authority(data)
    if mirror is not None:
        assert truth is not None, f"the mirror accepted what pydantic refuses: {data!r}"
        assert dump(mirror) == truth.model_dump(mode="json")
        for name in {p.input for p in truth.patterns}:
            assert mirror.fingerprint(name) == truth.fingerprint(name)
    if truth is not None and all(
        p.kind in SUPPORTED_KINDS and getattr(p, "after", None) is None for p in truth.patterns
    ):
        canonical = truth.model_dump(mode="json")
        again = load_patterns(canonical)
        assert isinstance(again, LeanPatternSet) and dump(again) == canonical
    return mirror is not None


def test_the_examples_take_the_mirror() -> None:
    for data in SETS:
        assert isinstance(load_patterns(data), LeanPatternSet)
    assert isinstance(load_patterns(SETS[0]["patterns"]), LeanPatternSet)  # a list: the patterns


def test_every_single_edit_of_the_examples_agrees() -> None:
    taken = [_agree(data) for base in SETS for data in single_edits(base)]
    assert len(taken) > 1500 and 0.1 < sum(taken) / len(taken) < 0.9  # both sides exercised


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(st.sampled_from(SETS)))
def test_the_pattern_mirror_accepts_nothing_pydantic_refuses(data: Any) -> None:
    _agree(data)


def test_other_kinds_and_wrong_patterns_get_pydantics_verdict() -> None:
    seq = load_patterns(
        [{"name": "s", "kind": "sequence", "steps": [{"name": "a", "where": "t > 1"}]}]
    )
    assert isinstance(seq, PatternSet)  # the cloud's kinds: pydantic's model (RowEngine refuses it)
    after = load_patterns([{"name": "ack", "kind": "absence", "within": "5s", "after": "c > 0"}])
    assert isinstance(after, PatternSet)
    with pytest.raises(ConfigError, match="valid placeholders are"):
        load_patterns(
            [
                {
                    "name": "p",
                    "kind": "threshold",
                    "condition": "t > 1",
                    "actions": [{"type": "command", "name": "x", "device": "{device}"}],
                }
            ]
        )
    with pytest.raises(ConfigError, match=r"patterns\[0\]\.threshold\.times"):
        load_patterns([{"name": "x", "kind": "threshold", "condition": "t > 1", "times": 0}])


def test_loading_per_reading_patterns_imports_no_pydantic() -> None:
    code = (
        "import sys; from operators.cep_lean import load_patterns;"
        "from operators.cep_rows import RowEngine;"
        f"RowEngine(load_patterns({SETS[0]!r}));"
        "print('pydantic' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"
