"""The per-user BC filter (BEHAVIOUR §5): examples per syntax element, errors, and a property test that
the parser agrees with an independent reference evaluator built from a generated syntax tree."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared.filters import SUPPORTED_FIELDS, parse_filter
from shared.model import UserSettings, ValidationError


def matches(expression: str, value: object) -> bool:
    return parse_filter({"city": expression}).matches({"city": value})


# --- examples per syntax element ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value", "expected"),
    [
        # plain value: exact and case-sensitive
        ("Oslo", "Oslo", True),
        ("Oslo", "oslo", False),
        ("Oslo", "Oslo ", False),
        ("New York", "New York", True),
        # | either/or
        ("Oslo|Bergen", "Bergen", True),
        ("Oslo|Bergen", "Trondheim", False),
        ("Oslo | Bergen ", "Bergen", True),  # spaces around operators are ignored, as in BC
        # <> not equal
        ("<>Oslo", "Bergen", True),
        ("<>Oslo", "Oslo", False),
        ("<> Oslo", "Oslo", False),
        # * wildcard anywhere
        ("Co*", "Contoso", True),
        ("Co*", "Fabrikam Co", False),
        ("*Co", "Fabrikam Co", True),
        ("*nto*", "Contoso", True),
        ("C*o*o", "Contoso", True),
        ("C*x*o", "Contoso", False),
        ("a*b*b", "ab", False),  # the middle 'b' may not reuse the final one
        ("a*b*b", "abb", True),
        ("*", "", True),
        ("<>A*", "Alpha", False),  # <> combined with a wildcard
        ("<>A*", "Beta", True),
        # '' blank, <>'' not blank
        ("''", "", True),
        ("''", None, True),  # a missing value is blank
        ("''", "x", False),
        ("<>''", "x", True),
        ("<>''", None, False),
        # @ case-insensitive, with wildcards and ranges
        ("@oslo", "OSLO", True),
        ("@man*", "Manchester", True),
        ("@man*", "Sportsman", False),
        ("@*man", "SPORTSMAN", True),
        ("<>@osl*", "OSLO", False),
        ("@straße", "STRASSE", True),  # casefold, not lower()
        ("@a..c", "B", True),
        ("@STRAßE..STRAßE", "Strasse", True),  # range bounds are casefolded too
        ("a..c", "B", False),  # plain string order: uppercase sorts before lowercase
        # ranges, inclusive, lexicographic
        ("Bicycle..Car", "Bus", True),
        ("Bicycle..Car", "Car", True),
        ("Bicycle..Car", "Cara", False),
        ("10000..10042", "100000", True),  # text ordering, as BC's docs warn
        ("P8..", "P9", True),
        ("..2500", "3", False),
        ("..M|T..", "N", False),
        ("..M|T..", "U", True),
        # quoting makes operator characters literal; '' inside quotes is a quote; * stays a wildcard
        ("'A|B'", "A|B", True),
        ("'A|B'", "A", False),
        ("'J & V*'", "J & V Trading", True),
        ("'O''Brien'", "O'Brien", True),
        ("' Oslo'", " Oslo", True),  # quotes keep leading spaces
        ("'a..b'", "a..b", True),
        ("'<>x'", "<>x", True),
        ("'100%'", "100%", True),
        ("@'j & v*'", "J & V Trading", True),
        ("'a'..'c'", "b", True),
    ],
)
def test_expression_examples(expression: str, value: str | None, expected: bool) -> None:
    assert matches(expression, value) is expected


@pytest.mark.parametrize(
    ("expression", "part"),
    [
        ("A&B", "'&'"),
        (">200", "'>'"),
        (">=200", "'>'"),
        ("<200", "'<'"),
        ("<=200", "'<'"),
        ("=Oslo", "'='"),
        ("(Oslo)", "'('"),
        ("Hans?n", "'?'"),
        ("'Hans?n'", "'?'"),
        ("%me", "'%'"),
        ("%1", "'%'"),
        ("a@b", "'@'"),
        ("@<>Oslo", "<>@"),
        ("a<>b", "'<>'"),
        ("O'Brien", "unbalanced quote"),
        ("O''Brien", "quote the whole value"),
        ("'abc", "unbalanced quote"),
        ("a||b", "empty alternative"),
        ("Oslo|", "empty alternative"),
        ("<>", "needs a value"),
        ("@", "needs a value"),
        ("..", "at least one side"),
        ("a..b..c", "single '..'"),
        ("a...b", "'...'"),
        ("<>a..c", "'<>' cannot be combined with a range"),
        ("a*..c", "'*' cannot be used in a range"),
        ("a\tb", "control character"),
        ("x" * 2049, "longer than"),
    ],
)
def test_unsupported_syntax_is_refused_naming_field_and_part(expression: str, part: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_filter({"companyName": expression})
    assert err.value.field == "filter.companyName"
    assert str(err.value).startswith("filter.companyName: ")
    assert part in err.value.message


def test_operator_characters_can_be_matched_by_quoting_what_the_error_suggests() -> None:
    with pytest.raises(ValidationError) as err:
        parse_filter({"companyName": "J&V"})
    assert "'J&V'" in err.value.message
    assert parse_filter({"companyName": "'J&V'"}).matches({"companyName": "J&V"})


def test_unknown_field_lists_the_supported_ones() -> None:
    with pytest.raises(ValidationError) as err:
        parse_filter({"email": "*@contoso.com"})
    assert err.value.field == "filter.email"
    assert "unsupported field" in err.value.message
    assert all(name in err.value.message for name in SUPPORTED_FIELDS)


@pytest.mark.parametrize("value", [None, 5, ["Oslo"], {"eq": "Oslo"}, True])
def test_non_text_expression_is_refused(value: object) -> None:
    with pytest.raises(ValidationError) as err:
        parse_filter({"city": value})
    assert err.value.field == "filter.city"


@pytest.mark.parametrize("spec", [["city"], "city=Oslo", 3])
def test_filter_must_be_an_object(spec: object) -> None:
    with pytest.raises(ValidationError) as err:
        parse_filter(spec)
    assert err.value.field == "filter"


@pytest.mark.parametrize("expression", ["", "   "])
def test_empty_expression_means_no_filter_on_that_field(expression: str) -> None:
    flt = parse_filter({"city": expression, "country": "NO"})
    assert flt.to_json() == {"country": "NO"}
    assert flt.matches({"city": "anything", "country": "NO"})
    assert parse_filter({"city": expression}).is_empty
    assert parse_filter({}).is_empty and parse_filter({}).matches({})


def test_fields_are_anded() -> None:
    flt = parse_filter({"companyName": "Contoso*|Fabrikam", "city": "<>Oslo"})
    assert flt.matches({"companyName": "Contoso Ltd", "city": "Bergen"})
    assert not flt.matches({"companyName": "Contoso Ltd", "city": "Oslo"})
    assert not flt.matches({"companyName": "Litware", "city": "Bergen"})
    assert flt.describe() == "companyName: Contoso*|Fabrikam; city: <>Oslo"


def test_every_supported_field_reads_the_bc_contact_field_of_that_name() -> None:
    contact = {name: f"v-{name}" for name in SUPPORTED_FIELDS}
    for name in SUPPORTED_FIELDS:
        assert parse_filter({name: f"v-{name}"}).matches(contact)
        assert not parse_filter({name: "other"}).matches(contact)


def test_settings_with_a_bad_filter_are_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        UserSettings.from_json({"user": "alice@contoso.com", "filter": {"city": ">Oslo"}})
    assert err.value.field == "filter.city"
    ok = UserSettings.from_json({"user": "alice@contoso.com", "filter": {"city": "<>Oslo"}})
    assert ok.filter == {"city": "<>Oslo"}


def test_pathological_wildcards_stay_fast() -> None:
    # A backtracking regex would take ages on this; the segment matcher is linear-ish.
    assert not matches("*a*a*a*a*a*a*a*a*a*a*a*b", "a" * 5000)


# --- reference evaluator over a generated syntax tree ---------------------------------------------


@dataclass(frozen=True)
class Eq:
    negate: bool
    ignore_case: bool
    segments: tuple[str, ...]  # the value split at '*'


@dataclass(frozen=True)
class Range:
    ignore_case: bool
    low: str | None
    high: str | None


Term = Eq | Range

# Letters of both cases (incl. ß and a non-BMP letter), digits, spaces, dots and every character
# that means something to the filter syntax except the two wildcards.
LITERAL_CHARS = "aAbBzZßé\U0001d49c09 .'|&()=<>%@-"


def wildcard_match(pattern: tuple[str, ...], text: str) -> bool:
    """Brute force over characters: a '*' token may absorb any number of characters."""
    tokens: list[str | None] = []  # None is '*'
    for i, seg in enumerate(pattern):
        if i:
            tokens.append(None)
        tokens.extend(seg)

    @cache
    def go(t: int, s: int) -> bool:
        if t == len(tokens):
            return s == len(text)
        if tokens[t] is None:
            return go(t + 1, s) or (s < len(text) and go(t, s + 1))
        return s < len(text) and text[s] == tokens[t] and go(t + 1, s + 1)

    return go(0, 0)


def reference(terms: list[Term], value: str) -> bool:
    def fold(s: str, ci: bool) -> str:
        return s.casefold() if ci else s

    for term in terms:
        v = fold(value, term.ignore_case)
        if isinstance(term, Eq):
            hit = wildcard_match(tuple(fold(s, term.ignore_case) for s in term.segments), v)
            if hit != term.negate:
                return True
        else:
            low = None if term.low is None else fold(term.low, term.ignore_case)
            high = None if term.high is None else fold(term.high, term.ignore_case)
            if (low is None or low <= v) and (high is None or v <= high):
                return True
    return False


literals = st.text(alphabet=LITERAL_CHARS, max_size=6)
spaces = st.sampled_from(["", " ", "  "])
eq_terms = st.builds(Eq, st.booleans(), st.booleans(), st.lists(literals, min_size=1, max_size=3).map(tuple))
range_terms = st.builds(Range, st.booleans(), st.none() | literals, st.none() | literals).filter(
    lambda r: r.low is not None or r.high is not None
)
expressions = st.lists(st.one_of(eq_terms, range_terms), min_size=1, max_size=4)


def render_value(draw: st.DrawFn, text: str) -> str:
    """Text of one value; quoted when it has to be (and sometimes when it need not be)."""
    must_quote = (
        text == ""
        or any(c in "|&()=<>%@'" for c in text)
        or text != text.strip(" ")
        or ".." in text
        or text.startswith(".")
        or text.endswith(".")
    )
    if must_quote or draw(st.booleans()):
        return "'" + text.replace("'", "''") + "'"
    return text


@st.composite
def rendered(draw: st.DrawFn) -> tuple[list[Term], str]:
    terms = draw(expressions)
    parts = []
    for term in terms:
        if isinstance(term, Eq):
            text = ("<>" + draw(spaces) if term.negate else "") + (
                "@" + draw(spaces) if term.ignore_case else ""
            )
            text += render_value(draw, "*".join(term.segments))
        else:
            low = "" if term.low is None else render_value(draw, term.low)
            high = "" if term.high is None else render_value(draw, term.high)
            text = (
                ("@" + draw(spaces) if term.ignore_case else "")
                + low
                + draw(spaces)
                + ".."
                + draw(spaces)
                + high
            )
        parts.append(text)
    joined = "".join(
        part + (draw(spaces) + "|" + draw(spaces) if i < len(parts) - 1 else "")
        for i, part in enumerate(parts)
    )
    return terms, draw(spaces) + joined + draw(spaces)


@st.composite
def candidate_values(draw: st.DrawFn, terms: list[Term]) -> list[str]:
    """Arbitrary values plus values built from the expression's own literals, so hits are common."""
    pieces = [s for t in terms for s in (t.segments if isinstance(t, Eq) else (t.low or "", t.high or ""))]
    built = st.lists(st.sampled_from(pieces) | literals, max_size=3).map("".join)
    swapped = built.map(str.swapcase)
    return draw(st.lists(literals | built | swapped, min_size=1, max_size=8))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parser_agrees_with_reference_evaluator(data: st.DataObject) -> None:
    terms, text = data.draw(rendered())
    flt = parse_filter({"city": text})
    for value in data.draw(candidate_values(terms)):
        assert flt.matches({"city": value}) is reference(terms, value), (text, value)


ANY_CHARS = LITERAL_CHARS + "*?\t"


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet=ANY_CHARS, max_size=25), st.lists(st.none() | st.text(alphabet=ANY_CHARS, max_size=8))
)
def test_accepted_expressions_never_fail_while_matching(expression: str, values: list[str | None]) -> None:
    try:
        flt = parse_filter({"city": expression})
    except ValidationError as err:
        assert err.field == "filter.city"
        return
    assume(not flt.is_empty)
    for value in [*values, 42, 3.5, True]:
        assert flt.matches({"city": value}) in (True, False)
        assert flt.matches({}) in (True, False)
