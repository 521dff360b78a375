"""A token cache's bound and its least-recently-used eviction (``--token-budget``).

A cache filled at query time (``mmr index --tokens lazy``) may be bounded: by bytes (``20GB``,
``500MiB``; whole slots of the cache's size) or by a count of images (``100000``). The bound and
the fill mode live in the map's meta, so every later reader and writer (CLI, server) honours
what the index run chose.

Recency: readers note the ids they read in memory (no write per query); a writer flushes those
notes into the map's ``used`` table in the same write that makes room, then frees the least
recently used slots -- never the ids being written or read right now -- in their own commit,
before any freed slot is rewritten (a reader that looked a slot up before the eviction sees its
stamp change and looks again; see :mod:`.slots`).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Collection, Mapping

from ..errors import InputError

FILLS = ("eager", "lazy")
USED_SCHEMA = "CREATE TABLE IF NOT EXISTS used (id TEXT PRIMARY KEY, at INTEGER NOT NULL)"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_budget(spec: str | int | None) -> tuple[str, int] | None:
    """``"20GB"`` -> ``("bytes", 20e9)``, ``"100000"`` / ``100000`` -> ``("items", 100000)``,
    None or ``""`` -> None (unbounded). InputError naming the forms for anything else."""
    if spec is None or spec == "":
        return None
    text = str(spec).strip().replace("_", "").replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", text)
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"token budget {spec!r} is neither a size (e.g. 20GB, 500MiB) nor a number of images (e.g. 100000)")
    value = float(m.group(1))
    if unit == "":
        if value != int(value) or value < 1:
            raise InputError(f"token budget {spec!r}: a number of images must be a whole number of at least 1")
        return "items", int(value)
    return "bytes", int(value * _UNITS[unit])


def budget_slots(budget: tuple[str, int] | None, slot_bytes: int) -> int | None:
    """How many slots of ``slot_bytes`` a budget holds (None: unbounded). InputError when not one."""
    if budget is None:
        return None
    kind, value = budget
    slots = value if kind == "items" else value // max(1, slot_bytes)
    if slots < 1:
        raise InputError(f"a token budget of {value:,} bytes holds no image's tokens ({slot_bytes:,} bytes each); raise it")
    return int(slots)


def describe(budget: tuple[str, int] | None) -> str:
    if budget is None:
        return "unbounded"
    kind, value = budget
    return f"{value:,} images" if kind == "items" else f"{value / 1e9:.3g} GB"


def flush_used(db: sqlite3.Connection, touched: Mapping[str, int]) -> None:
    """Record when ``touched`` ids were last read (inside a write transaction)."""
    db.executemany("INSERT INTO used VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET at = max(at, excluded.at)",
                   list(touched.items()))


def victims(db: sqlite3.Connection, need: int, keep: Collection[str]) -> list[tuple[str, int]]:
    """``need`` (id, slot) rows to evict: least recently read (or written) first, none of ``keep``."""
    if need <= 0:
        return []
    out: list[tuple[str, int]] = []
    q = ("SELECT s.id, s.slot FROM slots s LEFT JOIN used u ON u.id = s.id "
         "ORDER BY COALESCE(u.at, 0), s.slot LIMIT ? OFFSET ?")
    offset = 0
    while len(out) < need:
        rows = db.execute(q, (need + len(keep), offset)).fetchall()
        if not rows:
            break
        offset += len(rows)
        out.extend(r for r in rows if r[0] not in keep)
    return out[:need]
