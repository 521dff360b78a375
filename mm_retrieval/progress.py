"""Progress bars on stderr for long work (indexing, cache builds)."""

from __future__ import annotations

from typing import Any


class NoBar:
    """A progress bar that shows nothing (``progress=False``)."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool | None, *, unit: str = "img", desc: str = "indexing") -> Any:
    """A tqdm bar with rate and ETA. ``enabled``: True always, False never, None only on a terminal
    (hidden in logs and pipes)."""
    if enabled is False:
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=None if enabled is None else False, dynamic_ncols=True)
