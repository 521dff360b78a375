"""Migrate a token cache of the old format (``mm_retrieval.tokens/1``: one SQLite file with an fp16
blob per id in table ``tokens``) to the map + memory-mapped slots, once, in place.

The whole move is one write transaction on the map: the slots are written and fsync'd, then the
rows go in and the blob table goes away in the same commit. A run killed halfway leaves the old
format intact (and stray data files that the next attempt replaces); a second process opening
the cache meanwhile waits for the commit and finds it migrated.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from ..progress import progress_bar
from .slotmap import FORMAT, LEGACY_FORMAT, has_table, read_meta, set_meta, transaction
from .slots import SlotFile, new_stamp

log = logging.getLogger(__name__)
_WAIT_MS = 3_600_000  # another process may be migrating a large cache right now: wait for it


def migrate(db: sqlite3.Connection, path: Path, base: Callable[[int], Path], fingerprint: str, *,
            progress: bool | None = None) -> int:
    """Move the blobs of the old-format cache at ``path`` into generation 1's slots
    (``base(1)``); returns how many items moved (0 when another process did it first)."""
    db.execute(f"PRAGMA busy_timeout = {_WAIT_MS}")
    moved = skipped = 0
    try:
        with transaction(db, write=True):
            meta = read_meta(db)
            if meta.get("format") != LEGACY_FORMAT:
                return 0
            total = db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0] if has_table(db, "tokens") else 0
            log.warning("token cache %s is in the old format (SQLite blobs): moving its %d items into memory-mapped slots, once",
                        path, total)
            if total and "shape" in meta:
                shape = json.loads(meta["shape"])
                files = SlotFile.create(base(1), {"fingerprint": fingerprint, "generation": 1, "dtype": "float16", "shape": shape})
                rows = []
                bar = progress_bar(total, progress, unit="item", desc="migrating token cache")
                try:
                    for item_id, blob in db.execute("SELECT id, data FROM tokens"):
                        bar.update(1)
                        if len(blob) != files.slot_bytes:  # the old writer checked shapes: only damage gets here
                            skipped += 1
                            continue
                        stamp = new_stamp()
                        files.write(moved, stamp, blob)
                        rows.append((item_id, moved, stamp))
                        moved += 1
                finally:
                    bar.close()
                files.sync()
                files.close()
                db.executemany("INSERT OR REPLACE INTO slots VALUES (?, ?, ?)", rows)
                set_meta(db, generation=1, slots=moved)
            db.execute("DROP TABLE IF EXISTS tokens")
            set_meta(db, format=FORMAT)
    finally:
        db.execute("PRAGMA busy_timeout = 60000")
    db.execute("VACUUM")  # hand the blobs' pages back to the file system...
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # ...and the copy VACUUM wrote to the WAL
    log.warning("token cache %s migrated: %d items in %s.slots%s", path, moved, base(1).name,
                f"; {skipped} damaged blobs of the wrong size were left out (`mmr cache build` encodes them again)" if skipped else "")
    return moved
