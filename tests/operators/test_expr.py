"""The safe expression language: whitelist, positions in errors, and both backends agreeing."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from iotflow.errors import ConfigError
from operators.expr import MAX_LENGTH, Expr


def on_frame(expr: Expr, rows: list[dict[str, Any]]) -> list[Any]:
    frame = pl.DataFrame(rows)
    return frame.select(expr.to_polars().alias("out"))["out"].to_list()


# -- parsing ------------------------------------------------------------------------


def test_names_and_kind() -> None:
    e = Expr.parse("max_temp - min_temp > 5")
    assert e.names == {"max_temp", "min_temp"}
    assert e.is_condition
    assert not Expr.parse("power_sum / device_count").is_condition
    assert Expr.parse("is_null(x)").is_condition
    assert Expr.parse("True").is_condition


def test_equality_ignores_whitespace_and_keeps_text() -> None:
    a, b = Expr.parse("a>1"), Expr.parse("  a  >  1 ")
    assert a == b and hash(a) == hash(b)
    assert a != Expr.parse("a >= 1")
    assert str(b) == "  a  >  1 "


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("x.real", "attribute access (.) is not allowed (column 1)"),
        ("x[0]", "subscript ([]) is not allowed (column 1)"),
        ("a @ b", "operator '@' is not allowed (column 3)"),
        ("(a + b) // 2", "operator '//' is not allowed (column 9)"),
        ("a & b", "operator '&' is not allowed (column 3)"),
        ("~a", "operator '~' is not allowed (column 1)"),
        ("__import__('os')", "function '__import__' is not allowed (column 1)"),
        ("open('f')", "function 'open' is not allowed"),
        ("(lambda: 1)()", "calling anything but a named function"),
        ("lambda: 1", "lambda is not allowed"),
        ("a if b else c", "conditional expression"),
        ("[a for a in b]", "list comprehension"),
        ("(1, 2)", "tuple is not allowed"),
        ("{'a': 1}", "dict literal"),
        ("f'{a}'", "f-string"),
        ("(y := 3)", "assignment (:=)"),
        ("a in b", "comparison 'in' is not allowed"),
        ("a is b", "comparison 'is' is not allowed"),
        ("None", "None is not allowed (column 1); test for a missing value with is_null(x)"),
        ("b'x' == a", "literal b'x' is not allowed"),
        ("sqrt(x=1)", "keyword arguments to sqrt() are not allowed"),
        ("abs(a, b)", "abs() takes 1 argument(s), got 2"),
        ("min(a)", "min() takes at least 2 argument(s), got 1"),
        ("a and 3", "'and' needs conditions but gets a number (column 7)"),
        ("not temp + 1", "'not' needs conditions but gets a number"),
        ("'a' + 1", "'+' needs numbers but gets a string (column 1)"),
        ("1 == 'x'", "comparing a string with a number (column 1); quote both or neither"),
        ("(a > 1) * 2", "'*' needs numbers but gets a condition"),
        ("sqrt('x')", "'sqrt()' needs numbers but gets a string"),
        ("a >", "syntax error"),
        ("a = 1", "syntax error"),
    ],
)
def test_rejected_constructs_name_the_construct_and_position(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Expr.parse(text)
    assert fragment in str(info.value)
    assert repr(text) in str(info.value)


def test_a_column_may_be_compared_with_strings_and_numbers_in_one_expression() -> None:
    e = Expr.parse("kind == 'sent' or kind == 1")
    assert e.string_names == {"kind"}


def test_position_on_a_later_line_and_after_non_ascii() -> None:
    with pytest.raises(ConfigError, match=r"line 2, column 3"):
        Expr.parse("(a +\n  b.c)")
    with pytest.raises(ConfigError, match=r"column 9\)"):  # characters, not UTF-8 bytes
        Expr.parse("'éé' == a.b")


@pytest.mark.parametrize("bad", ["", "   ", 3, None])
def test_empty_or_non_text_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="expression"):
        Expr.parse(bad)


def test_too_long_or_too_deep_is_refused_not_crashed() -> None:
    with pytest.raises(ConfigError, match=f"limit of {MAX_LENGTH}"):
        Expr.parse("a + " * 600 + "a")
    with pytest.raises(ConfigError):
        Expr.parse("-" * 200 + "a")
    assert Expr.parse("(" * 150 + "a" + ")" * 150) == Expr.parse("a")  # parentheses add no depth
    with pytest.raises(ConfigError):
        Expr.parse("(" * 300 + "a" + ")" * 300)  # the parser's own limit, translated


# -- scalar evaluation -----------------------------------------------------------------


def test_kpi_and_hand_computed_values() -> None:
    assert (
        Expr.parse("power_sum / device_count").evaluate({"power_sum": 90, "device_count": 4})
        == 22.5
    )
    assert Expr.parse("2 ** 10 % 1000 - -3").evaluate({}) == 27.0
    assert Expr.parse("abs(a) + sqrt(16) + floor(2.7) + ceil(2.1)").evaluate({"a": -1}) == 10.0
    assert Expr.parse("max(a, b, 7) - min(a, b)").evaluate({"a": 1.0, "b": 5.0}) == 6.0
    assert Expr.parse("log(exp(2))").evaluate({}) == pytest.approx(2.0)
    assert Expr.parse("log10(1000)").evaluate({}) == pytest.approx(3.0)
    assert Expr.parse("coalesce(a, b, 0)").evaluate({"a": None, "b": 4.0}) == 4.0


def test_chained_comparison_and_strings() -> None:
    inside = Expr.parse("0 < x <= 5")
    assert [inside.evaluate({"x": v}) for v in (0, 0.1, 5, 5.01)] == [False, True, True, False]
    sent = Expr.parse("kind == 'sent' and retries < 3")
    assert sent.evaluate({"kind": "sent", "retries": 1}) is True
    assert sent.evaluate({"kind": "acked", "retries": 1}) is False
    assert Expr.parse("kind != 'sent'").evaluate({"kind": None}) is None


def test_null_propagates_and_logic_is_three_valued() -> None:
    assert Expr.parse("a + 1").evaluate({"a": None}) is None
    assert Expr.parse("a > 1").evaluate({"a": None}) is None
    assert Expr.parse("a > 1 and b > 1").evaluate({"a": None, "b": 0}) is False
    assert Expr.parse("a > 1 and b > 1").evaluate({"a": None, "b": 2}) is None
    assert Expr.parse("a > 1 or b > 1").evaluate({"a": None, "b": 2}) is True
    assert Expr.parse("not a > 1").evaluate({"a": None}) is None
    assert Expr.parse("is_null(a)").evaluate({"a": None}) is True
    assert Expr.parse("min(a, b)").evaluate({"a": None, "b": 3.0}) == 3.0


def test_nan_input_counts_as_missing_and_ieee_inside() -> None:
    assert Expr.parse("a > 1").evaluate({"a": math.nan}) is None
    assert Expr.parse("is_null(a)").evaluate({"a": math.nan}) is True
    assert math.isnan(Expr.parse("a > 1").evaluate({"a": math.nan}, nan_as_null=False) and math.nan)
    assert Expr.parse("a / 0").evaluate({"a": 1.0}) == math.inf
    assert Expr.parse("a / 0").evaluate({"a": -1.0}) == -math.inf
    assert math.isnan(Expr.parse("0 / 0").evaluate({}))
    assert math.isnan(Expr.parse("sqrt(-1)").evaluate({}))
    assert Expr.parse("log(0)").evaluate({}) == -math.inf
    assert Expr.parse("10 ** 400").evaluate({}) == math.inf  # no big-int blowup
    assert math.isnan(Expr.parse("(-8) ** (1 / 3)").evaluate({}))  # no complex numbers
    # a NaN computed inside compares as polars does: above every number
    assert Expr.parse("0 / 0 > 1e308").evaluate({}) is True


def test_missing_name_and_wrong_types_are_clear() -> None:
    with pytest.raises(KeyError, match="reads 'b', which the row does not have"):
        Expr.parse("a + b").evaluate({"a": 1})
    with pytest.raises(TypeError, match="needs a number"):
        Expr.parse("a + 1").evaluate({"a": "x"})
    with pytest.raises(TypeError, match="cannot compare"):
        Expr.parse("a == 'x'").evaluate({"a": 1.0})
    with pytest.raises(TypeError, match="not a number, string, bool or None"):
        Expr.parse("a + 1").evaluate({"a": [1]})


def test_function_is_reusable() -> None:
    f = Expr.parse("a * 2").function()
    assert [f({"a": v}) for v in (1, 2.5, None)] == [2.0, 5.0, None]


# -- polars ------------------------------------------------------------------------------


def test_polars_over_a_frame_with_nulls_nan_and_strings() -> None:
    rows = [
        {"kind": "sent", "a": 3.0, "b": 1.0},
        {"kind": "acked", "a": None, "b": 2.0},
        {"kind": "sent", "a": math.nan, "b": 0.0},
    ]
    assert on_frame(Expr.parse("kind == 'sent' and a > 2"), rows) == [True, False, None]
    assert on_frame(Expr.parse("a / b"), rows) == [3.0, None, None]
    assert on_frame(Expr.parse("min(a, b)"), rows) == [1.0, 2.0, 0.0]
    assert on_frame(Expr.parse("floor(b) + count"), [{"b": 1.5, "count": 2}]) == [3.0]


def test_pydantic_field_accepts_text_and_dumps_it_back() -> None:
    class Rule(BaseModel):
        when: Expr

    rule = Rule.model_validate({"when": "t > 30"})
    assert rule.when == Expr.parse("t > 30")
    assert rule.model_dump(mode="json") == {"when": "t > 30"}
    with pytest.raises(ValueError, match="attribute access"):
        Rule.model_validate({"when": "t.x > 30"})


def test_the_language_alone_does_not_import_pydantic() -> None:
    # pydantic costs an edge gateway ~9 MiB: only declarations may bring it
    code = (
        "import sys; from operators.expr import Expr;"
        "Expr.parse('t > 1').function()({'t': 2});"
        "print('pydantic' in sys.modules, 'pydantic_core' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["False", "False"]


# -- property: both backends agree ----------------------------------------------------------

_NAMES = ("a", "b", "c")
_VALUES = st.one_of(
    st.none(),
    st.just(math.nan),
    st.just(0.0),
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
    st.sampled_from([math.inf, -math.inf, -1.0, 2.0]),
)


@st.composite
def numbers(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 2 or draw(st.booleans()):
        return draw(st.one_of(st.sampled_from(_NAMES), st.sampled_from(["0", "1", "2.5", "-3"])))
    shape = draw(st.sampled_from(["bin", "neg", "fn1", "fn2"]))
    if shape == "bin":
        op = draw(st.sampled_from(["+", "-", "*", "/", "%", "**"]))
        return f"({draw(numbers(depth + 1))} {op} {draw(numbers(depth + 1))})"
    if shape == "neg":
        return f"-{draw(numbers(depth + 1))}"
    if shape == "fn1":
        fn = draw(st.sampled_from(["abs", "sqrt", "log", "floor", "ceil", "exp", "log10"]))
        return f"{fn}({draw(numbers(depth + 1))})"
    fn = draw(st.sampled_from(["min", "max", "coalesce"]))
    return f"{fn}({draw(numbers(depth + 1))}, {draw(numbers(depth + 1))})"


@st.composite
def conditions(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 1 or draw(st.booleans()):
        if draw(st.booleans()):
            return f"is_null({draw(numbers())})"
        op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        return f"{draw(numbers())} {op} {draw(numbers())}"
    shape = draw(st.sampled_from(["and", "or", "not"]))
    if shape == "not":
        return f"not ({draw(conditions(depth + 1))})"
    return f"({draw(conditions(depth + 1))}) {shape} ({draw(conditions(depth + 1))})"


def same(x: Any, y: Any) -> bool:
    if x is None or y is None:
        return x is y
    if isinstance(x, bool) or isinstance(y, bool):
        return x == y
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return x == pytest.approx(y, rel=1e-9, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(numbers(), conditions()),
    st.lists(st.tuples(_VALUES, _VALUES, _VALUES), min_size=1, max_size=6),
)
def test_scalar_and_polars_agree(text: str, rows: list[tuple[Any, Any, Any]]) -> None:
    expr = Expr.parse(text)
    frame = pl.DataFrame(
        {name: [r[i] for r in rows] for i, name in enumerate(_NAMES)},
        schema={name: pl.Float64 for name in _NAMES},
    )
    vectorized = frame.with_columns(expr.to_polars().alias("out"))["out"].to_list()
    for row, got in zip(rows, vectorized, strict=True):
        scalar = expr.evaluate(dict(zip(_NAMES, row, strict=True)))
        assert same(scalar, got), (text, row, scalar, got)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_config_error(text: str) -> None:
    try:
        expr = Expr.parse(text)
    except ConfigError:
        return
    assert expr.names <= set(expr.names)
