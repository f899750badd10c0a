"""A small, safe expression language for conditions and KPIs, parsed, never ``eval``-ed.

``Expr.parse(text)`` reads one expression with Python's own parser (``ast``, eval
mode) and accepts only a whitelist: numbers, ``'strings'``, ``True``/``False``,
column names, ``+ - * / % **``, unary ``-``/``+``, comparisons (chained ones too:
``0 < x <= 5``), ``and``/``or``/``not`` and calls of the functions in
``FUNCTIONS``. Anything else (attributes, subscripts, lambdas, keyword
arguments, unknown functions, ...) is rejected with a ``ConfigError`` that names
the construct and its column. Operand kinds are checked at parse time: strings
may only be compared, ``and``/``or``/``not`` take conditions, arithmetic takes
numbers.

One parsed expression compiles to both:

* ``to_polars()``: a ``polars.Expr`` (names become ``pl.col``) for vectorized
  evaluation over a frame;
* ``evaluate(mapping)`` / ``function()``: plain Python over a dict, for one row.

The two agree on every input (a property test checks it):

* a missing value (``None``/null) propagates: arithmetic and comparisons with
  it are null, ``and``/``or`` use three-valued (Kleene) logic, so
  ``null and False`` is ``False``; ``min``/``max`` skip nulls;
* input values that are NaN count as missing (``nan_as_null=True``, the
  default), so a NaN reading never satisfies a condition;
* float arithmetic is IEEE: ``x / 0`` is ``inf``, ``sqrt(-1)`` and ``0 / 0`` are
  NaN; a NaN *computed* inside an expression compares as polars does (equal to
  itself and greater than every number).
* a condition that comes out null does not hold (callers treat null as false).

Example::

    >>> e = Expr.parse("power_sum / device_count")
    >>> sorted(e.names)
    ['device_count', 'power_sum']
    >>> e.evaluate({"power_sum": 90.0, "device_count": 4})
    22.5
    >>> import polars as pl
    >>> df = pl.DataFrame({"power_sum": [90.0, 10.0], "device_count": [4, 0]})
    >>> df.select(e.to_polars().alias("kpi"))["kpi"].to_list()
    [22.5, inf]
    >>> cond = Expr.parse("kind == 'sent' and abs(delta) > 2")
    >>> cond.is_condition, cond.evaluate({"kind": "sent", "delta": -3.5})
    (True, True)
    >>> Expr.parse("x.__class__")
    Traceback (most recent call last):
    ...
    iotflow.errors.ConfigError: expression 'x.__class__': attribute access (.) is not allowed (column 1); use column names, numbers, 'strings', operators and the functions abs, ceil, coalesce, exp, floor, is_null, log, log10, max, min, sqrt
"""

from __future__ import annotations

import ast
import itertools
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from iotflow.errors import ConfigError

if TYPE_CHECKING:
    import polars as pl
    from pydantic import GetCoreSchemaHandler
    from pydantic_core import core_schema

# polars is imported only by ``to_polars``: the plain Python backend (``function``,
# ``evaluate``) runs on edge gateways without polars or numpy in the process.

__all__ = ["FUNCTIONS", "MAX_LENGTH", "Expr"]

MAX_LENGTH = 2000  # characters; longer text is refused before parsing
_MAX_DEPTH = 64  # nesting depth of the syntax tree; guards the recursive compilers

# name -> (min args, max args or None for any number)
FUNCTIONS: dict[str, tuple[int, int | None]] = {
    "abs": (1, 1),
    "ceil": (1, 1),
    "coalesce": (2, None),
    "exp": (1, 1),
    "floor": (1, 1),
    "is_null": (1, 1),
    "log": (1, 1),
    "log10": (1, 1),
    "max": (2, None),
    "min": (2, None),
    "sqrt": (1, 1),
}

_BINOPS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.Mod: "%",
    ast.Pow: "**",
}
_FORBIDDEN_BINOPS: dict[type, str] = {
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
}
_CMPOPS: dict[type, str] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_FRIENDLY: dict[type, str] = {
    ast.Attribute: "attribute access (.)",
    ast.Subscript: "subscript ([])",
    ast.Lambda: "lambda",
    ast.IfExp: "conditional expression (x if c else y)",
    ast.ListComp: "list comprehension",
    ast.SetComp: "set comprehension",
    ast.DictComp: "dict comprehension",
    ast.GeneratorExp: "generator expression",
    ast.List: "list literal",
    ast.Tuple: "tuple",
    ast.Set: "set literal",
    ast.Dict: "dict literal",
    ast.JoinedStr: "f-string",
    ast.NamedExpr: "assignment (:=)",
    ast.Starred: "starred argument (*)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slice",
}

# operand kinds, checked at parse time
_NUM, _BOOL, _STR, _ANY = "number", "condition", "string", "column"


def _allowed_summary() -> str:
    return "use column names, numbers, 'strings', operators and the functions " + ", ".join(
        sorted(FUNCTIONS)
    )


@dataclass(frozen=True, eq=False)
class Expr:
    """One parsed, validated expression. Build it with ``Expr.parse(text)``.

    ``text`` is the source as given, ``names`` the column names it reads
    (``string_names`` those compared with a string literal), ``is_condition``
    whether it yields a truth value (a comparison, ``and``, ``or``, ``not``,
    ``is_null``, ``True``/``False``). Two expressions are equal
    when their syntax trees are (``"a>1"`` equals ``"a > 1"``).
    """

    text: str
    names: frozenset[str]
    is_condition: bool
    string_names: frozenset[str]
    _tree: ast.expr = field(repr=False)
    _canonical: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> Expr:
        """Parse and validate ``text``; raise ``ConfigError`` naming what is wrong and where."""
        if isinstance(text, Expr):
            return text
        if not isinstance(text, str):
            raise ConfigError(
                f"expression {text!r} must be a string such as 'temperature > 30', "
                f"not {type(text).__name__}"
            )
        if not text.strip():
            raise ConfigError("expression is empty; write a condition such as 'temperature > 30'")
        if len(text) > MAX_LENGTH:
            raise ConfigError(
                f"expression of {len(text)} characters exceeds the limit of {MAX_LENGTH}; "
                "split it or compute a column upstream"
            )
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as exc:
            where = _where(text.strip(), exc.lineno or 1, (exc.offset or 1) - 1, byte_offset=False)
            msg = f"expression {text!r}: syntax error ({exc.msg}) {where}"
            raise ConfigError(msg) from None
        except (ValueError, RecursionError, MemoryError) as exc:
            msg = f"expression {text!r} cannot be parsed ({type(exc).__name__}); simplify it"
            raise ConfigError(msg) from None
        checker = _Checker(text.strip())
        kind = checker.check(tree, 0)
        return cls(
            text=text,
            names=frozenset(checker.names),
            is_condition=kind == _BOOL,
            string_names=frozenset(checker.string_names),
            _tree=tree,
            _canonical=ast.dump(tree, annotate_fields=False),
        )

    # -- polars --------------------------------------------------------------

    def to_polars(self, *, nan_as_null: bool = True) -> pl.Expr:
        """A polars expression computing this one over a frame's columns.

        With ``nan_as_null`` (the default) NaN in a float input column counts as
        null, as in ``evaluate``; pass ``False`` when the frame is already
        normalized (a little faster).
        """
        return _to_polars(self._tree, nan_as_null)

    # -- plain Python --------------------------------------------------------

    def function(self, *, nan_as_null: bool = True) -> Callable[[Mapping[str, Any]], Any]:
        """A plain Python function of one row (a mapping of column name -> value).

        A name missing from the mapping raises ``KeyError`` naming it.
        """
        compiled = _to_python(self._tree)

        def run(row: Mapping[str, Any]) -> Any:
            env: dict[str, Any] = {}
            for name in self.names:
                try:
                    value = row[name]
                except KeyError:
                    msg = f"expression {self.text!r} reads {name!r}, which the row does not have"
                    raise KeyError(msg) from None
                env[name] = _normalize(value, nan_as_null)
            return compiled(env)

        return run

    def evaluate(self, mapping: Mapping[str, Any], *, nan_as_null: bool = True) -> Any:
        """Evaluate over one row: a float, a bool, a string, or None (null)."""
        return self.function(nan_as_null=nan_as_null)(mapping)

    # -- identity ------------------------------------------------------------

    @property
    def canonical(self) -> str:
        """A whitespace-independent rendering of the syntax tree (for fingerprints)."""
        return self._canonical

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expr) and other._canonical == self._canonical

    def __hash__(self) -> int:
        return hash(self._canonical)

    def __str__(self) -> str:
        return self.text

    # pydantic: a field typed ``Expr`` accepts the text and serializes back to it. pydantic
    # is imported here, by pydantic itself, so the expression language alone does not load it
    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.parse,
            json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda e: e.text),
        )


def _where(text: str, lineno: int, col: int, *, byte_offset: bool = True) -> str:
    lines = text.splitlines() or [""]
    line = lines[min(lineno, len(lines)) - 1]
    if byte_offset:  # ast offsets count UTF-8 bytes; people count characters
        col = len(line.encode()[:col].decode(errors="ignore"))
    if len(lines) > 1:
        return f"(line {lineno}, column {col + 1})"
    return f"(column {col + 1})"


class _Checker:
    """Walks the tree once: rejects what is not whitelisted and infers operand kinds."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.names: set[str] = set()
        self.string_names: set[str] = set()

    def fail(self, node: ast.AST, what: str, hint: str | None = None) -> ConfigError:
        where = _where(self.text, getattr(node, "lineno", 1), getattr(node, "col_offset", 0))
        return ConfigError(
            f"expression {self.text!r}: {what} {where}; {hint or _allowed_summary()}"
        )

    def check(self, node: ast.AST, depth: int) -> str:
        if depth > _MAX_DEPTH:
            raise self.fail(node, f"nesting deeper than {_MAX_DEPTH} levels", "simplify it")
        d = depth + 1
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if isinstance(node, ast.Name):
            self.names.add(node.id)
            return _ANY
        if isinstance(node, ast.BinOp):
            op = type(node.op)
            if op not in _BINOPS:
                symbol = _FORBIDDEN_BINOPS.get(op, op.__name__)
                raise self.fail(self._op_node(node), f"operator {symbol!r} is not allowed")
            for side in (node.left, node.right):
                self._expect_number(side, self.check(side, d), _BINOPS[op])
            return _NUM
        if isinstance(node, ast.UnaryOp):
            kind = self.check(node.operand, d)
            if isinstance(node.op, ast.Not):
                self._expect_condition(node.operand, kind, "not")
                return _BOOL
            if isinstance(node.op, ast.USub | ast.UAdd):
                self._expect_number(node.operand, kind, "unary -")
                return _NUM
            raise self.fail(node, "operator '~' is not allowed")
        if isinstance(node, ast.BoolOp):
            word = "and" if isinstance(node.op, ast.And) else "or"
            for value in node.values:
                self._expect_condition(value, self.check(value, d), word)
            return _BOOL
        if isinstance(node, ast.Compare):
            return self._compare(node, d)
        if isinstance(node, ast.Call):
            return self._call(node, d)
        what = _FRIENDLY.get(type(node), f"{type(node).__name__} ")
        raise self.fail(node, f"{what.strip()} is not allowed")

    def _constant(self, node: ast.Constant) -> str:
        value = node.value
        if isinstance(value, bool):
            return _BOOL
        if isinstance(value, int | float):
            return _NUM
        if isinstance(value, str):
            return _STR
        if value is None:
            raise self.fail(node, "None is not allowed", "test for a missing value with is_null(x)")
        raise self.fail(node, f"literal {value!r} is not allowed")

    def _op_node(self, node: ast.BinOp) -> ast.AST:
        # point at the operator itself, not at the start of its left operand
        end = getattr(node.left, "end_col_offset", None)
        if end is None or node.left.end_lineno != node.lineno:
            return node
        line = self.text.splitlines()[node.lineno - 1].encode()
        gap = line[end:]
        skipped = len(gap) - len(gap.lstrip(b" ()"))
        pointer = ast.Name(id="_")
        pointer.lineno, pointer.col_offset = node.lineno, end + skipped
        return pointer

    def _expect_number(self, node: ast.AST, kind: str, op: str) -> None:
        if kind in (_STR, _BOOL):
            raise self.fail(
                node,
                f"{op!r} needs numbers but gets a {kind}",
                "strings may only be compared (kind == 'sent'); combine conditions with and/or",
            )

    def _expect_condition(self, node: ast.AST, kind: str, op: str) -> None:
        if kind in (_STR, _NUM):
            raise self.fail(
                node,
                f"{op!r} needs conditions but gets a {kind}",
                "compare first, e.g. 'temperature > 30 and humidity < 20'",
            )

    def _compare(self, node: ast.Compare, d: int) -> str:
        kinds = [self.check(node.left, d)]
        for op, right in zip(node.ops, node.comparators, strict=True):
            if type(op) not in _CMPOPS:
                symbol = {ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
                raise self.fail(
                    node, f"comparison {symbol.get(type(op), type(op).__name__)!r} is not allowed"
                )
            kinds.append(self.check(right, d))
        for left, right in itertools.pairwise(kinds):
            if {left, right} == {_STR, _NUM}:
                raise self.fail(node, "comparing a string with a number", "quote both or neither")
        if _STR in kinds:
            terms = [node.left, *node.comparators]
            self.string_names.update(t.id for t in terms if isinstance(t, ast.Name))
        return _BOOL

    def _call(self, node: ast.Call, d: int) -> str:
        if not isinstance(node.func, ast.Name):
            raise self.fail(node, "calling anything but a named function is not allowed")
        name = node.func.id
        if name not in FUNCTIONS:
            raise self.fail(node, f"function {name!r} is not allowed")
        if node.keywords:
            raise self.fail(node, f"keyword arguments to {name}() are not allowed")
        low, high = FUNCTIONS[name]
        count = len(node.args)
        if count < low or (high is not None and count > high):
            wanted = f"{low}" if low == high else f"at least {low}"
            raise self.fail(node, f"{name}() takes {wanted} argument(s), got {count}")
        kinds = [self.check(arg, d) for arg in node.args]
        if name == "is_null":
            return _BOOL
        if name == "coalesce":
            known = {k for k in kinds if k != _ANY}
            return known.pop() if len(known) == 1 else _ANY
        for arg, kind in zip(node.args, kinds, strict=True):
            self._expect_number(arg, kind, f"{name}()")
        return _NUM


# -- the polars backend --------------------------------------------------------

_PL_UNARY: dict[str, Callable[[Any], Any]] = {
    "abs": lambda e: e.abs(),
    "ceil": lambda e: e.ceil(),
    "exp": lambda e: e.exp(),
    "floor": lambda e: e.floor(),
    "log": lambda e: e.log(),
    "log10": lambda e: e.log10(),
    "sqrt": lambda e: e.sqrt(),
    "is_null": lambda e: e.is_null(),
}


def _nan_to_null(series: pl.Series) -> pl.Series:
    return series.fill_nan(None) if series.dtype.is_float() else series


def _pl_number(e: pl.Expr) -> pl.Expr:
    import polars as pl

    # floor/ceil/log of an integer column need floats in polars
    return e.cast(pl.Float64)


def _to_polars(node: ast.expr, nan_as_null: bool) -> pl.Expr:
    import polars as pl

    def go(n: ast.expr) -> pl.Expr:
        if not _reads_columns(n):
            # fold constant parts here (with the scalar rules): polars 2.1 mis-sizes
            # comparisons between constant expressions and some column expressions
            value = _to_python(n)({})
            return pl.lit(value, dtype=pl.Float64) if isinstance(value, float) else pl.lit(value)
        if isinstance(n, ast.Name):
            col = pl.col(n.id)
            if nan_as_null:
                # a real Series step: polars mis-sizes `literal < x` when x is a
                # when/then (fill_nan) that comes out all null
                col = col.map_batches(_nan_to_null, is_elementwise=True)
            return col
        if isinstance(n, ast.BinOp):
            left, right = go(n.left), go(n.right)
            op = type(n.op)
            if op is ast.Add:
                return left + right
            if op is ast.Sub:
                return left - right
            if op is ast.Mult:
                return left * right
            if op is ast.Div:
                return _pl_number(left) / _pl_number(right)
            if op is ast.Mod:
                return _pl_number(left) % _pl_number(right)
            return _pl_number(left).pow(_pl_number(right))
        if isinstance(n, ast.UnaryOp):
            inner = go(n.operand)
            if isinstance(n.op, ast.Not):
                return ~inner
            return -inner if isinstance(n.op, ast.USub) else inner
        if isinstance(n, ast.BoolOp):
            parts = [go(v) for v in n.values]
            out = parts[0]
            for part in parts[1:]:
                out = (out & part) if isinstance(n.op, ast.And) else (out | part)
            return out
        if isinstance(n, ast.Compare):
            nodes = [n.left, *n.comparators]
            terms = [go(c) for c in nodes]
            tests = []
            for op, a, b, left, right in zip(
                n.ops, terms, terms[1:], nodes, nodes[1:], strict=False
            ):
                if not _reads_columns(left) and _reads_columns(right):
                    # columns on the left: polars 2.1 mis-sizes `constant < f(column)`
                    # for some f (coalesce, fill_nan) ("length 1 doesn't match")
                    tests.append(_pl_compare(_FLIPPED[type(op)], b, a))
                else:
                    tests.append(_pl_compare(type(op), a, b))
            out = tests[0]
            for test in tests[1:]:
                out = out & test
            return out
        if isinstance(n, ast.Call):
            name = n.func.id  # type: ignore[attr-defined]  # checked by _Checker
            args = [go(a) for a in n.args]
            if name == "min":
                return pl.min_horizontal(*[_pl_number(a) for a in args])
            if name == "max":
                return pl.max_horizontal(*[_pl_number(a) for a in args])
            if name == "coalesce":
                return pl.coalesce(*args)
            if name == "is_null":
                return args[0].is_null()
            return _PL_UNARY[name](_pl_number(args[0]))
        raise ConfigError(f"unsupported node {type(n).__name__}")  # unreachable after _Checker

    return go(node)


def _reads_columns(node: ast.AST) -> bool:
    functions = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    return any(isinstance(n, ast.Name) and id(n) not in functions for n in ast.walk(node))


_FLIPPED: dict[type, type] = {
    ast.Eq: ast.Eq,
    ast.NotEq: ast.NotEq,
    ast.Lt: ast.Gt,
    ast.LtE: ast.GtE,
    ast.Gt: ast.Lt,
    ast.GtE: ast.LtE,
}


def _pl_compare(op: type, a: pl.Expr, b: pl.Expr) -> pl.Expr:
    if op is ast.Eq:
        return a == b
    if op is ast.NotEq:
        return a != b
    if op is ast.Lt:
        return a < b
    if op is ast.LtE:
        return a <= b
    if op is ast.Gt:
        return a > b
    return a >= b


# -- the plain Python backend ----------------------------------------------------


def _normalize(value: Any, nan_as_null: bool) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    np = sys.modules.get("numpy")  # numpy scalars exist only where numpy is loaded
    if isinstance(value, int | float) or (
        np is not None and isinstance(value, np.integer | np.floating)
    ):
        number = float(value)
        if nan_as_null and math.isnan(number):
            return None
        return number
    if np is not None and isinstance(value, np.bool_):
        return bool(value)
    msg = f"value {value!r} of type {type(value).__name__} is not a number, string, bool or None"
    raise TypeError(msg)


def _num(x: Any, where: str) -> float | None:
    if x is None or (isinstance(x, float) and not isinstance(x, bool)):
        return x
    msg = f"{where} needs a number, got {x!r}"
    raise TypeError(msg)


def _key(x: Any) -> tuple[int, Any]:
    # polars orders NaN above every number and equal to itself
    if isinstance(x, float) and math.isnan(x):
        return (1, 0.0)
    return (0, x)


def _py_compare(op: type, a: Any, b: Any) -> bool | None:
    if a is None or b is None:
        return None
    if isinstance(a, str) != isinstance(b, str):
        msg = f"cannot compare {a!r} with {b!r}: a string with a number"
        raise TypeError(msg)
    if (isinstance(a, bool) and isinstance(b, bool)) or isinstance(a, str):
        ka, kb = (0, a), (0, b)
    else:
        ka, kb = _key(float(a)), _key(float(b))
    if op is ast.Eq:
        return ka == kb
    if op is ast.NotEq:
        return ka != kb
    if op is ast.Lt:
        return ka < kb
    if op is ast.LtE:
        return ka <= kb
    if op is ast.Gt:
        return ka > kb
    return ka >= kb


def _truth(x: Any, where: str) -> bool | None:
    if x is None or isinstance(x, bool):
        return x
    msg = f"{where} needs a condition (true/false), got {x!r}"
    raise TypeError(msg)


def _kleene_and(values: list[bool | None]) -> bool | None:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _kleene_or(values: list[bool | None]) -> bool | None:
    if any(v is True for v in values):
        return True
    return None if any(v is None for v in values) else False


def _f(fn: Callable[..., float]) -> Callable[..., float | None]:
    def apply(*args: float | None) -> float | None:
        if any(a is None for a in args):
            return None
        return fn(*args)

    return apply


# IEEE 754 float arithmetic as polars does it (inf and NaN instead of exceptions), in
# plain Python so that evaluating an expression needs neither numpy nor polars.


def _div(a: float, b: float) -> float:
    if b == 0.0:
        if a == 0.0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def _floor(x: float) -> float:
    if math.isinf(x) or math.isnan(x) or x == 0.0:
        return x
    return float(math.floor(x))


def _ceil(x: float) -> float:
    if math.isinf(x) or math.isnan(x) or x == 0.0:
        return x
    out = float(math.ceil(x))
    return -0.0 if out == 0.0 and x < 0.0 else out


def _mod(a: float, b: float) -> float:
    # polars' float modulo: a - b * floor(a / b), inf and NaN alike
    return a - b * _floor(_div(a, b))


def _odd_integer(x: float) -> bool:
    return math.isfinite(x) and x.is_integer() and int(x) % 2 == 1


def _pow(a: float, b: float) -> float:
    try:
        return math.pow(a, b)
    except OverflowError:
        return -math.inf if a < 0.0 and _odd_integer(b) else math.inf
    except ValueError:
        if a == 0.0:  # zero to a negative power
            negative = math.copysign(1.0, a) < 0.0 and _odd_integer(b)
            return -math.inf if negative else math.inf
        return math.nan  # a negative number to a fractional power


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _logarithm(fn: Callable[[float], float]) -> Callable[[float], float]:
    def log(x: float) -> float:
        if x == 0.0:
            return -math.inf
        if x < 0.0:
            return math.nan
        return fn(x)

    return log


def _sqrt(x: float) -> float:
    return math.nan if x < 0.0 else math.sqrt(x)


_PY_BINOPS: dict[type, Callable[[Any, Any], float | None]] = {
    ast.Add: _f(lambda a, b: a + b),
    ast.Sub: _f(lambda a, b: a - b),
    ast.Mult: _f(lambda a, b: a * b),
    ast.Div: _f(_div),
    ast.Mod: _f(_mod),
    ast.Pow: _f(_pow),
}
_PY_UNARY: dict[str, Callable[[Any], float | None]] = {
    "abs": _f(abs),
    "ceil": _f(_ceil),
    "exp": _f(_exp),
    "floor": _f(_floor),
    "log": _f(_logarithm(math.log)),
    "log10": _f(_logarithm(math.log10)),
    "sqrt": _f(_sqrt),
}


def _extreme(values: list[Any], lower: bool) -> float | None:
    # as polars' min/max_horizontal: nulls are skipped, NaN only wins when alone,
    # and on a tie the later argument wins (it decides the sign of a zero)
    present = [v for v in values if v is not None]
    if not present:
        return None
    numbers = [v for v in present if not math.isnan(v)]
    if not numbers:
        return math.nan
    best = numbers[0]
    for v in numbers[1:]:
        if (v <= best) if lower else (v >= best):
            best = v
    return best


def _to_python(node: ast.expr) -> Callable[[dict[str, Any]], Any]:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return lambda env: value
    if isinstance(node, ast.Name):
        name = node.id
        return lambda env: env[name]
    if isinstance(node, ast.BinOp):
        left, right = _to_python(node.left), _to_python(node.right)
        fn = _PY_BINOPS[type(node.op)]
        symbol = _BINOPS[type(node.op)]
        return lambda env: fn(_num(left(env), symbol), _num(right(env), symbol))
    if isinstance(node, ast.UnaryOp):
        inner = _to_python(node.operand)
        if isinstance(node.op, ast.Not):

            def negate(env: dict[str, Any]) -> bool | None:
                v = _truth(inner(env), "not")
                return None if v is None else not v

            return negate
        if isinstance(node.op, ast.USub):

            def minus(env: dict[str, Any]) -> float | None:
                v = _num(inner(env), "unary -")
                return None if v is None else -v

            return minus
        return lambda env: _num(inner(env), "unary +")
    if isinstance(node, ast.BoolOp):
        parts = [_to_python(v) for v in node.values]
        word = "and" if isinstance(node.op, ast.And) else "or"
        combine = _kleene_and if word == "and" else _kleene_or
        return lambda env: combine([_truth(p(env), word) for p in parts])
    if isinstance(node, ast.Compare):
        terms = [_to_python(node.left), *(_to_python(c) for c in node.comparators)]
        ops = [type(op) for op in node.ops]

        def compare(env: dict[str, Any]) -> bool | None:
            values = [t(env) for t in terms]
            return _kleene_and(
                [_py_compare(op, a, b) for op, a, b in zip(ops, values, values[1:], strict=False)]
            )

        return compare
    if isinstance(node, ast.Call):
        name = node.func.id  # type: ignore[attr-defined]  # checked by _Checker
        args = [_to_python(a) for a in node.args]
        if name == "min":
            return lambda env: _extreme([_num(a(env), "min()") for a in args], True)
        if name == "max":
            return lambda env: _extreme([_num(a(env), "max()") for a in args], False)
        if name == "coalesce":

            def first(env: dict[str, Any]) -> Any:
                for a in args:
                    v = a(env)
                    if v is not None:
                        return v
                return None

            return first
        if name == "is_null":
            only = args[0]
            return lambda env: only(env) is None
        fn = _PY_UNARY[name]
        arg = args[0]
        return lambda env: fn(_num(arg(env), f"{name}()"))
    raise ConfigError(f"unsupported node {type(node).__name__}")  # unreachable after _Checker
