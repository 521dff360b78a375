"""Source ``table``: rows of a .csv/.parquet/.jsonl table (``path``, ``caption``, metadata)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...registry import register
from ...tables import json_safe, read_table, resolve_path
from ...types import Record
from ..base import Source


@dataclass(frozen=True)
class TableConfig:
    path: str = ""
    caption_column: str = "caption"


@register("source", "table")
class TableSource(Source):
    """One record per row; columns other than path and caption become metadata."""

    Config = TableConfig

    def records(self) -> Iterator[Record]:
        table = Path(self.config.path).expanduser().resolve()
        df = read_table(table)
        cap = self.config.caption_column
        meta_cols = [c for c in df.columns if c not in ("path", cap)]
        for row in df.to_dict(orient="records"):
            raw_caption = json_safe(row.get(cap)) if cap in row else None
            metadata = {str(c): v for c in meta_cols if (v := json_safe(row[c])) is not None}
            yield Record(
                path=resolve_path(table, row["path"]),
                caption=None if raw_caption is None else str(raw_caption),
                metadata=metadata,
            )
