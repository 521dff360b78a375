"""The search page plays video moments: `mmr serve` over a collection with real video files made
with PyAV beside images, on a real uvicorn on 127.0.0.1.

* /search returns moments (`video`, `start`, `end`, `frame`), one per video unless asked for all;
* /thumb and /image of a moment show its representative frame (decoded at `frame`);
* /video/{id} serves only indexed videos, by a moment's id or the video's, with HTTP range
  requests (206, 416, HEAD), under the same path rules as /image (a swapped-in symlink is 403);
* in headless Chromium (marked browser + slow, like test_web_page.py): a moment's card shows the
  frame with a time badge, and the detail view's <video> plays the file from the moment's start.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mm_retrieval import Pipeline
from mm_retrieval.decode import item_id
from mm_retrieval.server import ServerConfig
from mm_retrieval.server.testing import COLORS, TINY_ENCODER, DemoCollection, make_image, save_demo_reranker, serve_demo
from mm_retrieval.testing.videos import make_video
from mm_retrieval.video import VideoConfig, hash_file
from tests.integration.server.test_web_page import browser, el, open_page, retype, shot, wait  # noqa: F401 (browser: a fixture)

KEY = "video-key"
# Solid colours, far apart: each scene is its own moment even for the random tiny encoder.
SCENES = [("red", 3.0), ("blue", 3.0), ("green", 3.0)]
OTHER = [("yellow", 2.0), ("purple", 2.0)]
SEGMENT_FIELDS = ["id", "path", "media_id", "start", "end", "frame"]


@dataclass
class VideoCollection:
    demo: DemoCollection
    clip: Path  # the video the tests play (SCENES)
    clip_id: str  # its item id (the media id of its moments)
    scenes: list[tuple[float, float]]  # SCENES' true intervals
    moments: list[dict]  # its segments' rows, by start
    swap: Path  # a second video, swapped for a symlink by the 403 test
    swap_id: str
    image_id: str


def _moments(pipe: Pipeline, video_id: str) -> list[dict]:
    rows = pipe.store.query(f'media_id == "{video_id}"', SEGMENT_FIELDS, 100)
    return sorted(rows, key=lambda r: r["start"])


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> VideoCollection:
    root = tmp_path_factory.mktemp("web-video")
    media = root / "media"
    images = [make_image(media / f"{name}.png", COLORS[name], seed=i) for i, name in enumerate(("red", "orange", "white"))]
    clip, swap = media / "clip.webm", media / "swap.webm"
    scenes = make_video(clip, SCENES, fps=4, size=64)
    make_video(swap, OTHER, fps=4, size=64, seed=1)
    pipe = Pipeline(db=str(root / "mmr.db"), encoder=TINY_ENCODER, video=VideoConfig(fps=2.0))
    report = pipe.index(media, progress=False)
    assert not report.failed, report.failed
    clip_id, swap_id = item_id(hash_file(clip)), item_id(hash_file(swap))
    moments = _moments(pipe, clip_id)
    assert len(moments) >= 2, f"fixture: the clip must hold several moments, got {moments}"
    checkpoint = save_demo_reranker(pipe, root / "reranker")  # explain overlays on a moment's frame
    demo = DemoCollection(root=root, db=str(root / "mmr.db"), collection=pipe.store.name, checkpoint=checkpoint,
                          paths=[str(p.resolve()) for p in images])
    image_id = pipe.store.query('path like "%red.png"', ["id"], 1)[0]["id"]
    pipe.close()
    return VideoCollection(demo=demo, clip=clip.resolve(), clip_id=clip_id, scenes=scenes, moments=moments,
                           swap=swap.resolve(), swap_id=swap_id, image_id=image_id)


@pytest.fixture(scope="module")
def video_server(videos):
    with serve_demo(None, None, demo=videos.demo) as (server, _):
        yield server


@pytest.fixture(scope="module")
def client(video_server):
    with httpx.Client(base_url=video_server.url, timeout=60) as c:
        yield c


def _scene_at(videos: VideoCollection, t: float) -> str:
    return next(name for (name, _), (a, b) in zip(SCENES, videos.scenes) if a <= t < b)


# ---- search JSON -------------------------------------------------------------------------------
def test_search_returns_moments_one_per_video_unless_asked(client, videos):
    only_clip = 'path like "%clip.webm"'
    first_stage = {"query": "a red picture", "k": 50, "rerank": False}  # grouping picks each video's best first-stage moment
    every = client.post("/search", json={**first_stage, "filter": only_clip, "group_by_video": False}).json()
    assert len(every["hits"]) == len(videos.moments) >= 2
    by_id = {m["id"]: m for m in videos.moments}
    for hit in every["hits"]:
        m = by_id[hit["id"]]
        assert hit["video"] == {"id": videos.clip_id, "path": str(videos.clip)} and hit["path"] == str(videos.clip)
        assert (hit["start"], hit["end"], hit["frame"]) == pytest.approx((m["start"], m["end"], m["frame"]))
        assert hit["start"] <= hit["frame"] < hit["end"]
    grouped = client.post("/search", json={**first_stage, "filter": only_clip}).json()
    assert [h["id"] for h in grouped["hits"]] == [every["hits"][0]["id"]]  # the best moment, alone
    assert client.post("/search", json={"query": "x", "group_by_video": "no"}).status_code == 422

    mixed = client.post("/search", json={"query": "a red picture", "k": 50}).json()  # reranked: moments too
    videos_seen = [h["video"]["id"] for h in mixed["hits"] if "video" in h]
    assert sorted(videos_seen) == sorted({videos.clip_id, videos.swap_id})  # one moment each
    image = next(h for h in mixed["hits"] if h["id"] == videos.image_id)
    assert not {"video", "start", "end", "frame"} & set(image)  # image hits keep their shape


def test_thumb_and_image_of_a_moment_show_its_frame(client, videos):
    for m in videos.moments:
        want = np.array(COLORS[_scene_at(videos, m["frame"])], dtype=float)
        for route in ("thumb", "image"):
            r = client.get(f"/{route}/{m['id']}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text[:200]
            got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0)
            assert np.abs(got - want).max() < 40, (route, m, got, want)


@pytest.mark.parametrize("suffix", [".webm", ".mp4", ".avi"])
def test_the_frame_shown_at_a_time_is_the_one_on_screen_then(tmp_path, suffix):
    """What /thumb draws for a moment: the last frame starting at or before its `frame` time."""
    from mm_retrieval.server.media import frame_at

    path = tmp_path / f"v{suffix}"
    make_video(path, [("red", 2.0), ("blue", 2.0), ("green", 1.0)], fps=4)
    for t, scene in ((0.0, "red"), (1.9, "red"), (2.0, "blue"), (3.99, "blue"), (4.0, "green"), (60.0, "green")):
        with open(path, "rb") as f:
            got = np.asarray(frame_at(f, t).convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0)
        assert np.abs(got - np.array(COLORS[scene])).max() < 40, (suffix, t, scene, got)


# ---- /video/{id} -------------------------------------------------------------------------------
def test_video_route_serves_the_file_with_range_requests(client, videos):
    data = videos.clip.read_bytes()
    n = len(data)
    moment = videos.moments[-1]["id"]
    for ref in (moment, videos.clip_id):  # a moment's id or the video's
        r = client.get(f"/video/{ref}")
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-type"] == "video/webm" and r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-length"] == str(n) and r.headers["etag"]

    def ranged(spec: str, **headers) -> httpx.Response:
        return client.get(f"/video/{moment}", headers={"Range": spec, **headers})

    r = ranged("bytes=0-99")
    assert r.status_code == 206 and r.content == data[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{n}" and r.headers["content-length"] == "100"
    assert ranged(f"bytes=100-{n + 5000}").content == data[100:]  # an end past the file is clamped
    r = ranged("bytes=-50")  # a suffix: the last 50 bytes
    assert r.status_code == 206 and r.content == data[-50:] and r.headers["content-range"] == f"bytes {n - 50}-{n - 1}/{n}"
    r = ranged(f"bytes={n - 1}-")
    assert r.status_code == 206 and r.content == data[-1:]
    for bad in (f"bytes={n}-", f"bytes={n + 10}-{n + 20}", "bytes=9-3", "bytes=abc", "bytes=-0", "bytes=-"):
        r = ranged(bad)
        assert r.status_code == 416, bad
        assert r.headers["content-range"] == f"bytes */{n}"
    assert ranged("bytes=0-9, 20-29").content == data  # several ranges: the whole file (200)
    assert ranged("items=0-1").status_code == 200  # a unit we don't know is ignored
    etag = client.get(f"/video/{moment}").headers["etag"]
    assert ranged("bytes=0-9", **{"If-Range": etag}).status_code == 206
    assert ranged("bytes=0-9", **{"If-Range": '"stale"'}).status_code == 200

    head = client.head(f"/video/{moment}")
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(n)
    head = client.head(f"/video/{moment}", headers={"Range": "bytes=10-19"})
    assert head.status_code == 206 and head.headers["content-range"] == f"bytes 10-19/{n}" and head.content == b""


def test_the_video_route_leaves_no_file_open(client, videos):
    """Every way a response ends -- sent whole, a range, HEAD, 416, a client that hangs up before
    reading -- closes the server's descriptor of the file."""
    moment = videos.moments[0]["id"]

    def open_copies() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if _target(fd) == str(videos.clip))

    for _ in range(3):
        client.get(f"/video/{moment}")
        client.get(f"/video/{moment}", headers={"Range": "bytes=5-"})
        client.head(f"/video/{moment}")
        client.get(f"/video/{moment}", headers={"Range": "bytes=999999999-"})
        with httpx.Client(base_url=str(client.base_url), timeout=30) as other:
            with other.stream("GET", f"/video/{moment}") as r:
                assert r.status_code == 200  # and hang up without reading the body
    deadline = time.monotonic() + 10
    while open_copies() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_copies() == 0


def _target(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""


def test_video_route_serves_only_indexed_videos(client, videos):
    for ref, why in ((videos.image_id, "is an image, not a video"), ("0" * 32, "no item or video"),
                     ("not-an-id", "is not an item id")):
        for method in ("GET", "HEAD"):
            r = client.request(method, f"/video/{ref}")
            assert r.status_code == 404, (ref, method)
            if method == "GET":
                assert why in r.json()["detail"]
    for sneaky in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", f"{videos.clip_id}%2F..%2F..%2Fmmr.db"):
        assert client.get(f"/video/{sneaky}").status_code == 404


def test_a_video_swapped_for_a_symlink_is_refused(client, videos, tmp_path):
    outside = tmp_path / "elsewhere.webm"
    make_video(outside, [("black", 1.0)])
    moment = _one_moment(videos.swap_id, client)
    assert client.get(f"/video/{moment}").status_code == 200
    os.replace(videos.swap, tmp_path / "moved.webm")
    os.symlink(outside, videos.swap)
    for path in (f"/video/{moment}", f"/video/{videos.swap_id}", f"/thumb/{moment}", f"/image/{moment}"):
        r = client.get(path)
        assert r.status_code == 403 and "resolves to another location" in r.json()["detail"], path
    videos.swap.unlink()
    assert client.get(f"/video/{moment}").status_code == 404  # gone: 404 naming `mmr sync`
    assert "mmr sync" in client.get(f"/video/{moment}").json()["detail"]


def _one_moment(video: str, client: httpx.Client) -> str:
    hits = client.post("/search", json={"query": "a picture", "k": 50, "group_by_video": False}).json()["hits"]
    return next(h["id"] for h in hits if h.get("video", {}).get("id") == video)


# ---- the page, in headless Chromium -------------------------------------------------------------
@pytest.mark.browser
@pytest.mark.slow
def test_the_card_shows_the_moment_and_the_player_starts_there(browser, video_server, videos):
    last = videos.moments[-1]  # the latest moment: its start is well past 0
    _search_moments(browser, video_server)
    badge = browser.execute_script(
        "const c = document.querySelector(`#results .card[data-id='${arguments[0]}']`);"
        "return c && c.querySelector('.time-badge') ? c.querySelector('.time-badge').textContent : null", last["id"])
    assert badge == f"▶ {_clock(last['start'])}–{_clock(last['end'], up=True)}"
    assert el(browser, f"#results .card[data-id='{last['id']}']").get_attribute("data-video") == videos.clip_id
    shot(browser, "video-1-moments")
    assert _play(browser, last, shoot="video-2-player", explained=True) == f"video/{last['id']}"  # streamed by range requests


@pytest.mark.browser
@pytest.mark.slow
def test_with_an_api_key_the_player_streams_from_a_signed_link(browser, videos):
    last = videos.moments[-1]
    with serve_demo(None, ServerConfig(api_key=KEY), demo=videos.demo, rerank=False) as (server, _):
        _search_moments(browser, server, key=KEY)
        src = _play(browser, last)
        assert src.startswith(f"video/{last['id']}?expires=") and "&sig=" in src  # streamed, not fetched whole


def test_signed_video_links_open_that_video_only_until_they_expire(videos):
    import time

    import httpx

    from mm_retrieval.server.middleware import video_signature

    first, last = videos.moments[0], videos.moments[-1]
    with serve_demo(None, ServerConfig(api_key=KEY), demo=videos.demo, rerank=False) as (server, _):
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get(f"/video-link/{last['id']}").status_code == 401  # issuing one needs the key
            link = http.get(f"/video-link/{last['id']}", headers={"X-API-Key": KEY}).json()
            assert link["expires"] > time.time() + 3600
            ranged = http.get("/" + link["url"], headers={"Range": "bytes=0-99"})
            assert ranged.status_code == 206 and len(ranged.content) == 100  # no key: the signature lets it through
            other = link["url"].replace(last["id"], first["id"])
            assert http.get("/" + other).status_code == 401  # signed for one video
            assert http.get(f"/video/{last['id']}").status_code == 401  # unsigned
            past = int(time.time()) - 1
            expired = f"/video/{last['id']}?expires={past}&sig={video_signature(KEY, last['id'], past)}"
            assert http.get(expired).status_code == 401
            assert http.get(f"/video-link/{'0' * 32}", headers={"X-API-Key": KEY}).status_code == 404


def _search_moments(browser, server, key: str | None = None) -> None:
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server, key=key)
    assert el(browser, "#group-label").is_displayed()  # the collection holds videos
    el(browser, "#group-by-video").click()  # every moment, not one per video
    retype(el(browser, "#filter"), 'path like "%clip.webm"')
    retype(el(browser, "#query"), "a picture", Keys.ENTER)
    wait(browser, lambda d: len(d.find_elements("css selector", "#results .card.moment")) >= 2, "the clip's moments")


def _play(browser, moment, shoot: str = "", explained: bool = False) -> str:
    """Open the moment's detail view, wait for its player to seek to the moment (and, ``explained``,
    for the reranker's heatmap over its frame), close it; the player's src."""
    el(browser, f"#results .card[data-id='{moment['id']}']").click()
    wait(browser, lambda d: el(d, "#player").is_displayed(), "the player")
    wait(browser, lambda d: d.execute_script("return document.getElementById('player').dataset.ready") == "true",
         "the player to seek to the moment")
    t = browser.execute_script("return document.getElementById('player').currentTime")
    assert moment["start"] - 0.3 <= t <= moment["end"] + 0.5, (t, moment)
    assert browser.execute_script("return document.getElementById('player').readyState") >= 1
    assert el(browser, "#detail-title").text.endswith(f"{_clock(moment['start'])}–{_clock(moment['end'], up=True)}")
    if explained:
        wait(browser, lambda d: el(d, "#heatmap").get_attribute("data-ready") == "true", "the heatmap over the moment's frame")
        assert el(browser, "#heatmap").is_displayed() and len(browser.find_elements("css selector", "#words button")) == 3
    src = browser.execute_script("return document.getElementById('player').getAttribute('src')")
    if shoot:
        shot(browser, shoot)
    from selenium.webdriver.common.keys import Keys

    el(browser, "body").send_keys(Keys.ESCAPE)
    wait(browser, lambda d: not el(d, "#detail").is_displayed(), "the detail view to close")
    assert browser.execute_script("return document.getElementById('player').getAttribute('src')") is None  # stopped
    return src


def _clock(seconds: float, *, up: bool = False) -> str:
    import math

    t = math.ceil(seconds) if up else math.floor(seconds)
    return f"{t // 60}:{t % 60:02d}"
