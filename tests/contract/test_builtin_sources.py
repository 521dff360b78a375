"""The source contract on the built-in sources."""

from __future__ import annotations

import pytest

from mm_retrieval import registry
from mm_retrieval.testing.contracts import SourceContract
from tests.helpers import COLORS, make_image


class TestFolderSource(SourceContract):
    @pytest.fixture
    def source(self, tmp_path):
        for i, (name, rgb) in enumerate(list(COLORS.items())[:4]):
            make_image(tmp_path / ("nested" if i % 2 else "") / f"{name}.png", rgb, seed=i)
        (tmp_path / "notes.txt").write_text("not an image")
        return registry.create("source", "folder", {"path": str(tmp_path)})


class TestTableSource(SourceContract):
    @pytest.fixture
    def source(self, tmp_path):
        make_image(tmp_path / "red.png", COLORS["red"])
        make_image(tmp_path / "blue.png", COLORS["blue"], seed=1)
        (tmp_path / "items.csv").write_text(
            "path,caption,year\n"
            "red.png,a red square,2020\n"
            "blue.png,a blue square,2021\n"
            ",a text-only item,2022\n"
            ",,2023\n"  # neither a path nor text: a problem, not a record
        )
        return registry.create("source", "table", {"path": str(tmp_path / "items.csv")})

    def test_a_row_without_path_or_text_is_a_problem(self, source):
        records = list(source.records())
        assert [r.path is None for r in records] == [False, False, True]
        assert len(source.problems) == 1 and "neither a path nor text" in source.problems[0][1]
