"""The chat page's HTTP side: served at `/` without the API key, kept out of the OpenAPI schema, off with --no-ui.
(The page in a browser: tests/test_ui_browser.py.)"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edgellm.serve.ui import STATIC_DIR
from tests.test_serve import Server


@pytest.fixture(scope="module")
def servers(tiny_model):
    """(with the page and an API key, with --no-ui), started side by side."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(Server, tiny_model, "--api-key", "k"), pool.submit(Server, tiny_model, "--no-ui")]
        errors = [f.exception() for f in futures]
        started = [f.result() for f, e in zip(futures, errors) if e is None]
    try:
        if len(started) < 2:
            raise next(e for e in errors if e is not None)
        yield started
    finally:
        for s in started:
            s.stop()


def test_page_and_assets_load_without_the_key(servers):
    ui, _ = servers
    page = httpx.get(ui.base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline or remote script
    assets = re.findall(r'(?:src|href)="(ui/[^"]+)"', page.text)
    assert {"ui/app.js", "ui/style.css"} <= set(assets)
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in [*assets, "ui/markdown.js"]:
        r = httpx.get(f"{ui.base}/{path}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(types[path[path.rfind("."):]]), path
        assert r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(ui.base + "/v1/models").status_code == 401  # the API still needs the key
    err = httpx.get(ui.base + "/ui/missing.js")
    assert err.status_code == 404 and err.json()["error"]["message"]
    assert httpx.get(ui.base + "/ui/%2e%2e/ui.py").status_code == 404


def test_no_ui_and_unchanged_schema(servers):
    ui, plain = servers
    for path in ("/", "/ui/app.js"):
        r = httpx.get(plain.base + path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    spec = httpx.get(ui.base + "/openapi.json", headers={"Authorization": "Bearer k"}).json()  # the key guards it
    assert spec == httpx.get(plain.base + "/openapi.json").json()
    other = ("/health", "/metrics", "/tokenize", "/detokenize")
    assert all(p.startswith("/v1/") for p in spec["paths"] if p not in other)
    assert httpx.get(plain.base + "/v1/models").status_code == 200


def test_page_scripts_never_parse_markup():
    """Model text reaches the page only as text nodes: no API in the scripts turns a string into markup or code."""
    scripts = sorted(STATIC_DIR.glob("*.js"))
    assert {p.name for p in scripts} >= {"app.js", "markdown.js"}
    for path in scripts:
        source = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "createContextualFragment", "DOMParser", "srcdoc"):
            assert sink not in source, f"{path.name} uses {sink}"
    html = (STATIC_DIR / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN: the page works offline
