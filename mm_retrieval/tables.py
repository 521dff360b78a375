"""Reading image-caption tables (.csv, .parquet, .jsonl).

A table has a ``path`` column (absolute, or relative to the table's folder), an optional
``caption`` column, and any other columns, which become filterable metadata.
"""

from __future__ import annotations

import math
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
    if "path" not in df.columns:
        raise InputError(f"table {p} has no 'path' column (columns: {', '.join(map(str, df.columns))}); add one with each image's file path")
    return df


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
