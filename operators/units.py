"""Unit normalization declared per metric: ``{"from": "degF", "to": "degC"}``.

Each conversion is linear (``value * scale + offset``) between units of one
quantity; converting between quantities (``W`` to ``degC``) fails at load time
with the units that would work.

Example::

    >>> UnitConversion.model_validate({"from": "degF", "to": "degC"}).convert(212.0)
    100.0
    >>> UnitConversion.model_validate({"from": "W", "to": "kW"}).convert(1500.0)
    1.5
"""

from __future__ import annotations

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["UNITS", "UnitConversion"]

# unit -> (quantity, scale to the quantity's base unit, offset after scaling)
UNITS: dict[str, tuple[str, float, float]] = {
    "degC": ("temperature", 1.0, 0.0),
    "degF": ("temperature", 5 / 9, -32 * 5 / 9),
    "K": ("temperature", 1.0, -273.15),
    "W": ("power", 1.0, 0.0),
    "kW": ("power", 1000.0, 0.0),
    "MW": ("power", 1e6, 0.0),
    "Wh": ("energy", 1.0, 0.0),
    "kWh": ("energy", 1000.0, 0.0),
    "Pa": ("pressure", 1.0, 0.0),
    "hPa": ("pressure", 100.0, 0.0),
    "kPa": ("pressure", 1000.0, 0.0),
    "bar": ("pressure", 1e5, 0.0),
    "psi": ("pressure", 6894.757293168, 0.0),
    "mV": ("voltage", 0.001, 0.0),
    "V": ("voltage", 1.0, 0.0),
    "mA": ("current", 0.001, 0.0),
    "A": ("current", 1.0, 0.0),
    "percent": ("ratio", 0.01, 0.0),
    "ratio": ("ratio", 1.0, 0.0),
}


class UnitConversion(BaseModel):
    """Convert a metric from one unit to another of the same quantity."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    source: str = Field(alias="from")
    target: str = Field(alias="to")

    @model_validator(mode="after")
    def _same_quantity(self) -> UnitConversion:
        for unit in (self.source, self.target):
            if unit not in UNITS:
                raise ValueError(f"unknown unit {unit!r}; known units: {', '.join(UNITS)}")
        have, want = UNITS[self.source][0], UNITS[self.target][0]
        if have != want:
            same = [u for u, (q, _, _) in UNITS.items() if q == have]
            raise ValueError(
                f"cannot convert {self.source} ({have}) to {self.target} ({want}); "
                f"{self.source} converts to {', '.join(same)}"
            )
        return self

    def _linear(self) -> tuple[float, float]:
        _, s1, o1 = UNITS[self.source]
        _, s2, o2 = UNITS[self.target]
        # to base: x*s1 + o1; from base: (y - o2) / s2
        return s1 / s2, (o1 - o2) / s2

    def convert(self, value: float) -> float:
        scale, offset = self._linear()
        return round(value * scale + offset, 12)

    def expr(self, column: str) -> pl.Expr:
        """The polars expression converting ``column`` in place."""
        scale, offset = self._linear()
        return (pl.col(column) * scale + offset).alias(column)
