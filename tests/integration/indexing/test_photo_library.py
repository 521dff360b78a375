"""A phone's photo library: HEIC/AVIF/JPEG/RAW and videos indexed with what the files say about
themselves (date taken, place, camera), filterable; every skipped file named with why."""

import csv
import json
import os

import pytest

from mm_retrieval import Pipeline
from mm_retrieval.errors import InputError
from mm_retrieval.decode import RAW_NO_PREVIEW
from mm_retrieval.testing.photos import exif_block, make_photo, make_raw
from mm_retrieval.testing.videos import make_video
from tests.helpers import TINY

SYDNEY, PARIS = (-33.8688, 151.2093, 5.0), (48.8566, 2.3522, 35.0)


@pytest.fixture
def library(tmp_path):
    root = tmp_path / "Pictures"
    make_photo(root / "2024" / "beach.heic", (30, 120, 230), exif=exif_block(
        taken="2024:07:14 16:05:00", offset="+10:00", gps=SYDNEY, make="Apple", model="iPhone 15 Pro", orientation=6), seed=1)
    make_photo(root / "2024" / "street.avif", (200, 60, 40), exif=exif_block(taken="2024:06:02 09:00:00", gps=PARIS), seed=2)
    make_photo(root / "2023" / "old.jpg", (40, 160, 60), exif=exif_block(taken="2023:05:01 12:00:00", offset="+01:00",
                                                                         make="Canon", model="EOS R6", lens="RF24-105mm F4 L IS USM"), seed=3)
    make_photo(root / "scan.png", (240, 220, 30), seed=4)  # no EXIF: the file's time
    make_raw(root / "raw" / "dng_with_preview.dng", taken="2022:02:02 10:00:00")
    make_raw(root / "raw" / "sensor_only.nef", preview=None, make="NIKON CORPORATION")
    make_video(root / "2024" / "clip.mp4", [("red", 1.0)], metadata={
        "creation_time": "2024-08-01T10:00:00.000000Z", "location": "+48.8566+002.3522/"})
    (root / "2024" / "IMG_0001.AAE").write_text("<plist/>")  # an iPhone edit sidecar
    return root


def _rows(pipe):
    return {os.path.basename(r["path"]): r for r in pipe.store.iter_rows(("id", "path", "metadata"))}


def _names(result):
    return [os.path.basename(h.path) for h in result.hits]


def test_library_indexes_every_format_with_file_metadata(tmp_path, library):
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4})
    report = pipe.index(library, progress=False)
    failed = {os.path.basename(f.path): f.error for f in report.failed}
    assert failed.keys() == {"sensor_only.nef", "IMG_0001.AAE"}
    assert failed["sensor_only.nef"] == RAW_NO_PREVIEW and "not an image or video" in failed["IMG_0001.AAE"]
    rows = _rows(pipe)
    assert {"beach.heic", "street.avif", "old.jpg", "scan.png", "dng_with_preview.dng", "clip.mp4"} <= rows.keys()
    beach = rows["beach.heic"]["metadata"]
    assert beach["taken"] == "2024-07-14T16:05:00+10:00" and beach["taken_source"] == "exif"
    assert (beach["lat"], beach["lon"]) == pytest.approx(SYDNEY[:2], abs=1e-4) and beach["model"] == "iPhone 15 Pro"
    assert (beach["width"], beach["height"]) == (48, 64)
    assert rows["old.jpg"]["metadata"]["lens"] == "RF24-105mm F4 L IS USM"
    assert rows["scan.png"]["metadata"]["taken_source"] == "file"
    assert rows["dng_with_preview.dng"]["metadata"]["taken"] == "2022-02-02T10:00:00"
    clip = rows["clip.mp4"]["metadata"]
    assert clip["taken"] == "2024-08-01T10:00:00+00:00" and clip["lat"] == pytest.approx(48.8566)

    # typed, filterable fields: a date range and a bounding box in Milvus' own filter language
    recent = pipe.search("a photo", k=20, filter='metadata["taken"] >= "2024-06" and metadata["taken_source"] != "file"')
    assert sorted(set(_names(recent))) == ["beach.heic", "clip.mp4", "street.avif"]
    box = 'metadata["lat"] > 40 and metadata["lat"] < 55 and metadata["lon"] > -5 and metadata["lon"] < 10'
    assert sorted(set(_names(pipe.search("a photo", k=20, filter=box)))) == ["clip.mp4", "street.avif"]
    hit = pipe.search("a photo", k=20, filter='metadata["make"] == "Canon" and metadata["model"] == "EOS R6"').hits[0]
    assert hit.to_dict()["metadata"]["lens"].startswith("RF24")  # what --json shows

    again = pipe.sync(library, progress=False)  # nothing changed: nothing read again
    assert (again.indexed, again.replaced, again.unchanged) == (0, 0, len(rows))

    os.utime(library / "scan.png", ns=(1_600_000_000 * 10**9,) * 2)  # touched: the file's time is the date
    (library / "2023" / "old.jpg").rename(library / "old-moved.jpg")  # moved: keeps its metadata
    report = pipe.sync(library, progress=False)
    assert report.indexed == 0 and report.moved == 1
    rows = _rows(pipe)
    assert rows["scan.png"]["metadata"]["taken"].startswith("2020-09-1")
    assert rows["old-moved.jpg"]["metadata"]["model"] == "EOS R6"


def test_a_tables_own_columns_win_over_the_files(tmp_path, library):
    table = tmp_path / "photos.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "taken", "album"])
        w.writerow([str(library / "2024" / "beach.heic"), "beach at sunset", "1999-12-31", "holiday"])
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0})
    pipe.index(table, progress=False)
    meta = _rows(pipe)["beach.heic"]["metadata"]
    assert meta["taken"] == "1999-12-31" and meta["taken_source"] == "table" and meta["album"] == "holiday"  # the table's
    assert meta["model"] == "iPhone 15 Pro" and meta["lat"] == pytest.approx(SYDNEY[0], abs=1e-4)  # the file's
    assert pipe.sync(table, progress=False).unchanged == 1


def test_min_score_is_a_range_search_and_sort_orders_by_metadata(tmp_path, library):
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0, "batch_size": 4})
    pipe.index(library, progress=False)
    full = pipe.search("a photo at the beach", k=50, mode="image").hits
    scores = [h.score for h in full]
    assert len(scores) >= 5 and scores == sorted(scores, reverse=True)
    cut = (scores[2] + scores[3]) / 2  # between the 3rd and the 4th
    above = pipe.search("a photo at the beach", mode="image", min_score=cut)
    assert [h.id for h in above.hits] == [h.id for h in full[:3]]  # every hit above X, no more (no --k given)
    assert len(pipe.search("a photo at the beach", mode="image", min_score=cut, k=2).hits) == 2  # --k still caps
    assert pipe.search("a photo at the beach", mode="image", min_score=scores[0] + 1e-3).hits == []

    newest = pipe.search("a photo at the beach", mode="image", min_score=-1.0, sort="-taken").hits
    taken = [h.metadata["taken"] for h in newest]
    assert len(newest) == len(full) and taken == sorted(taken, reverse=True)
    assert [h.metadata["taken"] for h in pipe.search("a photo", mode="image", min_score=-1.0, sort="taken").hits] == sorted(taken)
    by_alt = pipe.search("a photo", mode="image", min_score=-1.0, sort="-alt,path").hits
    assert [h.metadata.get("alt") for h in by_alt][:2] == [35.0, 5.0]  # the rest have no altitude: last, by path
    rest = [h.path for h in by_alt if "alt" not in h.metadata]
    assert rest == sorted(rest)
    with pytest.raises(InputError, match="--sort"):
        pipe.search("a photo", sort="taken; drop")
    with pytest.raises(InputError, match="--min-score"):
        pipe.search("a photo", min_score=float("nan"))
    pipe.close()

    from click.testing import CliRunner

    from mm_retrieval.cli import cli

    out = CliRunner().invoke(cli, ["search", "a photo at the beach", "--db", str(tmp_path / "mmr.db"), "--mode", "image",
                                   "--min-score", str(cut), "--sort", "-taken", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    newest_first = sorted(full[:3], key=lambda h: h.metadata["taken"], reverse=True)
    assert [h["id"] for h in doc["hits"]] == [h.id for h in newest_first]
    assert doc["hits"][0]["metadata"]["taken_source"] in ("exif", "video", "file")


def test_min_score_and_sort_over_http(served):
    import httpx

    server, _ = served
    with httpx.Client(base_url=server.url, timeout=60) as c:
        full = c.post("/search", json={"query": "a red picture", "k": 8, "rerank": False, "mode": "image"}).json()["hits"]
        cut = (full[1]["score"] + full[2]["score"]) / 2
        got = c.post("/search", json={"query": "a red picture", "rerank": False, "mode": "image", "min_score": cut, "sort": "path"})
        assert got.status_code == 200, got.text
        hits = got.json()["hits"]
        assert sorted(h["id"] for h in hits) == sorted(h["id"] for h in full[:2])
        assert [h["path"] for h in hits] == sorted(h["path"] for h in hits)
        bad = c.post("/search", json={"query": "a red picture", "sort": "path) or (1"})
        assert bad.status_code == 422


def test_min_score_in_hybrid_mode_cuts_on_either_similarity(tmp_path, library):
    table = tmp_path / "captions.csv"
    photos = sorted(p for p in library.rglob("*") if p.suffix in (".heic", ".avif", ".jpg", ".png"))
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], *[[str(p), f"photo {p.stem} on a sunny day"] for p in photos]])
    pipe = Pipeline(db=str(tmp_path / "mmr.db"), encoder={**TINY, "workers": 0})
    pipe.index(table, progress=False)
    full = pipe.search("a sunny beach", mode="hybrid", k=10).hits
    best = sorted(max(h.image_score, h.text_score) for h in full)
    cut = (best[-2] + best[-3]) / 2
    hits = pipe.search("a sunny beach", mode="hybrid", min_score=cut).hits
    assert sorted(h.id for h in hits) == sorted(h.id for h in full if max(h.image_score, h.text_score) > cut)
    assert len(hits) == 2 and [h.rank for h in hits] == [1, 2]
