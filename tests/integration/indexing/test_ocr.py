"""Text in images (--ocr): read at index time by the real OCR package, stored per item, found by
its words (--mode ocr) and by its meaning (a text vector where an image has no caption), on Milvus
Lite with the tiny model. OCR is slow on CPU: three small images in all."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra: pip install 'mm-retrieval[ocr]'")

from mm_retrieval.errors import InputError  # noqa: E402
from mm_retrieval.ocr import OCR_KEY  # noqa: E402
from mm_retrieval.testing.text_images import fonts, sign_image  # noqa: E402


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A sign with two words, an image without text, and a 900x2 sliver OCR refuses (still indexed)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ocr") / "photos"
    face = (fonts() or [None])[0]
    sign_image(root / "sign.jpg", ["Harbour", "Bakery"], font=face, font_px=44, size=(400, 240), seed=1)
    sign_image(root / "plain.jpg", [], font=face, font_px=10, plate=None, size=(200, 150), seed=2)
    Image.new("RGB", (900, 2), (200, 200, 200)).save(root / "sliver.png")
    return root


@pytest.fixture(scope="module")
def indexed(text_folder, tmp_path_factory):
    """The folder indexed twice into one db: without OCR, then `sync --ocr` (the backfill)."""
    from mm_retrieval import Pipeline
    from tests.helpers import TINY

    db = str(tmp_path_factory.mktemp("db") / "mmr.db")
    pipe = Pipeline(db=db, encoder={**TINY, "workers": 0, "batch_size": 4})
    first = pipe.index(text_folder)
    with pytest.raises(InputError, match=r"mmr sync SOURCE --ocr"):  # asked before any text was read
        pipe.search("bakery", mode="ocr")
    report = pipe.sync(text_folder, ocr=True)
    yield pipe, first, report
    pipe.close()


def test_sync_ocr_reads_the_indexed_images_and_reports_the_failure(indexed, text_folder):
    pipe, first, report = indexed
    assert first.indexed == 3 and first.ocr is None
    assert report.indexed == 0 and report.skipped == 0  # nothing re-encoded, nothing skipped
    assert report.ocr["read"] == 2 and report.ocr["with_text"] == 1
    (failed,) = report.ocr["failed"]
    assert failed["path"].endswith("sliver.png") and "too elongated" in failed["error"]
    rows = {os.path.basename(r["path"]): r for r in pipe.store.iter_rows(["path", "metadata", "has_text"])}
    assert len(rows) == 3  # the sliver is still indexed, without text
    assert OCR_KEY not in rows["sliver.png"]["metadata"]
    assert rows["plain.jpg"]["metadata"][OCR_KEY]["text"] == ""  # read, nothing found: not read again
    sign = rows["sign.jpg"]["metadata"][OCR_KEY]
    assert "harbour" in sign["norm"] and "bakery" in sign["norm"]
    assert sign["size"] == [400, 240] and all(0 <= w[1] < w[3] <= 400 and 0 <= w[2] < w[4] <= 240 for w in sign["words"])
    assert rows["sign.jpg"]["has_text"] and not rows["plain.jpg"]["has_text"]  # its text embedded like a caption

    again = pipe.sync(text_folder, ocr=True)  # only the sliver, never read, is tried again
    assert again.ocr["read"] == 0 and len(again.ocr["failed"]) == 1 and again.unchanged == 3


def test_mode_ocr_finds_a_word_and_ranks_the_phrase(indexed):
    pipe, _, _ = indexed
    res = pipe.search("BAKERY", mode="ocr")
    assert [os.path.basename(h.path) for h in res.hits] == ["sign.jpg"] and res.mode == "ocr"
    ocr = res.hits[0].metadata[OCR_KEY]
    assert ocr["matched"] == ["bakery"] and len(ocr["matches"]) == 1
    x0, y0, x1, y1 = ocr["matches"][0][1:]
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 240
    phrase = pipe.search("harbour bakery", mode="ocr").hits[0].score
    reversed_ = pipe.search("bakery harbour", mode="ocr").hits[0].score
    assert phrase > reversed_ > 0
    assert pipe.search("zeppelin", mode="ocr").hits == []
    with pytest.raises(InputError, match="has none"):
        pipe.search("!!!", mode="ocr")
    with pytest.raises(InputError, match="give a text query"):
        pipe.search(image=res.hits[0].path, mode="ocr")


def test_ocr_text_is_searched_by_meaning(indexed):
    pipe, _, _ = indexed
    res = pipe.search("harbour bakery", mode="text", rerank=False)
    assert [os.path.basename(h.path) for h in res.hits] == ["sign.jpg"]  # the only item with text: its OCR text


@pytest.mark.slow  # loads the OCR models
def test_cli_index_ocr_json_and_search(tmp_path, text_folder, monkeypatch, capsys):
    from mm_retrieval.cli import main

    def mmr(*args):  # the CLI in this process (its JSON is tested, not the process), in tmp_path: the default --db
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        return json.loads(out.out)

    monkeypatch.chdir(tmp_path)
    assert mmr("index", str(text_folder), "--model", "mmr-tiny", "--pretrained", "none", "--workers", "0", "--ocr",
               "--json")["ocr"]["with_text"] == 1
    assert mmr("search", "bakery", "--mode", "ocr", "--json")["hits"][0]["path"].endswith("sign.jpg")


@pytest.fixture(scope="module")
def demo(indexed, text_folder):
    """What `served` serves: the collection `indexed` read the text of (no reranker)."""
    from mm_retrieval.server.testing import DemoCollection

    pipe = indexed[0]
    pipe.close()  # Milvus Lite: the server's own pipeline opens the file (this one reconnects when used)
    return DemoCollection(root=text_folder, db=pipe.store.config.uri, collection=pipe.store.name, checkpoint=None)


def test_server_offers_and_answers_mode_ocr_with_the_boxes(served):
    import httpx

    server, _ = served
    info = httpx.get(f"{server.url}/collection", timeout=30).json()
    assert "ocr" in info["modes"]
    doc = httpx.post(f"{server.url}/search", json={"query": "bakery", "mode": "ocr"}, timeout=60).json()
    assert doc["mode"] == "ocr" and doc["hits"][0]["path"].endswith("sign.jpg")
    assert doc["hits"][0]["metadata"]["ocr"]["matches"][0][0] == "bakery"  # what the page draws over the thumbnail


@pytest.mark.browser
@pytest.mark.slow  # a headless Chromium
def test_page_draws_the_matched_words_boxes_over_the_thumbnail(served):
    """The search page (real Chromium) in "words in image" mode: a box over "bakery" on the sign's
    thumbnail, where the words are (the SVG maps image pixels onto the thumbnail as it is fitted)."""
    import shutil

    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not chromium or not shutil.which("chromedriver"):
        if os.environ.get("CI") == "true":
            pytest.fail("headless Chromium not found; CI must run the browser tests (apt-get install chromium chromium-driver)")
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        server, _ = served
        driver.get(server.url + "/#q=bakery&mode=ocr&page=1&k=24&candidates=100&rerank=0")
        rect = WebDriverWait(driver, 30, poll_frequency=0.1).until(
            lambda d: d.execute_script("return document.querySelector('.card .thumb svg.ocr-boxes rect')"))
        assert driver.execute_script("return document.querySelector('#mode').value") == "ocr"
        box = driver.execute_script(
            "const r = arguments[0].getBoundingClientRect(), t = arguments[0].closest('.thumb').getBoundingClientRect();"
            "return [r.width, r.height, r.left - t.left, r.top - t.top, t.width, t.height];", rect)
        w, h, x, y, tw, th = box
        assert 0 < w < tw and 0 < h < th and 0 <= x < tw and 0 <= y < th  # a box inside the thumbnail, not all of it
    finally:
        driver.quit()
