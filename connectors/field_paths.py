"""Parsed source-mapping paths (``topic[N]``, ``payload.a.b[0]``), without pydantic.

``connectors.mapping.SourceMapping`` (pydantic) declares a mapping; the
decoder reads messages through the ``FieldPath``s parsed here, so a process
that keeps the default mapping (the edge gateway) never loads pydantic.
``DEFAULT_DEVICE_ID`` and ``DEFAULT_TS`` are the mapping's defaults
(``{base}/devices/{id}/telemetry`` topics, a ``ts`` payload field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_DEVICE_ID", "DEFAULT_TS", "FieldPath", "is_missing"]

DEFAULT_DEVICE_ID = "topic[2]"
DEFAULT_TS = "payload.ts"
_TOPIC_RE = re.compile(r"topic\[(-?[0-9]+)\]")
_PAYLOAD_STEP_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_\-]*)((?:\[[0-9]+\])*)")
_INDEX_RE = re.compile(r"\[([0-9]+)\]")

_MISSING = object()


@dataclass(frozen=True)
class FieldPath:
    """A parsed mapping path: a topic level or a path into the payload."""

    source: str  # "topic" or "payload"
    steps: tuple[str | int, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        """Parse ``topic[N]`` or ``payload.a.b[0]``; raise ValueError naming the fix."""
        match = _TOPIC_RE.fullmatch(text)
        if match:
            return cls("topic", (int(match.group(1)),), text)
        if text == "payload":
            return cls("payload", (), text)
        if text.startswith("payload."):
            steps: list[str | int] = []
            for part in text[len("payload.") :].split("."):
                step = _PAYLOAD_STEP_RE.fullmatch(part)
                if step is None:
                    msg = (
                        f"path {text!r}: bad segment {part!r};"
                        " use names like payload.a.b or payload.a[0]"
                    )
                    raise ValueError(msg)
                steps.append(step.group(1))
                steps.extend(int(i) for i in _INDEX_RE.findall(step.group(2)))
            return cls("payload", tuple(steps), text)
        msg = f"path {text!r} is neither topic[N] nor payload.<field>"
        raise ValueError(msg)

    def get(self, levels: list[str], payload: Any) -> Any:
        """The value at this path, or the module's missing marker."""
        if self.source == "topic":
            try:
                return levels[int(self.steps[0])]
            except IndexError:
                return _MISSING
        value = payload
        for step in self.steps:
            if isinstance(step, int):
                if not isinstance(value, list) or step >= len(value):
                    return _MISSING
                value = value[step]
            else:
                if not isinstance(value, dict) or step not in value:
                    return _MISSING
                value = value[step]
        return value


def is_missing(value: Any) -> bool:
    return value is _MISSING
