"""The search page on a photo library, in a real browser (headless Chromium, as
tests/integration/server/test_web_page.py): the detail panel shows what the file says about itself (when,
where, which camera; issue 26), --mode ocr draws the matched words' boxes on the thumbnail where
the words are (issue 27), and "Hide near-duplicates" shows a group of copies once and says so.
Each collection is built here from real files (EXIF JPEGs, rendered text, re-saved copies)."""

from __future__ import annotations

import os
import random

import httpx
import numpy as np
import pytest
from PIL import Image

from mm_retrieval import Pipeline
from mm_retrieval.server.testing import TINY_ENCODER, DemoCollection, serve_demo
from tests.integration.server.test_web_page import (  # noqa: F401
    browser,
    cards,
    el,
    open_page,
    retype,
    shot,
    thumbnails_loaded,
    wait,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _served(root, db):
    """Serve the collection in ``db`` (no reranker, no API key)."""
    return serve_demo(None, demo=DemoCollection(root=root, db=db, collection="images", checkpoint=None), rerank=False)


def _search(driver, text: str, per_page: int, *, mode: str | None = None) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    retype(el(driver, "#per-page"), str(per_page))
    if mode is not None:
        Select(el(driver, "#mode")).select_by_value(mode)
    retype(el(driver, "#query"), text, Keys.ENTER)


def _detail_rows(driver) -> dict[str, str]:
    return driver.execute_script(
        "const dl = document.getElementById('detail-scores');"
        "return Object.fromEntries([...dl.querySelectorAll('dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent]))")


def test_detail_panel_shows_when_where_and_which_camera(browser, tmp_path):
    from mm_retrieval.testing.photos import exif_block, make_photo

    root = tmp_path / "Pictures"
    make_photo(root / "beach.jpg", (30, 120, 230), exif=exif_block(
        taken="2024:07:14 16:05:00", offset="+10:00", gps=(-33.8688, 151.2093, 5.0), make="Apple", model="iPhone 15 Pro",
        lens="iPhone 15 Pro back camera 6.86mm f/1.78"), seed=1)
    make_photo(root / "scan.png", (240, 220, 30), seed=2)  # no EXIF: the file's time
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder=TINY_ENCODER) as pipe:
        pipe.index(root, progress=False)
    with _served(tmp_path, db) as (server, _):
        open_page(browser, server, key=None)
        _search(browser, "a photo", 4)
        wait(browser, lambda d: len(cards(d)) == 2, "both photos")
        shown = {}
        for name in ("beach.jpg", "scan.png"):
            card = next(c for c in browser.find_elements("css selector", "#results .card") if name in c.text)
            card.click()
            wait(browser, lambda d: el(d, "#detail").is_displayed(), f"the detail view of {name}")
            wait(browser, lambda d: "Taken" in _detail_rows(d), f"the file's metadata of {name}")
            shown[name] = _detail_rows(browser)
            if name == "beach.jpg":
                shot(browser, "library-1-detail-exif")
                # no reranker: no attention controls beside the sentence saying so
                wait(browser, lambda d: "no cross-attention reranker" in el(d, "#explain-status").text, "the note on attention")
                assert not el(browser, "#head").is_displayed() and not el(browser, ".legend").is_displayed()
            el(browser, "#detail-close").click()
            wait(browser, lambda d: not el(d, "#detail").is_displayed(), "the detail view to close")
    beach = shown["beach.jpg"]
    assert beach["Taken"] == "2024-07-14 16:05:00+10:00 (from the photo)"
    assert beach["Place"] == "-33.86880, 151.20930 · 5 m"
    assert beach["Camera"] == "Apple iPhone 15 Pro · iPhone 15 Pro back camera 6.86mm f/1.78"
    assert beach["Size"] == "64 × 48 px"
    scan = shown["scan.png"]
    assert scan["Taken"].endswith("(the file's time)") and "Place" not in scan and "Camera" not in scan


def test_ocr_mode_draws_the_matched_words_boxes_where_the_words_are(browser, tmp_path):
    pytest.importorskip("rapidocr_onnxruntime", reason="the ocr extra: pip install 'mm-retrieval[ocr]'")
    from mm_retrieval.testing.text_images import fonts, sign_image

    root = tmp_path / "photos"
    face = (fonts() or [None])[0]
    # a wide sign: the thumbnail letterboxes it (object-fit: contain), so the boxes must follow
    sign_image(root / "sign.jpg", ["Harbour", "Bakery"], font=face, font_px=44, size=(480, 240), seed=1)
    Image.new("RGB", (120, 90), (90, 140, 60)).save(root / "field.png")  # no text: never an ocr hit
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder={**TINY_ENCODER, "workers": 0}) as pipe:
        pipe.index(root, progress=False, ocr=True)
    with _served(tmp_path, db) as (server, _):
        doc = httpx.post(f"{server.url}/search", json={"query": "bakery", "mode": "ocr", "k": 4}, timeout=60).json()
        (hit,) = doc["hits"]
        ocr = hit["metadata"]["ocr"]
        assert [m[0].lower() for m in ocr["matches"]] == ["bakery"], ocr["matches"]
        open_page(browser, server, key=None)
        _search(browser, "bakery", 4, mode="ocr")
        wait(browser, lambda d: [i for _, i in cards(d)] == [hit["id"]], "the sign, found by its word")
        wait(browser, thumbnails_loaded, "the thumbnail")
        drawn = browser.execute_script("""
            const card = document.querySelector('#results .card');
            const img = card.querySelector('.thumb img'), svg = card.querySelector('svg.ocr-boxes');
            const box = (r) => { const b = r.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
            return {viewBox: svg.getAttribute('viewBox'), img: box(img), natural: [img.naturalWidth, img.naturalHeight],
                    rects: [...svg.querySelectorAll('rect')].map(r => ({attrs: ['x', 'y', 'width', 'height'].map(a => Number(r.getAttribute(a))),
                                                                       screen: box(r), title: r.textContent}))};""")
        shot(browser, "library-2-ocr-boxes")
    w, h = ocr["size"]
    assert drawn["viewBox"] == f"0 0 {w} {h}"
    (rect,) = drawn["rects"]
    word, x0, y0, x1, y1 = ocr["matches"][0]
    assert rect["attrs"] == [x0, y0, max(1, x1 - x0), max(1, y1 - y0)] and rect["title"] == f"read: {word}"
    # where the word is on screen: the image as object-fit: contain draws it in its box
    left, top, right, bottom = drawn["img"]
    scale = min((right - left) / w, (bottom - top) / h)
    ox, oy = left + ((right - left) - w * scale) / 2, top + ((bottom - top) - h * scale) / 2
    expected = [ox + x0 * scale, oy + y0 * scale, ox + x1 * scale, oy + y1 * scale]
    assert np.allclose(rect["screen"], expected, atol=1.5), (rect["screen"], expected)
    assert drawn["natural"][0] / drawn["natural"][1] == pytest.approx(w / h, rel=0.02)  # the thumbnail is the image OCR read


def test_hide_near_duplicates_shows_a_group_once_and_says_so(browser, tmp_path):
    from mm_retrieval.bench.dupes import make_copy, make_shot
    from mm_retrieval.demo import SHIPPED

    root = tmp_path / "photos"
    root.mkdir()
    for name, (subject, seed) in {"beach": (1, 1), "beach_other": (1, 2), "street": (2, 3)}.items():
        Image.fromarray(make_shot(subject, np.random.default_rng(seed), 320, 240)).save(root / f"{name}.jpg", quality=92)
    im = Image.open(root / "beach.jpg")
    im.resize((160, 120), Image.Resampling.LANCZOS).save(root / "beach_small.jpg", quality=85)
    copy, _ = make_copy(im, "jpeg", random.Random(0))
    copy.save(root / "beach_q30.jpg", quality=30)
    copies = {"beach.jpg", "beach_small.jpg", "beach_q30.jpg"}
    db = str(tmp_path / "mmr.db")
    with Pipeline(db=db, encoder={"model": str(SHIPPED / "encoder"), "workers": 0, "batch_size": 8}) as pipe:
        pipe.index(root, progress=False)
    with _served(tmp_path, db) as (server, _):
        open_page(browser, server, key=None)

        def names(d):
            return [os.path.basename(n) for n in d.execute_script(
                "return [...document.querySelectorAll('#results .card .name')].map(n => n.textContent)")]

        _search(browser, "a beach", 10)
        wait(browser, lambda d: len(cards(d)) == 5, "every photo")
        assert copies <= set(names(browser))
        el(browser, "#collapse-duplicates").click()
        wait(browser, lambda d: len(cards(d)) == 3, "one card per group of copies")
        shown = names(browser)
        assert len(set(shown) & copies) == 1 and {"beach_other.jpg", "street.jpg"} <= set(shown)
        status = el(browser, "#status").text
        kept = next(c for c in browser.find_elements("css selector", "#results .card")
                    if os.path.basename(c.find_element("css selector", ".name").text) in copies)
        shot(browser, "library-3-collapsed")
        assert "2 near-duplicates hidden" in status, status
        assert "+2 near-duplicates" in kept.text, kept.text
        assert "dedupe=1" in browser.current_url  # kept in the bookmarkable URL
