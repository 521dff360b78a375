"""Source ``folder``: every image and video file under a directory, recursively. Every other
file (a sidecar, a document) is listed in :attr:`~Source.problems` with why it was skipped; hidden
files and folders are left out unless ``include_hidden``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...decode import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from ...errors import InputError
from ...registry import register
from ...types import Record
from ..base import Source


MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


@dataclass(frozen=True)
class FolderConfig:
    path: str = "."
    include_hidden: bool = False  # dot-folders (.thumbnails, .git) are skipped by default


@register("source", "folder")
class FolderSource(Source):
    """Image and video files (by extension) under ``path``, sorted; symlinked folders are not followed,
    so a symlink loop can't make the walk endless."""

    Config = FolderConfig

    def records(self) -> Iterator[Record]:
        root = Path(self.config.path).expanduser()
        if not root.is_dir():
            raise InputError(f"not a folder: {root}")
        root = root.resolve()
        self._problems = []  # this run's
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=self._on_error):
            if not self.config.include_hidden:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            dirnames.sort()
            for name in sorted(filenames):  # problems listed in a stable order
                if not self.config.include_hidden and name.startswith("."):
                    continue
                ext = os.path.splitext(name)[1].lower()
                if ext in MEDIA_EXTENSIONS:
                    found.append(Path(dirpath) / name)
                else:  # listed, so that nothing in the folder is left out silently; a non-UTF-8
                    # name's bytes escaped (caf\xe9.txt), as the indexer reports such image files
                    where = os.fsencode(os.path.join(dirpath, name)).decode("utf-8", "backslashreplace")
                    self._problems.append((where, _not_media(ext)))
        for p in sorted(found):
            yield Record(path=p)

    def _on_error(self, e: OSError) -> None:
        self._problem(str(e.filename), f"cannot list folder: {e.strerror or e}")


def _not_media(ext: str) -> str:
    shown = os.fsencode(ext).decode("utf-8", "backslashreplace") if ext else "no extension"
    return f"not an image or video file type ({shown}); not indexed"
