"""CEP pattern declarations: pydantic models that load from dicts, JSON or YAML.

A ``PatternSet`` holds the patterns of one deployment; each pattern has a
``name``, a ``kind``, the ``input`` it listens to, conditions written in the
safe expression language of ``operators.expr`` and ``actions`` (emit a
detection, request a command, update a twin). The kinds:

=============  ==================================================================
``threshold``  ``condition`` holds for ``times`` consecutive events (windows)
``range``      max - min of ``value`` exceeds ``exceeds`` within ``within``
``sequence``   steps in order (``next``/``followed_by``, ``not_next``/``not_followed_by``),
               quantifiers ``times``/``one_or_more``/``optional``, optional ``within``
``absence``    no event (matching ``expect``) from a key for ``within``, or none
               within ``within`` after an event matching ``after``
``rate``       ``value`` rises (falls) faster than ``exceeds`` per ``per``
``correlation`` ``min_keys`` keys of one group (``group_by``: a dimension or a
               grouping set) match ``condition`` within ``within``
=============  ==================================================================

The engine (``operators.cep``) documents the exact semantics of each kind.
Durations are ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1h30m"``, ``"2d"`` or a
number of seconds, stored as ``timedelta``. A wrong declaration fails at load
time with a ``ConfigError`` naming the field.

Example::

    >>> ps = PatternSet.from_yaml('''
    ... patterns:
    ...   - name: hot
    ...     kind: threshold
    ...     input: windows
    ...     condition: temperature_avg > 30
    ...     times: 3
    ...   - name: door_then_motion
    ...     kind: sequence
    ...     within: 30s
    ...     steps:
    ...       - {name: opened, where: door == 1}
    ...       - {name: motion, where: motion > 0, contiguity: followed_by}
    ... ''')
    >>> [p.name for p in ps.patterns], ps.patterns[1].within
    (['hot', 'door_then_motion'], datetime.timedelta(seconds=30))
    >>> PatternSet.from_dict({"patterns": [{"name": "x", "kind": "threshold", "condition": "t > 1", "times": 0}]})
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: pattern declaration is invalid: patterns[0].threshold.times: Input should be greater than or equal to 1 (got 0)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from iotflow.declarations import load_file, parse_text, validate
from iotflow.durations import label as _label
from iotflow.durations import parse_duration
from operators.cep_lean import (
    BUILTIN_INPUT_FIELDS,
    AbsenceMethods,
    PatternSetMethods,
    ThresholdMethods,
    ValueMethods,
    check_names_and_inputs,
    check_placeholders,
    condition,
    not_negative,
    number,
    positive,
)
from operators.expr import Expr
from operators.groups import group_keys, set_label

__all__ = [
    "BUILTIN_INPUTS",
    "AbsencePattern",
    "Action",
    "CommandAction",
    "CorrelationPattern",
    "DetectAction",
    "InputSpec",
    "Pattern",
    "PatternSet",
    "RangePattern",
    "RatePattern",
    "SequencePattern",
    "Step",
    "ThresholdPattern",
    "TwinUpdateAction",
]


_SERIALIZE = PlainSerializer(_label, return_type=str)
Duration = Annotated[timedelta, BeforeValidator(parse_duration), _SERIALIZE]
PositiveDuration = Annotated[
    timedelta, BeforeValidator(lambda v: positive(parse_duration(v))), _SERIALIZE
]
Lateness = Annotated[
    timedelta, BeforeValidator(lambda v: not_negative(parse_duration(v))), _SERIALIZE
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- actions -----------------------------------------------------------------------


class DetectAction(_Model):
    """Emit a ``Detection`` (to ``{prefix}.detections`` and the DuckDB ``detections`` table)."""

    type: Literal["detect"] = "detect"


class CommandAction(_Model):
    """Request a command; ``{key}`` and ``{pattern}`` in strings are substituted.

    The request goes to the command orchestrator; ``ttl`` becomes its expiry.
    """

    type: Literal["command"] = "command"
    device: str = "{key}"
    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    ttl: PositiveDuration = timedelta(seconds=60)

    @model_validator(mode="after")
    def _placeholders(self) -> CommandAction:
        check_placeholders(self.device, "device")
        check_placeholders(self.name, "name")
        check_placeholders(self.params, "params")
        return self


class TwinUpdateAction(_Model):
    """Request a twin update (desired/reported properties); placeholders as for commands."""

    type: Literal["twin_update"] = "twin_update"
    device: str = "{key}"
    properties: dict[str, Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _placeholders(self) -> TwinUpdateAction:
        check_placeholders(self.device, "device")
        check_placeholders(self.properties, "properties")
        return self


Action = Annotated[DetectAction | CommandAction | TwinUpdateAction, Field(discriminator="type")]

# -- patterns ------------------------------------------------------------------------

SkipStrategy = Literal["skip_past_last_event", "no_skip"]


class _PatternBase(_Model):
    name: str = Field(pattern=_NAME)
    input: str = Field("readings", pattern=_NAME)
    actions: list[Action] = Field(default_factory=lambda: [DetectAction()])
    description: str = ""

    # conditions(): the expressions a pattern evaluates, by a stable local name (each kind's)


class ThresholdPattern(_PatternBase, ThresholdMethods):
    """``condition`` holds for ``times`` consecutive events of a key.

    ``after_match``: ``skip_past_last_event`` (default) starts counting afresh
    after a detection (detections at N, 2N, ... consecutive events);
    ``no_skip`` detects at every event from the N-th on while the run lasts.
    ``value`` (a number expression) is reported as the detection's value.
    """

    kind: Literal["threshold"] = "threshold"
    condition: Expr
    times: int = Field(1, ge=1)
    value: Expr | None = None
    after_match: SkipStrategy = "skip_past_last_event"

    @field_validator("condition")
    @classmethod
    def _cond(cls, v: Expr) -> Expr:
        return condition(v, "condition")

    @field_validator("value")
    @classmethod
    def _value_is_number(cls, v: Expr | None) -> Expr | None:
        return None if v is None else number(v, "value")


class RangePattern(_PatternBase, ValueMethods):
    """``max(value) - min(value) > exceeds`` over a key's events less than ``within`` apart."""

    kind: Literal["range"] = "range"
    value: Expr
    exceeds: float = Field(ge=0, allow_inf_nan=False)
    within: PositiveDuration

    @field_validator("value")
    @classmethod
    def _value(cls, v: Expr) -> Expr:
        return number(v, "value")


class RatePattern(_PatternBase, ValueMethods):
    """``value`` changes faster than ``exceeds`` per ``per`` between consecutive events of a key.

    ``direction``: ``rises`` (default), ``falls`` or ``either``.
    """

    kind: Literal["rate"] = "rate"
    value: Expr
    exceeds: float = Field(ge=0, allow_inf_nan=False)
    per: PositiveDuration = timedelta(minutes=1)
    direction: Literal["rises", "falls", "either"] = "rises"

    @field_validator("value")
    @classmethod
    def _value(cls, v: Expr) -> Expr:
        return number(v, "value")


Contiguity = Literal["next", "followed_by", "not_next", "not_followed_by"]


class Step(_Model):
    """One step of a sequence: a named condition with its contiguity and quantifier.

    ``contiguity`` relates the step to the previous one, as in Flink CEP:
    ``next`` (strict: the very next event of the key), ``followed_by`` (relaxed:
    non-matching events in between are ignored), ``not_next`` / ``not_followed_by``
    (a negated step: the pattern fails if such an event comes next / comes before
    the following step). Quantifiers: ``times: n`` (exactly n), ``one_or_more``
    (``times`` or more, greedy), ``optional``; ``consecutive`` makes the
    repetitions strictly contiguous (Flink's ``consecutive()``).
    """

    name: str = Field(pattern=_NAME)
    where: Expr
    contiguity: Contiguity = "followed_by"
    times: int = Field(1, ge=1)
    one_or_more: bool = False
    optional: bool = False
    consecutive: bool = False

    @field_validator("where")
    @classmethod
    def _where(cls, v: Expr) -> Expr:
        return condition(v, "where")

    @property
    def negated(self) -> bool:
        return self.contiguity in ("not_next", "not_followed_by")

    @model_validator(mode="after")
    def _negated_has_no_quantifier(self) -> Step:
        if self.negated and (self.times != 1 or self.one_or_more or self.optional):
            raise ValueError(
                f"step {self.name!r} is negated ({self.contiguity}); it takes no times/one_or_more/optional"
            )
        return self


class SequencePattern(_PatternBase):
    """Steps in order within an optional time limit (Flink CEP semantics, see ``operators.cep``).

    ``within`` bounds first-to-last event (a partial match that runs out of time
    goes to the timed-out output); ``after_match`` is the skip strategy;
    ``max_partial_matches`` bounds the partial matches kept per key (the oldest
    is dropped to the timed-out output when a new one would exceed it).
    """

    kind: Literal["sequence"] = "sequence"
    steps: list[Step] = Field(min_length=1)
    within: PositiveDuration | None = None
    after_match: SkipStrategy = "skip_past_last_event"
    max_partial_matches: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _shape(self) -> SequencePattern:
        first = self.steps[0]
        if first.negated or first.optional:
            raise ValueError(
                f"steps[0] ({first.name!r}) cannot be negated or optional; a sequence starts with an event"
            )
        names = [s.name for s in self.steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"step names must be unique; repeated: {', '.join(dupes)}")
        for i, (a, b) in enumerate(zip(self.steps, self.steps[1:], strict=False)):
            if a.negated and b.negated:
                raise ValueError(
                    f"steps[{i}] and steps[{i + 1}] are both negated; put a positive step between them"
                )
            if b.negated and a.optional:
                raise ValueError(
                    f"steps[{i + 1}] ({b.name!r}) is negated after an optional step; make steps[{i}] required"
                )
        last = self.steps[-1]
        if last.contiguity == "not_next":
            raise ValueError(
                f"steps[{len(self.steps) - 1}] ({last.name!r}): a sequence cannot end with not_next; "
                "use not_followed_by with within"
            )
        if last.contiguity == "not_followed_by" and self.within is None:
            raise ValueError(
                f"within: steps[{len(self.steps) - 1}] ({last.name!r}) ends the sequence with "
                "not_followed_by, which needs a time limit; add e.g. within: 30s"
            )
        return self

    def conditions(self) -> dict[str, Expr]:
        return {f"step.{s.name}": s.where for s in self.steps}


class AbsencePattern(_PatternBase, AbsenceMethods):
    """Silence: no event (matching ``expect``) from a key for ``within``.

    Without ``after``: a heartbeat; the key goes silent once its last event
    is ``within`` old, detected once per silence. With ``after``: each event
    matching ``after`` must be followed by one matching ``expect`` (default:
    any event) less than ``within`` later (a command sent and no ack).
    """

    kind: Literal["absence"] = "absence"
    within: PositiveDuration
    expect: Expr | None = None
    after: Expr | None = None

    @field_validator("expect", "after")
    @classmethod
    def _conditions(cls, v: Expr | None, info: Any) -> Expr | None:
        return None if v is None else condition(v, info.field_name)


class CorrelationPattern(_PatternBase):
    """``min_keys`` distinct keys of one group match ``condition`` within ``within``.

    ``group_by`` names the group over the device mapping the engine is built
    with (``{"dev-1": {"zone": "z1"}}``): one dimension (``zone``) or a
    grouping set (``[building, floor]``), grouped as the group statistics and
    the peer rule group (``operators.groups``); a key without every dimension
    of the set is ``ungrouped``. The detection's key is the group: the value
    for one dimension (``z1``), the group key for a set (``building=A|floor=2``).

        >>> p = CorrelationPattern(name="surge", condition="t > 35", min_keys=2,
        ...                        within="1m", group_by=["building", "floor"])
        >>> p.groups({"a": {"building": "A", "floor": "2"}, "b": {"building": "A"}})
        {'a': 'building=A|floor=2'}
        >>> p.label
        'building+floor'
    """

    kind: Literal["correlation"] = "correlation"
    condition: Expr
    group_by: str | list[str]
    min_keys: int = Field(ge=1)
    within: PositiveDuration

    @field_validator("condition")
    @classmethod
    def _cond(cls, v: Expr) -> Expr:
        return condition(v, "condition")

    @field_validator("group_by")
    @classmethod
    def _group(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names or "" in names or len(set(names)) != len(names):
            msg = f"group_by={v!r} must name one dimension or distinct ones (e.g. zone or [building, floor])"
            raise ValueError(msg)
        return v

    @property
    def grouping_set(self) -> list[str]:
        """The dimensions of the group, as a grouping set."""
        return [self.group_by] if isinstance(self.group_by, str) else list(self.group_by)

    @property
    def label(self) -> str:
        """The grouping set's name (``zone``, ``building+floor``)."""
        return set_label(self.grouping_set)

    def groups(self, dimensions: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Key -> its group (the detection's key), for every key that has one."""
        if isinstance(self.group_by, str):
            name = self.group_by
            return {k: d[name] for k, d in dimensions.items() if name in d}
        return group_keys(dimensions, self.group_by)

    def conditions(self) -> dict[str, Expr]:
        return {"cond": self.condition}


Pattern = Annotated[
    ThresholdPattern
    | RangePattern
    | SequencePattern
    | AbsencePattern
    | RatePattern
    | CorrelationPattern,
    Field(discriminator="kind"),
]


class InputSpec(_Model):
    """Which column keys the events of an input and which one carries their time (epoch ms).

    ``start`` (optional) is the column with the start of the span an event
    covers (a window's start): ``threshold`` then counts only adjacent spans
    as consecutive.
    """

    key: str = Field(min_length=1)
    time: str = Field(min_length=1)
    start: str | None = None


BUILTIN_INPUTS: dict[str, InputSpec] = {
    name: InputSpec(**spec) for name, spec in BUILTIN_INPUT_FIELDS.items()
}


class PatternSet(_Model, PatternSetMethods):
    """The patterns of one deployment, plus the event-time settings they share.

    ``allowed_lateness`` holds the watermark back (out-of-order tolerance);
    ``max_future_skew`` rejects events stamped further than that ahead of the
    clock (they would drag the watermark into the future), ``None`` turns that
    check off. ``inputs`` declares inputs beyond the built-in ``readings``
    (device_id, ts_ms), ``windows`` (key, window_end_ms), ``commands`` (key, ts_ms).
    """

    patterns: list[Pattern] = Field(min_length=1)
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    allowed_lateness: Lateness = timedelta(0)
    max_future_skew: PositiveDuration | None = timedelta(hours=1)

    @model_validator(mode="after")
    def _names_and_inputs(self) -> PatternSet:
        check_names_and_inputs(self.patterns, self.all_inputs())
        return self

    def all_inputs(self) -> dict[str, InputSpec]:
        return {**BUILTIN_INPUTS, **self.inputs}

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> PatternSet:
        """Validate a dict (a list is taken as the patterns); raise ConfigError naming the field."""
        if isinstance(data, list):
            data = {"patterns": data}
        return validate(cls, data, "pattern")

    @classmethod
    def from_json(cls, text: str | bytes) -> PatternSet:
        return cls.from_dict(parse_text(text, "json", "pattern"))

    @classmethod
    def from_yaml(cls, text: str) -> PatternSet:
        return cls.from_dict(parse_text(text, "yaml", "pattern"))

    @classmethod
    def load(cls, path: str | Path) -> PatternSet:
        """Load ``.yaml``/``.yml`` or ``.json`` by extension."""
        return cls.from_dict(load_file(path, "pattern"))

    def build(self, resume_state: Any = None, now: Any = None, **kwargs: Any) -> Any:
        """``CepEngine`` for the patterns of one input; see ``operators.cep.CepEngine``."""
        from operators.cep import CepEngine  # the engine imports these declarations

        return CepEngine(self, resume_state, now=now, **kwargs)
