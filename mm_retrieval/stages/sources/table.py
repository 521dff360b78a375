"""Source ``table``: rows of a .csv/.parquet/.jsonl table (``path``, ``caption``, metadata), or of
a folder of Parquet shards read in name order (:func:`~mm_retrieval.tables.parquet_shards`): a
shard that can't be read goes to :attr:`~Source.problems` with its path, the others are listed.

A row without a path (an empty ``path`` cell) but with text becomes a text-only item: it gets a
text vector and no image, so image queries can find it through its text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InputError
from ...registry import register
from ...tables import json_safe, parquet_shards, read_table, resolve_path, table_columns
from ...types import Record
from ..base import Source


@dataclass(frozen=True)
class TableConfig:
    path: str = ""
    caption_column: str = "caption"
    # columns whose values (joined with ". ") get the text vector; default: the caption column
    text_columns: list[str] = field(default_factory=list)


@register("source", "table")
class TableSource(Source):
    """One record per row; columns other than path and caption become metadata."""

    Config = TableConfig

    def check(self) -> None:
        """A table file: it reads, has a 'path' column and the --text-columns asked for (its
        header only). A folder of shards: it holds some (each shard is checked as it is read)."""
        table = Path(self.config.path).expanduser().resolve()
        if table.is_dir():
            if not parquet_shards(table):
                raise InputError(f"table folder {table} holds no .parquet shards; pass a folder of images, a table file, or a folder of .parquet files")
            return
        columns = table_columns(table)
        self._text_columns(table, columns)

    def _text_columns(self, table: Path, columns: Sequence[str]) -> list[str]:
        """The columns whose text gets a text vector; InputError naming those not in ``columns``."""
        cap = self.config.caption_column
        text_cols = list(self.config.text_columns) or ([cap] if cap in columns else [])
        unknown = [c for c in text_cols if c not in columns]
        if unknown:
            raise InputError(f"--text-columns {', '.join(unknown)} not in table {table} (columns: {', '.join(map(str, columns))})")
        return text_cols

    def records(self) -> Iterator[Record]:
        table = Path(self.config.path).expanduser().resolve()
        self._problems = []  # this run's
        if not table.is_dir():
            yield from self._rows(table, read_table(table))
            return
        shards = parquet_shards(table)
        if not shards:
            raise InputError(f"table folder {table} holds no .parquet shards; pass a folder of images, a table file, or a folder of .parquet files")
        for shard in shards:
            try:
                df = read_table(shard)
            except InputError as e:  # one bad shard: reported by its path, the others still indexed
                self._problem(str(shard), f"unreadable table shard: {e}")
                continue
            yield from self._rows(shard, df)

    def _rows(self, table: Path, df) -> Iterator[Record]:
        """The records of one table (file or shard) ``table``, read into ``df``."""
        cap = self.config.caption_column
        text_cols = self._text_columns(table, list(df.columns))
        meta_cols = [c for c in df.columns if c not in ("path", cap)]
        for row in df.to_dict(orient="records"):
            raw_caption = json_safe(row.get(cap)) if cap in row else None
            metadata = {str(c): v for c in meta_cols if (v := json_safe(row[c])) is not None}
            parts = [str(v).strip() for c in text_cols if (v := json_safe(row[c])) is not None and str(v).strip()]
            path_cell = json_safe(row["path"])
            text = ". ".join(parts) or None
            if path_cell is None or not str(path_cell).strip():
                if text is None:
                    self._problem(f"{table} (a row)", "row has neither a path nor text; skipped")
                    continue
                path = None
            else:
                path = resolve_path(table, path_cell)
            yield Record(path=path, caption=None if raw_caption is None else str(raw_caption), metadata=metadata, text=text)
