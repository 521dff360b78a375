"""Reading image-caption tables (.csv, .parquet, .jsonl).

A table has a ``path`` column (absolute, or relative to the table's folder), an optional
``caption`` column, and any other columns, which become filterable metadata.

A folder of Parquet shards (``part-00000.parquet``, ... as Spark, Ray or pyarrow write a
dataset) is one table: its shards are read in name order, each on its own, so an unreadable
shard is reported by its path while the others are still indexed (:func:`parquet_shards`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import InputError

TABLE_EXTENSIONS = (".csv", ".parquet", ".jsonl")


def read_table(path: str | Path):
    """Load a table as a pandas DataFrame with clear errors for missing/unsupported/bad files."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise InputError(f"table not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(p)
        elif suffix == ".parquet":
            df = pd.read_parquet(p)
        elif suffix == ".jsonl":
            df = pd.read_json(p, lines=True)
        else:
            raise InputError(
                f"unsupported table format {p.suffix!r} for {p}; use one of {', '.join(TABLE_EXTENSIONS)} "
                "(or pass a folder of images)"
            )
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read table {p}: {type(e).__name__}: {e}") from e
    _require_path_column(p, df.columns)
    return df


def table_columns(path: str | Path) -> list[str]:
    """A table's column names, read from its header (a .parquet file's schema, a .jsonl file's
    first row) with the errors of :func:`read_table`, 'path' missing included: an index run
    checks its table with it before loading any model."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise InputError(f"table not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in TABLE_EXTENSIONS:
        return list(read_table(p).columns)  # its own error
    try:
        if suffix == ".csv":
            columns = pd.read_csv(p, nrows=0).columns
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(p).names
        else:
            columns = pd.read_json(p, lines=True, nrows=1).columns
    except Exception as e:
        raise InputError(f"cannot read table {p}: {type(e).__name__}: {e}") from e
    columns = [str(c) for c in columns]
    _require_path_column(p, columns)
    return columns


def _require_path_column(p: Path, columns: Any) -> None:
    if "path" not in columns:
        raise InputError(f"table {p} has no 'path' column (columns: {', '.join(map(str, columns))}); add one with each image's file path")


def parquet_shards(folder: str | Path) -> list[Path]:
    """The ``*.parquet`` files directly in ``folder``, in name order; names starting with ``.`` or
    ``_`` (Spark's ``_SUCCESS``, ``_metadata``, checksum files) are not shards."""
    p = Path(folder)
    try:
        entries = sorted(p.iterdir())
    except OSError as e:
        raise InputError(f"cannot list the table folder {p}: {e.strerror or e}") from e
    return [f for f in entries if f.suffix.lower() == ".parquet" and not f.name.startswith((".", "_")) and f.is_file()]


def is_shard_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a table of Parquet shards rather than a folder of images: it holds
    ``*.parquet`` files directly and no image file anywhere below it."""
    from . import decode

    media = decode.IMAGE_EXTENSIONS | frozenset(getattr(decode, "VIDEO_EXTENSIONS", ()))
    p = Path(folder)
    try:
        if not parquet_shards(p):
            return False
    except InputError:
        return False
    for _, _, files in os.walk(p):  # stops at the first image: a photo folder returns at once
        if any(Path(f).suffix.lower() in media for f in files):
            return False
    return True


def resolve_path(table: Path, value: Any) -> Path:
    """A table's ``path`` cell as an absolute path (relative ones are relative to the table's folder)."""
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (table.parent / p).resolve()


def json_safe(value: Any) -> Any:
    """Convert numpy/pandas scalars to JSON types; NaN/None -> None."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return str(value)
