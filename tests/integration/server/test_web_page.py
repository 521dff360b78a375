"""The search page of `mmr serve` in a real browser: headless Chromium (Selenium) against a real
uvicorn on 127.0.0.1, over a tiny indexed collection and a tiny reranker.

Needs `chromium` and `chromedriver` (Debian: apt-get install chromium chromium-driver): skipped
without them, except under CI=true, where a missing browser fails. Screenshots go to
$MMR_TEST_ARTIFACTS/web (default: test-artifacts/web in the checkout).
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest

from mm_retrieval.server import ServerConfig
from mm_retrieval.server.testing import serve_demo

pytestmark = [pytest.mark.browser, pytest.mark.slow]

KEY = "page-key"
QUERY = "a red picture"
PER_PAGE = 4
ARTIFACTS = Path(os.environ.get("MMR_TEST_ARTIFACTS") or Path(__file__).resolve().parents[3] / "test-artifacts") / "web"
INSTALL = "apt-get install chromium chromium-driver"


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser tests ({INSTALL}, or run .ci/run, which installs them)")
    pytest.skip(f"{reason}: {INSTALL}")


@pytest.fixture(scope="module")
def browser():
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        _unavailable(f"headless Chromium not found (chromium: {chromium or 'missing'}, chromedriver: {chromedriver or 'missing'})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable('selenium is not installed (pip install -e ".[test]")')
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                "--disable-extensions", "--no-first-run", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    # both paths given: Selenium Manager never tries to download a driver (tests stay offline)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server_config():
    return ServerConfig(api_key=KEY)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield lambda **body: c.post("/search", json=body).json()


# ---- helpers --------------------------------------------------------------------------------
def wait(driver, condition, what: str, timeout: float = 20):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        shot(driver, "failure")
        error = driver.execute_script("const e = document.getElementById('error'); return e && !e.hidden ? e.textContent : ''")
        raise AssertionError(f"timed out waiting for {what}" + (f"; the page shows the error: {error}" if error else "")) from None


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def el(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def cards(driver) -> list[tuple[int, str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results .card')].map(c => [Number(c.dataset.rank), c.dataset.id])")


def ids(doc) -> list[str]:
    return [h["id"] for h in doc["hits"]]


def open_page(driver, server, *, key: str | None = KEY) -> None:
    """Load the page with ``key`` already entered (as the key box stores it)."""
    driver.get(server.url + "/")
    driver.execute_script("sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('mmr-api-key', arguments[0]);", key)
    driver.get(server.url + "/")
    wait(driver, lambda d: "items" in el(d, "#collection-info").text, "the collection info")


def retype(element, text: str, *then: str) -> None:
    """Replace an input's text as a user would (clear() fires `change`, which re-runs the search)."""
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE, text, *then)


def search_for(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    retype(el(driver, "#per-page"), str(PER_PAGE))
    retype(el(driver, "#query"), text, Keys.ENTER)


def wait_cards(driver, want: list[str], what: str) -> None:
    wait(driver, lambda d: [i for _, i in cards(d)] == want, what)


def thumbnails_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#results .card img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)")


# ---- tests ----------------------------------------------------------------------------------
def test_the_page_asks_for_the_api_key_then_works(browser, server):
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(server.url + "/")
    wait(browser, lambda d: el(d, "#key-box").is_displayed(), "the API key box")
    assert "API key needed (HTTP 401)" in el(browser, "#error").text
    el(browser, "#api-key").send_keys(KEY)
    el(browser, "#key-save").click()
    wait(browser, lambda d: "8 items" in el(d, "#collection-info").text, "the collection info after entering the key")
    assert not el(browser, "#key-box").is_displayed() and not el(browser, "#error").is_displayed()


def test_search_rerank_toggle_and_paging(browser, server, api):
    reranked = api(query=QUERY, k=PER_PAGE, candidates=100, rerank=True)
    first_stage = api(query=QUERY, k=PER_PAGE, candidates=100, rerank=False)
    assert ids(reranked) != ids(first_stage), "fixture: the demo reranker must reorder this query's first page"

    open_page(browser, server)
    search_for(browser, QUERY)
    wait_cards(browser, ids(reranked), "the reranked first page")
    assert [r for r, _ in cards(browser)] == [1, 2, 3, 4]
    wait(browser, thumbnails_loaded, "the thumbnails (fetched with the API key)")
    first = el(browser, "#results .card")
    assert f"rerank {reranked['hits'][0]['score']:.3f}" in first.text
    assert f"image {reranked['hits'][0]['retrieval_score']:.3f}" in first.text
    assert "reranked" in el(browser, "#status").text
    shot(browser, "1-reranked")

    el(browser, "#rerank").click()  # off: the first stage's order
    wait_cards(browser, ids(first_stage), "the first-stage order after switching rerank off")
    assert "first stage only" in el(browser, "#status").text and "rerank –" in el(browser, "#results .card").text
    shot(browser, "2-first-stage")
    el(browser, "#rerank").click()  # on again
    wait_cards(browser, ids(reranked), "the reranked order after switching rerank back on")

    page2 = api(query=QUERY, k=PER_PAGE, offset=PER_PAGE, candidates=100, rerank=True)
    el(browser, "#next").click()
    wait_cards(browser, ids(page2), "page 2")
    assert [r for r, _ in cards(browser)] == [5, 6, 7, 8] and el(browser, "#page-label").text == "Page 2"
    assert "Results 5–8" in el(browser, "#status").text
    assert not el(browser, "#next").is_enabled()  # all 8 items shown
    wait(browser, thumbnails_loaded, "page 2's thumbnails")
    shot(browser, "3-page-2")
    el(browser, "#prev").click()
    wait_cards(browser, ids(reranked), "page 1 again")
    assert not el(browser, "#prev").is_enabled()


def test_heatmap_for_the_whole_query_a_word_and_a_head(browser, server, api):
    top = api(query=QUERY, k=PER_PAGE, candidates=100)["hits"][0]
    open_page(browser, server)
    search_for(browser, QUERY)
    wait_cards(browser, [h["id"] for h in api(query=QUERY, k=PER_PAGE, candidates=100)["hits"]], "results")
    el(browser, "#results .card").click()
    wait(browser, lambda d: len(d.execute_script("return document.querySelectorAll('#words button')")) == 4, "the word buttons")
    words = browser.execute_script("return [...document.querySelectorAll('#words button')].map(b => b.textContent)")
    assert words == ["whole query", "a", "red", "picture"]
    canvas = el(browser, "#heatmap")
    wait(browser, lambda d: canvas.get_attribute("data-ready") == "true", "the heatmap")
    whole = browser.execute_script("return document.getElementById('heatmap').toDataURL()")
    assert el(browser, "#detail-title").text == Path(top["path"]).name

    browser.execute_script("[...document.querySelectorAll('#words button')].find(b => b.textContent === 'red').click()")
    wait(browser, lambda d: canvas.get_attribute("data-word") == "red", "the heatmap of the word 'red'")
    red = browser.execute_script("return document.getElementById('heatmap').toDataURL()")
    assert red != whole
    # the drawing is the server's map: the patch the word attends to most is drawn bright, the least dark
    ex = httpx.post(f"{server.url}/explain", json={"query": QUERY, "id": top["id"]}, headers={"X-API-Key": KEY}, timeout=30).json()
    brightest, darkest = _patch_luminance(browser, ex["maps"][ex["words"].index("red")], ex["grid"])
    assert brightest > darkest + 100, (brightest, darkest)
    shot(browser, "4-heatmap-word-red")

    from selenium.webdriver.support.ui import Select

    Select(el(browser, "#head")).select_by_visible_text("head 2")
    wait(browser, lambda d: canvas.get_attribute("data-head") == "1", "head 2's heatmap")
    assert browser.execute_script("return document.getElementById('heatmap').toDataURL()") != red
    brightest, darkest = _patch_luminance(browser, ex["head_maps"][1][ex["words"].index("red")], ex["grid"])
    assert brightest > darkest + 100, (brightest, darkest)
    shot(browser, "5-heatmap-head-2")
    from selenium.webdriver.common.keys import Keys

    el(browser, "body").send_keys(Keys.ESCAPE)
    wait(browser, lambda d: not el(d, "#detail").is_displayed(), "the detail view to close")


def _patch_luminance(driver, grid_map, grid) -> tuple[float, float]:
    """Canvas luminance at the centres of the map's highest and lowest patches."""
    rows, cols = grid
    flat = [v for row in grid_map for v in row]
    hi, lo = flat.index(max(flat)), flat.index(min(flat))
    return tuple(driver.execute_script("""
        const [rows, cols, index] = arguments;
        const c = document.getElementById('heatmap');
        const side = Math.min(c.width, c.height), x0 = (c.width - side) / 2, y0 = (c.height - side) / 2;
        const r = Math.floor(index / cols), k = index % cols;
        const x = Math.floor(x0 + (k + 0.5) * side / cols), y = Math.floor(y0 + (r + 0.5) * side / rows);
        const [R, G, B] = c.getContext('2d').getImageData(x, y, 1, 1).data;
        return 0.299 * R + 0.587 * G + 0.114 * B;""", rows, cols, i) for i in (hi, lo))


def test_errors_from_the_server_are_shown(browser, server):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server)
    retype(el(browser, "#filter"), "path ===")
    search_for(browser, QUERY)
    wait(browser, lambda d: el(d, "#error").is_displayed(), "the error box")
    text = el(browser, "#error").text
    assert "HTTP 400" in text and "invalid filter expression 'path ==='" in text and "--filter" not in text
    assert cards(browser) == []
    shot(browser, "6-filter-error")
    retype(el(browser, "#filter"), 'path like "%red.png"', Keys.ENTER)
    wait(browser, lambda d: len(cards(d)) == 1 and not el(d, "#error").is_displayed(), "the filtered result")
    assert "red.png" in el(browser, "#results .card").text
    retype(el(browser, "#filter"), "")
    search_for(browser, "   ")
    wait(browser, lambda d: "query is empty" in el(d, "#error").text, "the empty-query error")


def test_search_by_uploaded_image_and_find_similar(browser, server, api, demo):
    blue = demo.paths[2]
    want = api(image=base64.b64encode(Path(blue).read_bytes()).decode(), k=PER_PAGE)
    open_page(browser, server)
    retype(el(browser, "#per-page"), str(PER_PAGE))
    upload = el(browser, "#image-file")
    browser.execute_script("arguments[0].hidden = false", upload)  # the label hides the native control
    upload.send_keys(blue)
    browser.execute_script("arguments[0].hidden = true", upload)
    wait_cards(browser, ids(want), "the results of the image query")
    assert el(browser, "#image-query").is_displayed() and "blue.png" in el(browser, "#image-query").text
    assert "image queries are not reranked" in el(browser, "#status").text
    wait(browser, thumbnails_loaded, "the image query's thumbnails")
    shot(browser, "7-image-query")

    el(browser, "#results .card").click()  # the blue image itself (distance 0)
    wait(browser, lambda d: "search was by image" in el(d, "#explain-status").text, "the note that maps need words")
    similar = api(image_id=want["hits"][0]["id"], k=PER_PAGE)
    el(browser, "#similar").click()
    wait_cards(browser, ids(similar), "the similar images")


def test_without_a_reranker_the_toggle_is_off_and_says_why(browser, demo):
    with serve_demo(None, demo=demo, rerank=False) as (server, _):
        open_page(browser, server, key=None)
        toggle = el(browser, "#rerank")
        assert not toggle.is_enabled() and not toggle.is_selected()
        assert "mmr serve --rerank DIR" in el(browser, "#rerank-note").text
        search_for(browser, QUERY)
        wait(browser, lambda d: len(cards(d)) == PER_PAGE, "results from the first stage")
        assert "rerank –" in el(browser, "#results .card").text
        shot(browser, "8-no-reranker")


def test_hybrid_cards_and_detail_show_the_same_labelled_scores(browser, tmp_path_factory):
    """Hybrid + rerank: each card shows the fused score (the order), the reranker's, the image and
    the caption similarity, each labelled; the detail panel shows the same numbers under the same
    names, and the attention view's image similarity is the card's."""
    import pandas as pd

    from mm_retrieval import Pipeline
    from mm_retrieval.server.testing import COLORS, TINY_ENCODER, DemoCollection, make_image, save_demo_reranker

    root = tmp_path_factory.mktemp("hybrid-page")
    rows = [{"path": str(make_image(root / "img" / f"{n}.png", rgb, seed=i)), "caption": f"a {n} picture"}
            for i, (n, rgb) in enumerate(COLORS.items())]
    pd.DataFrame(rows).to_csv(root / "items.csv", index=False)
    indexer = Pipeline(db=str(root / "mmr.db"), encoder=TINY_ENCODER)
    indexer.index(root / "items.csv", progress=False)
    ckpt = save_demo_reranker(indexer, root / "reranker")
    demo = DemoCollection(root=root, db=str(root / "mmr.db"), collection=indexer.store.name, checkpoint=ckpt,
                          paths=[r["path"] for r in rows])
    indexer.close()
    with serve_demo(None, ServerConfig(api_key=KEY), demo=demo) as (server, _):
        with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=60) as c:
            doc = c.post("/search", json={"query": QUERY, "k": PER_PAGE, "candidates": 100}).json()
        assert doc["mode"] == "hybrid" and doc["reranked"]
        open_page(browser, server)
        search_for(browser, QUERY)
        wait_cards(browser, ids(doc), "the hybrid, reranked first page")
        status = el(browser, "#status").text
        assert "mode hybrid" in status and "ordered by the fused score" in status
        pills = browser.execute_script(
            "return [...document.querySelectorAll('#results .card')].map(c => "
            "Object.fromEntries([...c.querySelectorAll('.score[data-score]')].map(p => [p.dataset.score, p.textContent])))")
        for hit, shown in zip(doc["hits"], pills):
            assert shown == {"fused": f"fused {hit['score']:.3f}", "rerank": f"rerank {hit['rerank_score']:.3f}",
                             "image": f"image {hit['image_score']:.3f}", "text": f"text {hit['text_score']:.3f}"}
        shot(browser, "9-hybrid-scores")

        top = doc["hits"][0]
        el(browser, "#results .card").click()
        wait(browser, lambda d: el(d, "#detail").is_displayed(), "the detail view")
        detail = browser.execute_script(
            "const dl = document.getElementById('detail-scores');"
            "return Object.fromEntries([...dl.querySelectorAll('dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent]))")
        assert detail["Rank"] == "#1 (by fused score)"
        assert detail["Fused score"].startswith(f"{top['score']:.3f} · ")
        assert detail["Reranker score"].startswith(f"{top['rerank_score']:.3f} · ")
        assert detail["Image similarity"].startswith(f"{top['image_score']:.3f} · ")
        assert detail["Caption similarity"].startswith(f"{top['text_score']:.3f} · ")
        assert not any("first" in k.lower() for k in detail)  # no unlabelled "first-stage score" (it was the RRF value)
        wait(browser, lambda d: "image similarity" in el(d, "#explain-status").text, "the attention view")
        assert f"image similarity {top['image_score']:.3f}" in el(browser, "#explain-status").text
        shot(browser, "10-hybrid-detail")
