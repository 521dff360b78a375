"""The filter language of ``--filter`` (Milvus' boolean expressions), evaluated in Python over a
row dict: what :class:`~mm_retrieval.testing.fakes.InMemoryStore` filters with.

It covers what mm_retrieval and its users write: ``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``,
``like "%pattern%"`` (``%`` any run of characters, ``_`` one), ``in [..]`` / ``not in [..]``,
``and`` / ``or`` / ``not`` (also ``&&``, ``||``, ``!``), parentheses, string, number and boolean
literals, fields (``path``, ``caption``, ``id`` ...) and JSON keys (``metadata["year"]``). A
comparison with a missing JSON key, or between values of different types, is false, as in Milvus.
Anything else is an :class:`~mm_retrieval.errors.InputError` naming the problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import InputError

__all__ = ["compile_filter"]

Row = dict[str, Any]
_MISSING = object()  # a JSON key the row doesn't have
_TOKEN = re.compile(r"""\s*(?:
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<number>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>()\[\],!])
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
)""", re.VERBOSE)
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


def compile_filter(expression: str, fields: Iterable[str]) -> Callable[[Row], bool]:
    """``expression`` as a predicate over rows with ``fields``; an empty expression keeps every row."""
    if not expression.strip():
        return lambda row: True
    parser = _Parser(expression, set(fields))
    test = parser.parse()
    return lambda row: test(row) is True


class _Parser:
    def __init__(self, text: str, fields: set[str]):
        self.text, self.fields = text, fields
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise self.error(f"unexpected character {text[pos:].strip()[0]!r} at column {pos + 1}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def error(self, reason: str) -> InputError:
        return InputError(
            f"invalid filter expression {self.text!r}: {reason}. Filters are boolean expressions over the fields path, "
            "caption and metadata, e.g. 'metadata[\"year\"] >= 2020 and caption like \"%dog%\"'"
        )

    # ---- tokens --------------------------------------------------------------------------
    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def word(self, *words: str) -> bool:
        """Consume the next token if it is one of ``words`` (operators or keywords, any case)."""
        t = self.peek()
        if t is not None and t[0] in ("op", "name") and t[1].lower() in words:
            self.i += 1
            return True
        return False

    def expect(self, word: str) -> None:
        if not self.word(word):
            t = self.peek()
            raise self.error(f"expected {word!r}, got {t[1]!r}" if t else f"expected {word!r} at the end")

    # ---- grammar -------------------------------------------------------------------------
    def parse(self) -> Callable[[Row], Any]:
        node = self.or_expr()
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return node

    def or_expr(self) -> Callable[[Row], Any]:
        parts = [self.and_expr()]
        while self.word("or", "||"):
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else (lambda row: any(p(row) is True for p in parts))

    def and_expr(self) -> Callable[[Row], Any]:
        parts = [self.not_expr()]
        while self.word("and", "&&"):
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else (lambda row: all(p(row) is True for p in parts))

    def not_expr(self) -> Callable[[Row], Any]:
        if self.word("not", "!"):
            inner = self.not_expr()
            return lambda row: inner(row) is not True
        return self.comparison()

    def comparison(self) -> Callable[[Row], Any]:
        left = self.operand()
        t = self.peek()
        if t is not None and t[0] == "op" and t[1] in _COMPARE:
            self.i += 1
            right, op = self.operand(), _COMPARE[t[1]]
            return lambda row: _safe(op, left(row), right(row))
        if self.word("like"):
            kind, raw = self.peek() or ("", "")
            if kind != "string":
                raise self.error("like takes a quoted pattern, e.g. caption like \"%dog%\"")
            self.i += 1
            pattern = re.compile("".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in _unquote(raw)), re.DOTALL)
            return lambda row: isinstance(v := left(row), str) and pattern.fullmatch(v) is not None
        negate = self.word("not")
        if negate or self.word("in"):
            if negate:
                self.expect("in")
            values = self.operand()
            return lambda row: _member(left(row), values(row), negate)
        return left

    def operand(self) -> Callable[[Row], Any]:
        t = self.peek()
        if t is None:
            raise self.error("unexpected end of expression")
        kind, raw = t
        self.i += 1
        if raw == "(":
            inner = self.or_expr()
            self.expect(")")
            return inner
        if raw == "[":
            items = []
            if not self.word("]"):
                items.append(self.operand())
                while self.word(","):
                    items.append(self.operand())
                self.expect("]")
            return lambda row: [item(row) for item in items]
        if kind == "string":
            value: Any = _unquote(raw)
            return lambda row: value
        if kind == "number":
            number = float(raw) if any(c in raw for c in ".eE") else int(raw)
            return lambda row: number
        if kind == "name" and raw.lower() in ("true", "false"):
            flag = raw.lower() == "true"
            return lambda row: flag
        if kind == "name":
            if raw not in self.fields:
                raise self.error(f"unknown field {raw!r} (fields: {', '.join(sorted(self.fields))})")
            keys = []
            while self.word("["):
                key = self.peek()
                if key is None or key[0] not in ("string", "number"):
                    raise self.error(f"{raw}[...] takes a quoted key, e.g. {raw}[\"year\"]")
                self.i += 1
                keys.append(_unquote(key[1]) if key[0] == "string" else int(key[1]))
                self.expect("]")
            return lambda row: _lookup(row.get(raw, _MISSING), keys)
        raise self.error(f"unexpected {raw!r}")


def _unquote(raw: str) -> str:
    return re.sub(r"\\(.)", r"\1", raw[1:-1])


def _lookup(value: Any, keys: list[Any]) -> Any:
    for key in keys:
        if (isinstance(value, dict) and isinstance(key, str) and key in value) or (
                isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value)):
            value = value[key]
        else:
            return _MISSING
    return value


def _comparable(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    return (isinstance(a, numbers) and isinstance(b, numbers)) or type(a) is type(b)


def _safe(op: Callable[[Any, Any], bool], a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING or not _comparable(a, b):
        return False
    try:
        return bool(op(a, b))
    except TypeError:
        return False


def _member(value: Any, values: Any, negate: bool) -> bool:
    if value is _MISSING or not isinstance(values, list):
        return False
    found = any(_safe(_COMPARE["=="], value, v) for v in values)
    return found != negate
