"""The hub's SQL, written for SQLite, as PostgreSQL reads it (pure: strings in, strings out).

The rest of the hub writes one portable subset (``hub/store/__init__.py``); the few things that
differ are translated here, once per distinct statement (cached):

* parameters: ``?`` and ``:name`` become ``%s`` and ``%(name)s`` (a literal ``%`` becomes ``%%``);
* ``INDEXED BY index`` (an SQLite planner hint) is dropped;
* ``json_each(x)`` (the registry's tag filter) becomes ``json_each_text((x)::json)``;
* ``CAST(x AS INTEGER)`` truncates in SQLite and rounds in PostgreSQL: it becomes ``CAST(TRUNC(x) AS BIGINT)``;
* ``offset``, a column of ``chunks`` and a reserved word in PostgreSQL, is quoted where it names a column;
* ``instr(x, y)`` is ``strpos(x, y)`` (same arguments, same 1-based answer);
* ``LIKE`` before a parameter or a literal ignores ASCII case in SQLite: it becomes ``ILIKE``;
* in schema statements (:func:`ddl`): ``INTEGER`` is 64-bit (``BIGINT``), ``REAL`` is ``DOUBLE PRECISION``
  (PostgreSQL's ``REAL`` is 32-bit), ``BLOB`` is ``BYTEA``, ``INTEGER PRIMARY KEY AUTOINCREMENT`` is an
  identity column, ``WITHOUT ROWID`` goes, and a table in :data:`~hub.store.schema.PARTITIONED` is
  partitioned by range of its time column (its primary key gains that column, as PostgreSQL requires).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

from hub.store.schema import PARTITIONED


def _segments(sql: str) -> Iterator[tuple[bool, str]]:
    """(is_code, text) pieces: string literals, quoted identifiers and comments are not code."""
    i, n, start = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c in "'\"":
            if start < i:
                yield True, sql[start:i]
            j = i + 1
            while j < n:
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote: an escaped one
                        j += 2
                        continue
                    break
                j += 1
            yield False, sql[i:j + 1]
            i = start = j + 1
        elif c == "-" and sql.startswith("--", i):
            if start < i:
                yield True, sql[start:i]
            j = sql.find("\n", i)
            j = n if j < 0 else j
            yield False, sql[i:j]
            i = start = j
        else:
            i += 1
    if start < n:
        yield True, sql[start:]


def _close(code: str, open_at: int) -> int:
    """Index of the parenthesis closing the one at ``open_at``."""
    depth = 0
    for k in range(open_at, len(code)):
        if code[k] == "(":
            depth += 1
        elif code[k] == ")":
            depth -= 1
            if depth == 0:
                return k
    raise ValueError(f"unbalanced parentheses in SQL: {code[:80]!r}")


def _rewrite_calls(code: str) -> str:
    """``json_each(x)`` and ``CAST(x AS INTEGER)``, which need their argument (balanced parentheses)."""
    out, i = [], 0
    pattern = re.compile(r"\b(json_each|CAST)\s*\(", re.IGNORECASE)
    while m := pattern.search(code, i):
        open_at = m.end() - 1
        close_at = _close(code, open_at)
        inner = _rewrite_calls(code[open_at + 1:close_at])
        out.append(code[i:m.start()])
        if m.group(1).lower() == "json_each":
            out.append(f"json_each_text(({inner})::json)")
        else:
            cast = re.fullmatch(r"(?is)(.*)\s+AS\s+INTEGER\s*", inner)
            out.append(f"CAST(TRUNC({cast.group(1)}) AS BIGINT)" if cast else f"CAST({inner})")
        i = close_at + 1
    out.append(code[i:])
    return "".join(out)


_INDEXED_BY = re.compile(r"\s+INDEXED\s+BY\s+[A-Za-z_][A-Za-z0-9_]*", re.IGNORECASE)
# ``offset`` as a column: followed by a comma, a parenthesis, a comparison, a type or the end (not by a count)
_OFFSET_COLUMN = re.compile(r"(?<![\w.\"])offset(?=\s*(?:,|\)|=|<|>|$|INTEGER|BIGINT))", re.IGNORECASE)
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_][A-Za-z0-9_]*)")
_INSTR = re.compile(r"\binstr\s*\(", re.IGNORECASE)
# a pattern match (``x LIKE ?``, ``x LIKE '…'``), not ``CREATE TABLE t (LIKE other …)``
_LIKE = re.compile(r"\bLIKE(?=\s+(?:\?|:[A-Za-z_])|\s*$)", re.IGNORECASE)


def _functions(code: str) -> str:
    """The calls and operators that differ: ``instr``, ``LIKE`` and those of :func:`_rewrite_calls`."""
    return _LIKE.sub("ILIKE", _INSTR.sub("strpos(", _rewrite_calls(_INDEXED_BY.sub("", code))))


@lru_cache(maxsize=4096)
def dml(sql: str, named: bool = False) -> str:
    """A statement with parameters as psycopg takes them (``named``: ``:name`` style, else ``?``)."""
    out = []
    for is_code, text in _segments(sql):
        if not is_code:
            out.append(text.replace("%", "%%"))
            continue
        text = _functions(text)
        text = _OFFSET_COLUMN.sub('"offset"', text)
        text = text.replace("%", "%%")
        text = _NAMED.sub(r"%(\1)s", text) if named else text.replace("?", "%s")
        out.append(text)
    return "".join(out)


@lru_cache(maxsize=256)
def plain(sql: str) -> str:
    """A statement run without parameters: the same rewrites, ``%`` and ``?`` left alone."""
    out = []
    for is_code, text in _segments(sql):
        if is_code:
            text = _OFFSET_COLUMN.sub('"offset"', _functions(text))
        out.append(text)
    return "".join(out)


def statements(script: str) -> list[str]:
    """A script split into its statements (a ``;`` in a literal or comment does not end one)."""
    out, cur = [], []
    for is_code, text in _segments(script):
        if not is_code:
            cur.append(text)
            continue
        parts = text.split(";")
        for k, part in enumerate(parts):
            cur.append(part)
            if k < len(parts) - 1:
                out.append("".join(cur))
                cur = []
    out.append("".join(cur))
    return [s.strip() for s in out if any(is_code and t.strip() for is_code, t in _segments(s))]


# types are upper case in the schema and columns lower case (``blob`` is a column of ``chunks``)
_TYPES = [
    (re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\)\s*WITHOUT\s+ROWID\s*$"), ")"),
]
_CREATE_TABLE = re.compile(r"(?is)^CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def column_decl(decl: str) -> str:
    """A column declaration (``AddColumn.decl``) in PostgreSQL's types."""
    return ddl(decl)


def ddl(statement: str) -> str:
    """One schema statement in PostgreSQL's types (comments dropped), partitioned where the schema says so."""
    code = "".join(_types(text) if is_code else text for is_code, text in _segments(statement)
                   if is_code or not text.startswith("--")).strip()
    m = _CREATE_TABLE.match(code)
    if m and m.group(1) in PARTITIONED:
        column = PARTITIONED[m.group(1)].column
        close_at = _close(code, m.end() - 1)
        body = code[m.end():close_at]
        pk = re.search(r"PRIMARY\s+KEY\s*\(([^)]*)\)", body, re.IGNORECASE)
        if pk and column not in [c.strip() for c in pk.group(1).split(",")]:
            body = body[:pk.start(1)] + pk.group(1) + f", {column}" + body[pk.end(1):]
        code = f"{code[:m.end()]}{body}) PARTITION BY RANGE ({column})"
    return code


def _types(code: str) -> str:
    code = _OFFSET_COLUMN.sub('"offset"', code)
    for pattern, repl in _TYPES:
        code = pattern.sub(repl, code)
    return code

