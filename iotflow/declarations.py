"""Loading declarations (pydantic models) from dicts, JSON, YAML or files, with errors that name the field.

Example::

    >>> from pydantic import BaseModel
    >>> class W(BaseModel):
    ...     length: int
    >>> validate(W, {"length": "x"}, "window").__class__.__name__
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: window declaration is invalid: length: Input should be a valid integer, unable to parse string as an integer (got 'x')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from iotflow.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

__all__ = ["describe", "load_file", "parse_text", "validate"]

M = TypeVar("M", bound="BaseModel")


def describe(exc: ValidationError, what: str) -> str:
    """One line per error: where (``patterns[0].times``), what was wrong, the value given."""
    parts = []
    for err in exc.errors():
        loc = ""
        for item in err["loc"]:
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("value_error", "union_tag_invalid", "missing") and "input" in err:
            shown = err["input"]
            if not isinstance(shown, dict | list):
                msg += f" (got {shown!r})"
        parts.append(f"{loc or 'declaration'}: {msg}")
    return f"{what} declaration is invalid: " + "; ".join(parts)


def validate(model: type[M], data: Any, what: str) -> M:
    """``model`` from plain data; ConfigError naming every wrong field."""
    from pydantic import ValidationError  # loaded with the model anyway; file loading needs none

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, what)) from None


def parse_text(text: str | bytes, fmt: str, what: str) -> Any:
    """Plain data from JSON (``fmt="json"``) or YAML text; ConfigError when it does not parse.

    PyYAML is imported on the first YAML text only: an edge gateway whose
    declarations are JSON or dicts never loads it (about 0.9 MiB resident).
    """
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{what} file is not valid JSON: {exc}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} file is not valid YAML: {exc}") from None


def load_file(path: str | Path, what: str) -> Any:
    """Plain data from a ``.yaml``/``.yml`` or ``.json`` file (by extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{what} file {path} must end in .yaml, .yml or .json")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    return parse_text(text, "json" if suffix == ".json" else "yaml", what)
