"""`mmr serve`'s search page and its routes over real HTTP: the page and static files, /collection,
thumbnails and images served only for indexed items at their recorded paths (no traversal, no
symlink escapes), /explain, and /search by image bytes, by item id, with modes and paging."""

import base64
import http.client
import io
import os
import random
import urllib.parse

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mm_retrieval import Pipeline
from mm_retrieval.explain import attention_maps
from mm_retrieval.server import ServerConfig
from mm_retrieval.server.app import create_app
from mm_retrieval.server.background import BackgroundServer
from mm_retrieval.server.engine import Engine
from mm_retrieval.server.testing import TINY_ENCODER, make_image, serve_demo

KEY = "web-key"
AUTH = {"X-API-Key": KEY}
CONFIG = ServerConfig(api_key=KEY, max_body_bytes=1024 * 1024, max_image_bytes=64 * 1024, thumb_size=32)
QUERY = "a red picture"


@pytest.fixture(scope="module")
def server_config():
    return CONFIG


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0].url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(served):
    """The same collection through the Python API."""
    return served[1].pipeline()


def _ids(doc):
    return [h["id"] for h in doc["hits"]]


def _raw_get(server, path: str, headers=AUTH) -> tuple[int, bytes]:
    """GET ``path`` byte for byte (http.client, unlike httpx, does not normalise ``..``)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


# ---- the page -------------------------------------------------------------------------------
def test_page_and_static_files_need_no_key_and_the_data_does(served):
    server, _ = served
    for path in ("/", "/ui"):
        page = httpx.get(server.url + path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="query"' in page.text and 'src="static/app.js"' in page.text
    js = httpx.get(f"{server.url}/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript") and "postJSON(\"search\"" in js.text
    assert httpx.get(f"{server.url}/static/app.css").headers["content-type"].startswith("text/css")
    for other in ("index.html", "..%2F..%2Fweb.py", "..%2Fmedia.py"):  # a fixed list, not a folder
        assert httpx.get(f"{server.url}/static/{other}", headers=AUTH).status_code == 404
    for path in ("/collection", f"/thumb/{'0' * 32}"):
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.post(f"{server.url}/explain", json={"query": "q", "id": "0" * 32}).status_code == 401


def test_collection_describes_what_the_page_can_offer(client):
    doc = client.get("/collection").json()
    assert doc["collection"] == "images" and doc["items"] == 8 and doc["items_with_text"] == 0
    assert doc["reranker"] is True and doc["explain"] is True and doc["modes"] == ["image"]
    assert doc["defaults"] == {"k": 10, "candidates": 100, "mode": "auto"}
    assert doc["limits"]["max_image_bytes"] == 64 * 1024


# ---- images of indexed items ----------------------------------------------------------------
def test_thumbnails_and_images_are_resized_jpegs_with_caching(client, reference, served):
    hit = reference.search(QUERY, k=1, rerank=False).hits[0]
    res = client.get(f"/thumb/{hit.id}")
    assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    assert "max-age" in res.headers["cache-control"] and res.headers["etag"]
    thumb = Image.open(io.BytesIO(res.content))
    assert thumb.format == "JPEG" and max(thumb.size) == 32  # the demo images are 72x56
    again = client.get(f"/thumb/{hit.id}", headers={"If-None-Match": res.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    full = Image.open(io.BytesIO(client.get(f"/image/{hit.id}").content))
    assert full.format == "JPEG" and full.size == Image.open(hit.path).size
    # the colour survives: the red image's thumbnail is red
    r, g, b = np.asarray(thumb.convert("RGB"), float).reshape(-1, 3).mean(0)
    want = np.asarray(Image.open(hit.path).convert("RGB"), float).reshape(-1, 3).mean(0)
    assert np.abs(np.array([r, g, b]) - want).max() < 25


@pytest.mark.parametrize("path", [
    "/thumb/../../etc/passwd", "/image/../../../../etc/passwd", "/thumb/..%2F..%2F..%2Fetc%2Fpasswd",
    "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/image/%2Fetc%2Fpasswd", "/thumb/etc/passwd", "/thumb//etc/passwd",
    "/thumb/" + "0" * 32, "/image/" + "f" * 32, "/thumb/" + "A" * 32, "/thumb/" + "0" * 31, "/thumb/" + urllib.parse.quote("0" * 32 + "/.."),
])
def test_no_path_reaches_a_file_that_is_not_an_indexed_item(served, path):
    status, body = _raw_get(served[0], path)
    assert status == 404, body
    assert b"root:" not in body


def test_unknown_and_malformed_ids_say_why(client):
    assert "no item " + "0" * 32 in client.get("/thumb/" + "0" * 32).json()["detail"]
    assert "not an item id" in client.get("/image/not-an-id").json()["detail"]


@pytest.fixture
def linked(tmp_path):
    """A collection indexed from a table: a.png through a symlinked folder, b.png directly.
    Returns (db, file name -> item id, b.png's path, the real folder of a.png)."""
    real = tmp_path / "real"
    make_image(real / "a.png", (200, 30, 30), seed=1)
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    b = make_image(tmp_path / "direct" / "b.png", (30, 30, 200), seed=2)
    table = tmp_path / "items.csv"
    pd.DataFrame({"path": [str(tmp_path / "linked" / "a.png"), str(b)]}).to_csv(table, index=False)
    db = str(tmp_path / "mmr.db")
    pipe = Pipeline(db=db, encoder=TINY_ENCODER)
    pipe.index(table, progress=False)
    ids = {os.path.basename(r["path"]): r["id"] for r in pipe.store.iter_rows(("id", "path"))}
    pipe.close()
    return db, ids, b, real


def _serve(db, config=None):
    return BackgroundServer(create_app(Engine(Pipeline(db=db, encoder={"workers": 0}), config or ServerConfig())))


def test_symlinks_never_lead_outside_the_recorded_paths(linked, tmp_path):
    db, ids, b, real = linked
    outside = make_image(tmp_path / "elsewhere" / "secret.png", (0, 255, 0), seed=3)
    with _serve(db) as server:
        get = lambda path: httpx.get(server.url + path, timeout=30)  # noqa: E731
        assert get(f"/thumb/{ids['b.png']}").status_code == 200
        # A was recorded through a symlinked folder: its real path is not the recorded one
        res = get(f"/thumb/{ids['a.png']}")
        assert res.status_code == 403 and "--media-root" in res.json()["detail"]
        # B's file replaced by a symlink to an image outside: refused, and so is one to /etc/passwd
        b.unlink()
        b.symlink_to(outside)
        for path in (f"/thumb/{ids['b.png']}", f"/image/{ids['b.png']}"):
            res = get(path)
            assert res.status_code == 403 and "resolves to another location" in res.json()["detail"], res.text
        b.unlink()
        b.symlink_to("/etc/passwd")
        assert get(f"/image/{ids['b.png']}").status_code == 403
        b.unlink()  # gone: 404 naming the fix
        res = get(f"/image/{ids['b.png']}")
        assert res.status_code == 404 and "mmr sync" in res.json()["detail"]
    # --media-root: files whose real path lies under it are served
    with _serve(db, ServerConfig(media_roots=(str(real),))) as server:
        res = httpx.get(f"{server.url}/image/{ids['a.png']}", timeout=30)
        assert res.status_code == 200 and Image.open(io.BytesIO(res.content)).size == (72, 56)


# ---- /explain -------------------------------------------------------------------------------
def test_explain_returns_the_maps_of_mmr_explain(client, reference):
    hit = reference.search(QUERY, k=1).hits[0]
    doc = client.post("/explain", json={"query": QUERY, "id": hit.id}).json()
    want = attention_maps(reference, QUERY, hit.id)
    assert doc["words"] == want.words == ["a", "red", "picture"] and doc["grid"] == [8, 8] and doc["heads"] == 2
    np.testing.assert_allclose(doc["maps"], want.maps, atol=1e-4)
    np.testing.assert_allclose(doc["head_maps"], want.head_maps, atol=1e-4)
    assert np.asarray(doc["head_maps"]).shape == (2, 3, 8, 8)
    assert doc["score"] == pytest.approx(hit.score, abs=1e-3)
    assert client.post("/explain", json={"query": QUERY, "id": "0" * 32}).status_code == 404
    assert client.post("/explain", json={"query": QUERY, "id": "../../etc/passwd"}).status_code == 422
    assert "query is empty" in client.post("/explain", json={"query": " ", "id": hit.id}).text


def test_explain_without_a_reranker_says_how_to_get_one(served):
    with serve_demo(None, demo=served[1], rerank=False) as (server, demo):
        some_id = httpx.post(f"{server.url}/search", json={"query": QUERY, "k": 1}, timeout=30).json()["hits"][0]["id"]
        res = httpx.post(f"{server.url}/explain", json={"query": QUERY, "id": some_id}, timeout=30)
        assert res.status_code == 422 and "--rerank" in res.json()["detail"]
        assert httpx.get(f"{server.url}/collection", timeout=30).json()["reranker"] is False


# ---- /search by image, by id, modes, paging --------------------------------------------------
def _png_bytes(color, size=(40, 30), seed=5) -> bytes:
    im = Image.new("RGB", size, color)
    px = im.load()
    rng = random.Random(seed)
    for _ in range(10):
        px[rng.randrange(size[0]), rng.randrange(size[1])] = (rng.randrange(256), 0, 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_search_by_image_bytes_and_by_id_equals_pipeline_search(client, reference, served):
    data = _png_bytes((30, 60, 210))
    want = reference.search(image=data, k=5)
    for image in (base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode()):
        got = client.post("/search", json={"image": image, "k": 5}).json()
        assert _ids(got) == [h.id for h in want.hits] and got["reranked"] is False  # images are not reranked
        assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in want.hits], abs=1e-5)
        assert got["query"] == f"image:<{len(data)} bytes>"
    item = want.hits[2].id
    by_id = client.post("/search", json={"image_id": item, "k": 4}).json()
    assert _ids(by_id) == [h.id for h in reference.search(image_id=item, k=4).hits] and by_id["hits"][0]["id"] == item
    assert by_id["query"] == f"image:{item}"


@pytest.mark.parametrize("body,status,mention", [
    ({"image": base64.b64encode(b"GIF89a but not really an image at all").decode()}, 422, "not a usable image"),
    ({"image": base64.b64encode(b"plain text").decode()}, 422, "not a usable image"),
    ({"image": "data:text/plain;base64,aGVsbG8="}, 422, "not an image"),
    ({"image": "not base64 !!!"}, 422, "not valid base64"),
    ({"image": ""}, 422, "empty"),
    ({"image_id": "0" * 32}, 400, "no indexed image"),
    ({"image_id": "../etc/passwd"}, 422, "image_id"),
    ({"query": "a red picture", "image_id": "0" * 32}, 422, "exactly one of"),
    ({}, 422, "exactly one of"),
    ({"query": "a red picture", "mode": "text"}, 400, "needs text vectors"),
    ({"image_id": "0" * 32, "mode": "hybrid"}, 400, "needs text vectors"),
    ({"query": "a red picture", "offset": -1}, 422, "offset"),
    ({"query": "a red picture", "k": 16000, "offset": 1000}, 422, "k + offset"),
])
def test_bad_search_requests_get_a_4xx_that_says_why(client, body, status, mention):
    res = client.post("/search", json=body)
    assert res.status_code == status, res.text
    assert mention in res.json()["detail"]


def test_image_uploads_are_bounded(client):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    assert len(buf.getvalue()) > 64 * 1024
    res = client.post("/search", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert res.status_code == 413 and "65,536-byte limit (--max-image-mb)" in res.json()["detail"]
    big_body = client.post("/search", json={"image": "A" * (1100 * 1024)})  # past the whole-body bound
    assert big_body.status_code == 413 and "--max-body-mb" in big_body.json()["detail"]


@pytest.mark.parametrize("rerank", [True, False])
def test_offset_pages_through_the_same_ranking(client, rerank):
    whole = client.post("/search", json={"query": QUERY, "k": 8, "candidates": 8, "rerank": rerank}).json()
    pages = [client.post("/search", json={"query": QUERY, "k": 3, "offset": o, "candidates": 8, "rerank": rerank}).json() for o in (0, 3, 6)]
    assert sum((_ids(p) for p in pages), []) == _ids(whole)
    assert [h["rank"] for h in pages[1]["hits"]] == [4, 5, 6] and [h["rank"] for h in pages[2]["hits"]] == [7, 8]
    assert client.post("/search", json={"query": QUERY, "k": 3, "offset": 8, "candidates": 8, "rerank": rerank}).json()["hits"] == []
