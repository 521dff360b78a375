"""What an index or sync run does with each file, and why, on the in-memory fakes of
mm_retrieval.testing (a hash encoder, a dict store) and a folder of tiny images: new files are
added; unchanged ones skipped without being read; a touched file rewritten without encoding; a
changed one replaced; a moved one kept under its new path; a copy named; a broken file listed
with its reason; a deleted one removed by sync (only under the synced folder), kept by index.
The dry run's plan says exactly what the run then does."""

from __future__ import annotations

import csv
import os
import shutil

import pytest

from mm_retrieval import Pipeline
from mm_retrieval.testing.fakes import HashEncoder, InMemoryStore
from mm_retrieval.testing.images import COLORS, make_image

NAMES = list(COLORS)[:6]  # red green blue yellow purple orange


class CountingEncoder(HashEncoder):
    """The hash encoder, counting the images and texts it encodes."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.images = self.texts = 0

    def encode_pixels(self, pixels, *, with_tokens=False):
        self.images += len(pixels)
        return super().encode_pixels(pixels, with_tokens=with_tokens)

    def encode_text(self, texts):
        self.texts += len(texts)
        return super().encode_text(texts)


@pytest.fixture
def photos(tmp_path):
    for i, name in enumerate(NAMES):
        make_image(tmp_path / "photos" / f"{name}.png", COLORS[name], size=(16, 16), seed=i)
    return tmp_path / "photos"


@pytest.fixture
def pipe(tmp_path, photos):
    pipe = Pipeline(encoder=CountingEncoder(), store=InMemoryStore({"cache_dir": str(tmp_path / "caches")}))
    first = pipe.index(photos, progress=False)
    assert first.indexed == len(NAMES) and pipe.encoder.images == len(NAMES)
    pipe.encoder.images = 0
    return pipe


def _ids_by_path(pipe) -> dict[str, str]:
    return {r["path"]: r["id"] for r in pipe.store.iter_rows(("id", "path"))}


def test_a_rerun_reads_nothing_and_adds_nothing(pipe, photos):
    before = _ids_by_path(pipe)
    again = pipe.index(photos, progress=False)
    assert (again.indexed, again.unchanged, again.skipped) == (0, len(NAMES), 0)
    assert pipe.encoder.images == 0 and _ids_by_path(pipe) == before
    assert pipe.sync(photos, dry_run=True).plan == {
        "add": [], "check": [], "remove": [], "add_text": [], "unchanged": len(NAMES),
        "replace": [], "moved": [], "update": []}


def test_the_dry_run_plans_each_file_as_the_run_then_treats_it(pipe, photos):
    p = {name: str(photos / f"{name}.png") for name in NAMES}
    before = _ids_by_path(pipe)
    make_image(photos / "new.png", (9, 99, 199), size=(16, 16), seed=42)  # new content: added
    shutil.copy(photos / "red.png", photos / "red copy.png")  # a copy of an indexed file: named, stored once
    make_image(photos / "green.png", (0, 255, 0), size=(16, 16), seed=7)  # new content at a listed path: replaced
    st = os.stat(photos / "blue.png")
    os.utime(photos / "blue.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only: rewritten, not encoded
    (photos / "moved").mkdir()
    (photos / "yellow.png").rename(photos / "moved" / "yellow.png")  # moved: keeps its id
    (photos / "purple.png").unlink()  # gone: removed by sync
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # unreadable: listed with why

    dry = pipe.sync(photos, dry_run=True)
    assert _ids_by_path(pipe) == before and pipe.encoder.images == 0  # a dry run changes and encodes nothing
    moved = str(photos / "moved" / "yellow.png")
    assert dry.plan["add"] == [str(photos / "new.png")]
    assert dry.plan["replace"] == [p["green"]]
    assert dry.plan["update"] == [p["blue"]]
    assert dry.plan["moved"] == [{"path": moved, "from": p["yellow"]}]
    assert dry.plan["remove"] == [p["purple"]]  # the moved file's old path is not removed: its entry moves
    assert dry.plan["unchanged"] == 2  # red and orange
    assert [(d.path, d.of) for d in dry.duplicate_files] == [(str(photos / "red copy.png"), p["red"])]
    assert [f.path for f in dry.failed] == [str(photos / "broken.jpg")] and dry.failed[0].error

    real = pipe.sync(photos, progress=False)
    assert [(f.path, f.error) for f in real.failed] == [(f.path, f.error) for f in dry.failed]
    assert real.duplicate_files == dry.duplicate_files
    assert (real.indexed, real.moved, real.removed) == (2, 1, 1)  # new + green; yellow; purple
    assert pipe.encoder.images == 2  # only new and changed content is encoded
    after = _ids_by_path(pipe)
    assert set(after) == {p["red"], p["green"], p["blue"], p["orange"], moved, str(photos / "new.png")}
    assert after[moved] == before[p["yellow"]] and after[p["blue"]] == before[p["blue"]]
    assert after[p["green"]] != before[p["green"]] and before[p["green"]] not in after.values()  # the stale row went
    assert pipe.sync(photos, dry_run=True).plan["unchanged"] == len(after)  # and it is all in step now


def test_index_keeps_entries_of_deleted_files_and_sync_removes_only_under_its_folder(pipe, photos, tmp_path):
    other = tmp_path / "other"
    make_image(other / "a.png", (1, 2, 3), size=(16, 16), seed=1)
    make_image(other / "b.png", (200, 2, 3), size=(16, 16), seed=2)
    assert pipe.index(other, progress=False).indexed == 2
    (photos / "red.png").unlink()
    (other / "a.png").unlink()

    assert pipe.index(photos, progress=False).removed == 0  # index only adds
    assert str(photos / "red.png") in _ids_by_path(pipe)
    assert pipe.sync(other, dry_run=True).plan["remove"] == [str(other / "a.png")]  # not photos' red.png
    assert pipe.sync(other, progress=False).removed == 1
    paths = set(_ids_by_path(pipe))
    assert str(other / "a.png") not in paths and {str(photos / "red.png"), str(other / "b.png")} <= paths


def test_a_tables_text_only_rows_are_added_once_and_copies_named(tmp_path, photos):
    table = tmp_path / "items.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerow([str(photos / "red.png"), "a red square"])
        w.writerow(["", "a note with no image"])
        w.writerow(["", "a note with no image"])  # the same text twice: one item, the copy named
        w.writerow([str(photos / "red.png"), "listed again"])  # the same path twice: the first row wins
    pipe = Pipeline(encoder=CountingEncoder(), store=InMemoryStore({"cache_dir": str(tmp_path / "caches")}))

    dry = pipe.sync(table, dry_run=True)
    assert dry.plan["add"] == [str(photos / "red.png")] and dry.plan["add_text"] == ["a note with no image"]
    assert sorted(d.path for d in dry.duplicate_files) == [str(photos / "red.png"), "text 'a note with no image'"]
    assert not pipe.store.exists()  # a dry run creates no collection

    first = pipe.index(table, progress=False)
    assert first.indexed == 2 and first.duplicates == 2 and pipe.store.count_with_text() == 2
    rows = {r["caption"]: r for r in pipe.store.iter_rows(("caption", "has_image", "path"))}
    assert rows["a note with no image"]["has_image"] is False and rows["a red square"]["has_image"] is True
    encoded = pipe.encoder.texts
    again = pipe.index(table, progress=False)
    assert again.indexed == 0 and pipe.encoder.texts == encoded  # nothing encoded again
