"""A source that reads image paths, one per line, from a text file."""

from dataclasses import dataclass
from pathlib import Path

from mm_retrieval.stages.base import Source
from mm_retrieval.types import Record


@dataclass(frozen=True)
class ListingConfig:
    path: str = ""


class ListingSource(Source):
    Config = ListingConfig

    def records(self):
        listing = Path(self.config.path)
        for line in listing.read_text().splitlines():
            if line.strip():
                yield Record(path=(listing.parent / line.strip()).resolve())
