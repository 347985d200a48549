"""Business Central filter expressions on BC contacts: the per-user filter of BEHAVIOUR §5.

Users already know BC's filter pane, so the settings take the same text a salesperson would type
there, e.g. ``{"companyName": "Contoso*|Fabrikam", "city": "<>Oslo"}``. This module supports the
subset of BC's syntax that BEHAVIOUR §5 promises, evaluates it against the BC API v2.0 contact JSON, and
refuses everything else with a ValidationError that names the field, so a filter is never silently
read differently from how BC would read it.

Syntax, as documented in BC's "Sort, search, and filter" page (MicrosoftDocs/dynamics365smb-docs
``business-central/ui-enter-criteria-filters.md``, section "Filter criteria and operators"):

- ``a|b``           either/or, any number of alternatives;
- ``<>a``           not equal; may be combined with ``*`` and ``@`` (``<>A*``: "the SQL Server option
                    lets you combine ``<>`` with a wildcard expression");
- ``*``             any run of characters (also none), anywhere in the value;
- ``''``            blank; ``<>''`` not blank;
- ``@a``            case-insensitive (``@man*``); also applies to a range (``@a..c``);
- ``a..b``, ``a..``, ``..b``   inclusive ranges, ordered lexicographically ("Text fields use
                    lexicographic ordering"): plain Python string order, or after casefold with ``@``;
- ``'…'``           quoting, so a value may contain ``& ( ) = |`` and the other operator characters.
                    ``''`` inside quotes is one quote. As in BC, ``*`` stays a wildcard inside quotes:
                    the docs filter "starts with J & V" as ``'J & V*'``.

Decisions where BC is lenient or unclear (documented here because users will hit them):

- Spaces around ``|``, ``..``, after ``<>``/``@`` and at both ends are ignored; spaces inside a value
  are kept. BC's own examples are written ``<=200 | >500`` and ``F.. & *A/S`` (Record.SetFilter /
  NAV SETFILTER page). Quote a value to keep leading or trailing spaces: ``' Oslo'``.
- An empty (or all-space) expression means "no filter on this field", as in AL:
  ``SetFilter(Field, '')`` applies no filter (dev-itpro ``methods-auto/record/record-setfilter-method.md``).
- Refused, with the field named: ``&``, ``<``, ``>``, ``<=``, ``>=``, ``=``, parentheses, the ``?``
  wildcard (also inside quotes, where BC still treats it as a wildcard), ``%`` tokens and ``%1``
  placeholders, ``@`` or a quote in the middle of an unquoted value, ``...``, wildcards in a range,
  ``<>`` with a range, empty alternatives (``a||b``), control characters. Quoting is the way to
  match any of these characters literally (except ``*`` and ``?``, as in BC).
- A missing or null contact value is blank ``''``; non-text values are compared as their ``str()``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import ValidationError

SUPPORTED_FIELDS = (
    "displayName",
    "companyName",
    "companyNumber",
    "number",
    "searchName",
    "jobTitle",
    "city",
    "state",
    "postalCode",
    "country",
)

# Long enough for any hand-written list of alternatives; short enough that a settings row stays small.
MAX_EXPRESSION_LENGTH = 2048

SUPPORTED_SYNTAX = (
    "a|b (or), <>a (not), * (wildcard), '' (blank), @ (case-insensitive), a..b (range), 'quoted text'"
)

# Characters that mean something to BC but are not supported here; outside quotes they are refused.
# Value: what BC reads the character as, and whether quoting the value makes it literal.
_UNSUPPORTED: dict[str, tuple[str, bool]] = {
    "&": ("'&' (and)", True),
    "(": ("'(' (grouping)", True),
    ")": ("')' (grouping)", True),
    "=": ("'=' (equal operator; a plain value already means equal)", True),
    "<": ("'<' / '<=' (less than; use a range ..b)", True),
    ">": ("'>' / '>=' (greater than; use a range a..)", True),
    "?": ("'?' (single-character wildcard; use '*')", False),
    "%": ("'%' (filter tokens such as %me and %1 placeholders)", True),
    "@": ("'@' inside a value ('@' is only a prefix)", True),
}


@dataclass(frozen=True)
class _Value:
    """A literal or wildcard pattern: the text split at each '*'. One segment means an exact value."""

    segments: tuple[str, ...]

    @property
    def text(self) -> str:
        return "*".join(self.segments)

    @property
    def has_wildcard(self) -> bool:
        return len(self.segments) > 1


@dataclass(frozen=True)
class _Term:
    """One alternative of an expression: a (negated) value/pattern, or an inclusive range.

    With `ignore_case` the stored segments and bounds are already casefolded, so matching only has
    to fold the contact's value.
    """

    negate: bool
    ignore_case: bool
    value: _Value | None = None  # equality or wildcard pattern (blank is the empty literal)
    low: str | None = None  # range bounds; None = open
    high: str | None = None
    is_range: bool = False

    def matches(self, text: str) -> bool:
        if self.ignore_case:
            text = text.casefold()
        if self.is_range:
            return (self.low is None or self.low <= text) and (self.high is None or text <= self.high)
        assert self.value is not None
        return _glob_match(self.value.segments, text) != self.negate


def _glob_match(segments: tuple[str, ...], text: str) -> bool:
    """'*'-only glob match without regex, so a pattern like *a*a*a*b cannot backtrack exponentially.

    The first segment must be a prefix and the last a suffix; taking each middle segment at its
    leftmost occurrence is always optimal because '*' can absorb any gap.
    """
    if len(segments) == 1:
        return text == segments[0]
    first, last = segments[0], segments[-1]
    if len(text) < len(first) + len(last) or not text.startswith(first) or not text.endswith(last):
        return False
    pos, end = len(first), len(text) - len(last)
    for seg in segments[1:-1]:
        found = text.find(seg, pos, end)
        if found < 0:
            return False
        pos = found + len(seg)
    return True


@dataclass(frozen=True)
class _FieldFilter:
    field: str
    expression: str  # as the user wrote it, spaces at both ends removed
    terms: tuple[_Term, ...]

    def matches(self, contact: Mapping[str, Any]) -> bool:
        raw = contact.get(self.field)
        text = "" if raw is None else raw if isinstance(raw, str) else str(raw)
        return any(term.matches(text) for term in self.terms)


@dataclass(frozen=True)
class ContactFilter:
    """A parsed per-user filter: every field's expression must match (fields are ANDed)."""

    fields: tuple[_FieldFilter, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.fields

    def matches(self, bc_contact: Mapping[str, Any]) -> bool:
        return all(f.matches(bc_contact) for f in self.fields)

    def to_json(self) -> dict[str, str]:
        """The effective filter (empty expressions dropped), e.g. for hashing the sync scope."""
        return {f.field: f.expression for f in self.fields}

    def describe(self) -> str:
        if self.is_empty:
            return "all contacts"
        return "; ".join(f"{f.field}: {f.expression}" for f in self.fields)


def parse_filter(spec: Any) -> ContactFilter:
    """Validate and compile a filter object ``{field: expression}``. Raises ValidationError."""
    if spec is None:
        return ContactFilter()
    if not isinstance(spec, Mapping):
        raise ValidationError("filter", "must be an object of field → Business Central filter expression")
    parsed: dict[str, _FieldFilter] = {}
    for name, expression in spec.items():
        if not isinstance(name, str):
            raise ValidationError("filter", "field names must be text")
        field = f"filter.{name}"
        if name not in SUPPORTED_FIELDS:
            raise ValidationError(field, f"unsupported field; supported: {', '.join(SUPPORTED_FIELDS)}")
        if not isinstance(expression, str):
            raise ValidationError(field, 'must be a text filter expression, e.g. "Contoso*|Fabrikam"')
        terms = _parse_expression(field, expression)
        if terms:
            parsed[name] = _FieldFilter(name, expression.strip(" "), terms)
    ordered = tuple(parsed[n] for n in SUPPORTED_FIELDS if n in parsed)
    return ContactFilter(ordered)


# --- parser ---------------------------------------------------------------------------------------

_PIPE, _DOTS, _TEXT, _QUOTED = "|", "..", "text", "quoted"


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    pos: int  # 0-based position in the expression, for error messages


def _syntax_error(field: str, message: str) -> ValidationError:
    return ValidationError(field, f"{message}. Supported: {SUPPORTED_SYNTAX}")


def _tokenize(field: str, expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(expr)
    text_start, buf = 0, list[str]()

    def flush() -> None:
        if buf:
            tokens.append(_Token(_TEXT, "".join(buf), text_start))
            buf.clear()

    while i < n:
        ch = expr[i]
        if ch == "'":
            flush()
            start, i, chars = i, i + 1, []
            while True:
                if i >= n:
                    msg = f"unbalanced quote at position {start + 1}; inside quotes write a quote as ''"
                    raise _syntax_error(field, msg)
                if expr[i] == "'":
                    if i + 1 < n and expr[i + 1] == "'":
                        chars.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                chars.append(expr[i])
                i += 1
            tokens.append(_Token(_QUOTED, "".join(chars), start))
            continue
        if ch == "|":
            flush()
            tokens.append(_Token(_PIPE, ch, i))
            i += 1
            continue
        if ch == "." and expr.startswith("..", i):
            flush()
            if expr.startswith("...", i):
                msg = f"'...' at position {i + 1} is ambiguous: quote a value that starts or ends with '.'"
                raise _syntax_error(field, msg)
            tokens.append(_Token(_DOTS, "..", i))
            i += 2
            continue
        if not buf:
            text_start = i
        buf.append(ch)
        i += 1
    flush()
    return tokens


def _parse_expression(field: str, expr: str) -> tuple[_Term, ...]:
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise ValidationError(field, f"filter expression is longer than {MAX_EXPRESSION_LENGTH} characters")
    for pos, ch in enumerate(expr):
        if unicodedata.category(ch) == "Cc":
            raise ValidationError(field, f"control character (U+{ord(ch):04X}) at position {pos + 1}")
    if not expr.strip(" "):
        return ()  # BC: an empty filter is no filter
    return tuple(_parse_term(field, alt) for alt in _split(_tokenize(field, expr), _PIPE))


def _split(tokens: list[_Token], kind: str) -> list[list[_Token]]:
    """The runs of tokens between the tokens of `kind` (alternatives at '|', range ends at '..')."""
    runs: list[list[_Token]] = [[]]
    for tok in tokens:
        if tok.kind == kind:
            runs.append([])
        else:
            runs[-1].append(tok)
    return runs


def _strip_outer_spaces(tokens: list[_Token]) -> list[_Token]:
    out = [t for t in tokens if not (t.kind == _TEXT and not t.text.strip(" "))]
    if out and out[0].kind == _TEXT:
        first = out[0]
        stripped = first.text.lstrip(" ")
        out[0] = _Token(_TEXT, stripped, first.pos + len(first.text) - len(stripped))
    if out and out[-1].kind == _TEXT:
        out[-1] = _Token(_TEXT, out[-1].text.rstrip(" "), out[-1].pos)
    return out


def _parse_term(field: str, tokens: list[_Token]) -> _Term:
    tokens = _strip_outer_spaces(tokens)
    if not tokens:
        raise _syntax_error(
            field, "empty alternative (as in 'a||b' or a trailing '|'); write '' for a blank value"
        )
    negate = ignore_case = False
    if tokens[0].kind == _TEXT:
        head = tokens[0]
        text, pos = head.text, head.pos
        if text.startswith("<>"):
            negate, text, pos = True, text[2:], pos + 2
        stripped = text.lstrip(" ")
        pos += len(text) - len(stripped)
        text = stripped
        if text.startswith("@"):
            ignore_case, text, pos = True, text[1:], pos + 1
            if text.lstrip(" ").startswith("<>"):
                raise _syntax_error(
                    field, "write '<>@value' (not '@<>value') for a case-insensitive 'not equal'"
                )
        tokens = _strip_outer_spaces([_Token(_TEXT, text, pos), *tokens[1:]])
    prefix = ("<>" if negate else "") + ("@" if ignore_case else "")

    parts = _split(tokens, _DOTS)
    if len(parts) > 2:
        raise _syntax_error(field, "a range has a single '..' (e.g. A..F); use '|' between ranges")
    if len(parts) == 2:
        if negate:
            raise _syntax_error(field, "'<>' cannot be combined with a range; use ..a|b.. to exclude a..b")
        low, high = (_parse_value(field, p) for p in parts)
        for bound in (low, high):
            if bound is not None and bound.has_wildcard:
                raise _syntax_error(field, "'*' cannot be used in a range")
        if low is None and high is None:
            raise _syntax_error(field, "'..' needs a value on at least one side")
        return _Term(
            negate=False,
            ignore_case=ignore_case,
            low=None if low is None else _fold(low.text, ignore_case),
            high=None if high is None else _fold(high.text, ignore_case),
            is_range=True,
        )
    value = _parse_value(field, parts[0])
    if value is None:
        raise _syntax_error(field, f"'{prefix}' needs a value; write {prefix}'' for a blank value")
    if ignore_case:
        value = _Value(tuple(s.casefold() for s in value.segments))
    return _Term(negate=negate, ignore_case=ignore_case, value=value)


def _fold(text: str, ignore_case: bool) -> str:
    return text.casefold() if ignore_case else text


def _parse_value(field: str, tokens: list[_Token]) -> _Value | None:
    """One side of a range or a whole value: nothing, one quoted literal, or one unquoted text."""
    tokens = _strip_outer_spaces(tokens)
    if not tokens:
        return None
    if len(tokens) > 1:
        quote = next(t for t in tokens if t.kind == _QUOTED)
        msg = f"a quote at position {quote.pos + 1} is inside a value: quote the whole value, e.g. 'O''Brien'"
        raise _syntax_error(field, msg)
    tok = tokens[0]
    if tok.kind == _QUOTED:
        if "?" in tok.text:
            raise _syntax_error(
                field, "'?' (single-character wildcard) is not supported, not even quoted; use '*'"
            )
        return _Value(tuple(tok.text.split("*")))
    for offset, ch in enumerate(tok.text):
        if ch in _UNSUPPORTED:
            what, quotable = _UNSUPPORTED[ch]
            if ch == "<" and tok.text.startswith("<>", offset):
                what = "'<>' inside a value ('<>' is only a prefix)"
            msg = f"unsupported {what} at position {tok.pos + offset + 1}"
            if quotable:
                msg += f"; to match the character itself, quote the value: {_quote(tok.text)}"
            raise _syntax_error(field, msg)
    return _Value(tuple(tok.text.split("*")))


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
