"""`mmr serve` as an operator and an API user meet it: /docs and /redoc work offline (their assets
are served by the server itself), one access-log line per request that never holds the key, a
query string or a body, and filter errors that quote the filter as it was sent."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from mm_retrieval.errors import InputError
from mm_retrieval.server import ServerConfig
from mm_retrieval.server.middleware import DOCS_ASSETS, access_log
from mm_retrieval.server.run import configure_access_log
from tests.helpers import free_port

KEY = "docs-secret-key"
AUTH = {"X-API-Key": KEY}
CONFIG = ServerConfig(api_key=KEY, max_body_bytes=64 * 1024)
QUERY = "a red picture"
LINE = re.compile(r"(GET|POST) (\S+) (\d{3}) \d+\.\d ms")


@pytest.fixture(scope="module")
def server_config():
    return CONFIG


@pytest.fixture(scope="module")
def url(served):
    return served[0].url


@pytest.fixture
def access(caplog):
    """The access log's records (propagated to caplog, as without `mmr serve`'s own handler)."""
    saved = access_log.level, access_log.propagate, list(access_log.handlers)
    access_log.propagate = True
    caplog.set_level(logging.INFO, logger=access_log.name)
    yield caplog
    access_log.setLevel(saved[0])
    access_log.propagate = saved[1]
    access_log.handlers[:] = saved[2]


def _lines(caplog, n: int) -> list[str]:
    """The first ``n`` access-log messages; the server logs a request just after answering it."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == access_log.name]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


# ---- /docs offline -----------------------------------------------------------------------------
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_only_assets_the_server_serves(url, page):
    html = httpx.get(url + page, timeout=30)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert "://" not in html.text  # no CDN, no web fonts: nothing outside this server
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert any(a.endswith(".js") for a in assets), html.text
    kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
    for asset in assets:
        assert asset.startswith(DOCS_ASSETS + "/"), asset
        res = httpx.get(url + asset, timeout=30)  # no API key: a script tag can't send one
        assert res.status_code == 200, asset
        assert kinds[os.path.splitext(asset)[1]] in res.headers["content-type"], (asset, res.headers["content-type"])
        assert len(res.content) > 1000, asset


def test_swagger_ui_can_render_this_apis_openapi_version(url):
    # Swagger UI 4 shows "Unable to render this definition" for OpenAPI 3.1, which FastAPI writes.
    spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
    bundle = httpx.get(f"{url}{DOCS_ASSETS}/swagger-ui-bundle.js", timeout=30).text
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.', bundle)
    assert spec["openapi"].startswith("3.1") and version and int(version[1]) >= 5, version and version.group(0)
    assert all(not p.startswith(DOCS_ASSETS) for p in spec["paths"])  # the assets aren't API endpoints


def test_docs_assets_are_public_but_nothing_else_is(url):
    assert httpx.get(f"{url}{DOCS_ASSETS}/swagger-ui.css", timeout=30).status_code == 200
    assert httpx.get(f"{url}{DOCS_ASSETS}/nothing-here.js", timeout=30).status_code == 404
    assert httpx.get(f"{url}/collection", timeout=30).status_code == 401  # a data route still needs the key
    assert httpx.get(f"{url}/collection", headers=AUTH, timeout=30).status_code == 200


# ---- the access log ----------------------------------------------------------------------------
def test_one_access_line_per_request_without_secrets(url, access):
    secret_query = "zebra-in-a-tutu"
    with httpx.Client(base_url=url, timeout=60) as c:
        statuses = [
            c.get("/healthz?token=query-string-secret").status_code,
            c.post("/search", json={"query": secret_query, "k": 2}, headers=AUTH).status_code,
            c.post("/search", json={"query": secret_query}, headers={"X-API-Key": "wrong-key"}).status_code,
            c.post("/search", json={"query": secret_query, "k": 0}, headers=AUTH).status_code,
            c.post("/search", content=b"x" * (65 * 1024), headers={**AUTH, "content-type": "application/json"}).status_code,
            c.get("/no/such/route", headers={"Authorization": f"Bearer {KEY}"}).status_code,
            c.get("/line%0Aforged%20INFO%20line").status_code,
        ]
    assert statuses == [200, 200, 401, 422, 413, 404, 401]
    lines = _lines(access, len(statuses))
    assert len(lines) == len(statuses), lines
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    assert [(m[1], m[2], int(m[3])) for m in parsed] == [
        ("GET", "/healthz", 200), ("POST", "/search", 200), ("POST", "/search", 401), ("POST", "/search", 422),
        ("POST", "/search", 413), ("GET", "/no/such/route", 404), ("GET", "/line%0Aforged%20INFO%20line", 401),
    ]
    text = "\n".join(lines)
    for secret in (KEY, "wrong-key", "query-string-secret", "token=", secret_query):
        assert secret not in text


def test_access_log_printed_once_on_stderr_and_can_be_turned_off(url, access, capsys):
    # `mmr serve` prints the log with its own handler; the CLI's root handler must not repeat it.
    root_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root_handler)
    try:
        configure_access_log(True)
        httpx.get(f"{url}/healthz", timeout=30)
        time.sleep(0.3)
        configure_access_log(False)
        httpx.get(f"{url}/readyz", timeout=30)
        time.sleep(0.3)
    finally:
        logging.getLogger().removeHandler(root_handler)
    err = capsys.readouterr().err
    assert err.count("GET /healthz 200") == 1, err
    assert "/readyz" not in err, err


# ---- filter errors -----------------------------------------------------------------------------
BAD_FILTERS = [
    # (filter, what the message must say about it)
    ("path ===", "unexpected character '=' at column 8"),
    ('path like "%red', "unterminated string literal at column 11"),
    ("(((", "unexpected end of expression"),
    ("sum(1) > 0", "unknown function 'sum' at column 1"),
]


def _assert_quotes_only_the_filter(message: str, expr: str, says: str) -> None:
    assert f"invalid filter expression {expr!r}" in message, message
    assert says in message, message
    assert "has_image" not in message and "has_text" not in message, message  # the store's own condition
    assert ") and (" not in message and "--filter" not in message, message


@pytest.mark.parametrize("expr,says", BAD_FILTERS)
def test_bad_filter_over_http_quotes_what_was_sent(url, expr, says):
    res = httpx.post(f"{url}/search", json={"query": QUERY, "filter": expr}, headers=AUTH, timeout=60)
    assert res.status_code == 400, res.text
    _assert_quotes_only_the_filter(res.json()["detail"], expr, says)


@pytest.mark.parametrize("mode", ["image", None])
def test_bad_filter_in_the_library_quotes_what_was_given(served, mode):
    pipe = served[1].pipeline(rerank=False)
    for expr, says in BAD_FILTERS:
        with pytest.raises(InputError) as info:
            pipe.search(QUERY, filter=expr, mode=mode)
        _assert_quotes_only_the_filter(str(info.value), expr, says)


# ---- `mmr serve` as a process ------------------------------------------------------------------
@pytest.mark.slow  # `mmr serve` twice
def test_mmr_serve_logs_each_request_once_unless_told_not_to(tmp_path):
    from mm_retrieval.server.testing import make_demo_collection

    make_demo_collection(tmp_path, reranker=False)  # closed after: the server's process opens the database
    logs = {}
    for flags in ((), ("--no-access-log",)):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "mm_retrieval", "serve", "--db", str(tmp_path / "mmr.db"), "--port", str(port),
                                 "--api-key", KEY, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "mmr serve did not become ready"
                time.sleep(0.2)
            res = httpx.post(f"http://127.0.0.1:{port}/search?page=2", json={"query": QUERY, "k": 1}, headers=AUTH, timeout=60)
            assert res.status_code == 200, res.text
            time.sleep(0.5)
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=30)
        logs[flags] = (out, err)
    out, err = logs[()]
    assert out == ""  # the log is not the command's output
    assert len(re.findall(r"POST /search 200 \d+\.\d ms", err)) == 1, err
    assert len(re.findall(r"GET /readyz (200|503)", err)) >= 1, err
    assert '"POST /search' not in err  # uvicorn's own access log stays off
    assert KEY not in err and QUERY not in err and "page=2" not in err
    out, err = logs[("--no-access-log",)]
    assert "POST /search" not in err and "/readyz" not in err, err
