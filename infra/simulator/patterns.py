"""Value patterns: how one simulated metric moves over time.

A metric's value is its baseline plus the sum of its pattern components. Every
component is a pure function of the simulated time and of a random generator
that the caller seeds per reading, so the same seed and the same timestamps
give the same values.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ConstantPattern",
    "DriftPattern",
    "NoisePattern",
    "Pattern",
    "SinePattern",
    "SpikePattern",
]

_MS_PER_HOUR = 3_600_000


class _Component(BaseModel, ABC):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @abstractmethod
    def offset(self, rng: random.Random, now_ms: int, origin_ms: int) -> float:
        """What this component adds to the baseline at ``now_ms``."""


class ConstantPattern(_Component):
    """Sets the metric's baseline to ``value`` (replacing the device kind's default)."""

    kind: Literal["constant"] = "constant"
    value: float

    def offset(self, rng: random.Random, now_ms: int, origin_ms: int) -> float:
        return 0.0


class NoisePattern(_Component):
    """Gaussian noise with mean 0 and standard deviation ``std``."""

    kind: Literal["noise"] = "noise"
    std: float = Field(ge=0)

    def offset(self, rng: random.Random, now_ms: int, origin_ms: int) -> float:
        return rng.gauss(0.0, self.std)


class SinePattern(_Component):
    """``amplitude * sin(2*pi*(t_s + phase_s) / period_s)`` on absolute epoch time.

    Devices that share the pattern share the cycle, like a building's daily
    temperature swing.
    """

    kind: Literal["sine"] = "sine"
    period_s: float = Field(gt=0)
    amplitude: float
    phase_s: float = 0.0

    def offset(self, rng: random.Random, now_ms: int, origin_ms: int) -> float:
        angle = 2 * math.pi * (now_ms / 1000 + self.phase_s) / self.period_s
        return self.amplitude * math.sin(angle)


class SpikePattern(_Component):
    """Adds ``magnitude`` to a reading with probability ``probability``."""

    kind: Literal["spikes"] = "spikes"
    probability: float = Field(ge=0, le=1)
    magnitude: float

    def offset(self, rng: random.Random, now_ms: int, origin_ms: int) -> float:
        # Draw even when probability is 0 so other components see the same stream.
        return self.magnitude if rng.random() < self.probability else 0.0


class DriftPattern(_Component):
    """Grows by ``per_hour`` for every hour since the fleet's first reading."""

    kind: Literal["drift"] = "drift"
    per_hour: float

    def offset(self, rng: random.Random, now_ms: int, origin_ms: int) -> float:
        return self.per_hour * (now_ms - origin_ms) / _MS_PER_HOUR


Pattern = Annotated[
    ConstantPattern | NoisePattern | SinePattern | SpikePattern | DriftPattern,
    Field(discriminator="kind"),
]
"""One component of a metric's pattern, chosen by its ``kind`` field."""
