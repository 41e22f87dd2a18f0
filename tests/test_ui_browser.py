"""The chat page at `/` in a real browser: headless Chromium (Debian's package) driven by Selenium, against
`edgellm serve` on the bundled SmolLM2. Runs in CI (`CI` set); elsewhere skipped when Chromium is absent."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.test_serve import Server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
KEY = "sekret-ui"

if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()) and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402  (selenium is in the test extra; only needed past the skip)
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(smollm2_q4):
    """One server with --api-key (one model load keeps the tests fast); the page gets the key in sessionStorage
    except in the test of the key dialog."""
    s = Server(smollm2_q4, "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def driver():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            pytest.fail(f"{path} is missing (CI is set, so the browser tests must run): "
                        "apt-get install -y chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory(prefix="edgellm-chromium-") as profile:
        for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,760"):
            opts.add_argument(arg)
        # The system chromedriver given by path: Selenium Manager never downloads anything.
        d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
        d.set_script_timeout(30)
        try:
            yield d
        finally:
            d.quit()


def open_page(driver, server, key: str | None = KEY) -> None:
    """A fresh visit: empty storage but for the API key, light mode."""
    driver.get(server.base + "/")
    driver.execute_script("localStorage.clear(); sessionStorage.clear();"
                          "if (arguments[0]) sessionStorage.setItem('edgellm.apiKey', arguments[0]);", key)
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                          "value": "light"}]})
    driver.refresh()
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!window.edgellm"))


def set_settings(driver, system: str = "", temperature: str = "", max_tokens: str = "") -> None:
    driver.find_element(By.ID, "open-settings").click()
    for field, value in (("set-system", system), ("set-temperature", temperature), ("set-max-tokens", max_tokens)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "settings-save").click()
    WebDriverWait(driver, 5).until(lambda d: not d.find_element(By.ID, "settings").is_displayed())


def watch_reply_lengths(driver) -> None:
    """Record the last reply's text length at every DOM change (window.__lengths)."""
    driver.execute_script("""
        window.__lengths = [];
        const box = document.getElementById('messages');
        new MutationObserver(() => {
            const bodies = box.querySelectorAll('.msg.assistant .body');
            if (bodies.length) window.__lengths.push(bodies[bodies.length - 1].textContent.length);
        }).observe(box, {childList: true, subtree: true, characterData: true});""")


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def wait_idle(driver, timeout: float = 60) -> None:
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "send").is_displayed() and not d.find_elements(By.CSS_SELECTOR, ".cursor"))


def last_reply(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def reply_text(driver) -> str:
    return last_reply(driver).find_element(By.CSS_SELECTOR, ".body").text


def test_reply_streams_and_shows_speed(driver, server):
    open_page(driver, server)
    set_settings(driver, temperature="0")
    watch_reply_lengths(driver)
    send(driver, FRANCE)
    wait_idle(driver)
    lengths = [n for n in driver.execute_script("return window.__lengths") if n > 0]
    assert len(set(lengths)) >= 2 and lengths == sorted(lengths), lengths  # grew, in more than one step
    assert "Paris" in reply_text(driver)
    meta = last_reply(driver).find_element(By.CSS_SELECTOR, ".meta")
    assert float(meta.get_attribute("data-tokens-per-second")) > 0
    assert "tokens/s" in meta.text
    assert driver.find_element(By.CSS_SELECTOR, ".msg.user .body").text == FRANCE
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == ""
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "chat-light.png"))
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                          "value": "dark"}]})
    driver.save_screenshot(str(ARTIFACTS / "chat-dark.png"))


def test_stop_ends_the_stream_and_the_server_request(driver, server):
    open_page(driver, server)
    set_settings(driver, temperature="0", max_tokens="512")
    before = server.metrics()
    watch_reply_lengths(driver)
    send(driver, "Write a very long story about a dragon who learns to cook, with many chapters.")
    WebDriverWait(driver, 60, poll_frequency=0.05).until(
        lambda d: len({n for n in d.execute_script("return window.__lengths") if n > 0}) >= 2)
    driver.find_element(By.ID, "stop").click()
    wait_idle(driver, 10)
    stopped_at = len(reply_text(driver))
    assert stopped_at > 0 and "stopped" in last_reply(driver).find_element(By.CSS_SELECTOR, ".meta").text
    deadline = time.time() + 15
    while time.time() < deadline:
        m = server.metrics()
        if m["requests_running"] == 0 and m["requests_cancelled"] > before["requests_cancelled"]:
            break
        time.sleep(0.2)
    assert m["requests_running"] == 0 and m["kv_cache_sequences"] == 0
    assert m["requests_cancelled"] == before["requests_cancelled"] + 1
    assert m["generation_tokens_total"] - before["generation_tokens_total"] < 512  # cut short, not run out
    time.sleep(0.5)
    assert len(reply_text(driver)) == stopped_at  # no more text after Stop
    assert driver.find_element(By.ID, "prompt").is_enabled()


XSS = "<img src=x onerror=alert(1)>"


def _no_alert(driver) -> None:
    assert driver.execute_script("return window.__alerted") is None
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def test_model_markup_is_shown_as_text(driver, server):
    open_page(driver, server)
    driver.execute_script("window.alert = (x) => { window.__alerted = x; };")
    # The renderer itself, on markup mixed with Markdown.
    source = (f"{XSS}\n\n**bold** and `<b>code</b>` and [click](javascript:alert(2)) and [ok](https://example.com)\n"
              "```html\n<script>alert(3)</script>\n```\n- item <svg onload=alert(4)>")
    out = driver.execute_script("""
        const probe = document.createElement('div');
        probe.append(window.edgellm.renderMarkdown(arguments[0]));
        document.body.append(probe);
        const found = probe.querySelectorAll('img, script, svg, iframe').length;
        const links = [...probe.querySelectorAll('a')].map((a) => a.getAttribute('href'));
        const result = {found, links, text: probe.textContent, strong: probe.querySelectorAll('strong').length,
                        code: probe.querySelector('pre code').textContent};
        probe.remove();
        return result;""", source)
    assert out["found"] == 0
    assert XSS in out["text"] and "<svg onload=alert(4)>" in out["text"]
    assert out["links"] == ["https://example.com"] and out["strong"] == 1
    assert out["code"] == "<script>alert(3)</script>"
    # And end to end: the model told to echo the markup.
    set_settings(driver, system="Repeat the user's message exactly, with nothing else.", temperature="0",
                 max_tokens="40")
    send(driver, XSS)
    wait_idle(driver)
    time.sleep(0.5)  # an injected <img src=x> would have fired its onerror by now
    messages = driver.find_element(By.ID, "messages")
    assert messages.find_elements(By.CSS_SELECTOR, "img, svg, script") == []
    assert driver.find_element(By.CSS_SELECTOR, ".msg.user .body").text == XSS
    assert "<img src=x" in reply_text(driver)
    _no_alert(driver)


def test_api_key_is_asked_for(driver, server):
    assert httpx.get(server.base + "/").status_code == 200  # the page itself needs no key
    r = httpx.post(server.base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    open_page(driver, server, key=None)
    dialog = driver.find_element(By.ID, "key-dialog")
    WebDriverWait(driver, 10).until(lambda d: dialog.is_displayed())
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "api-key.png"))
    key = driver.find_element(By.ID, "key-input")
    key.send_keys("wrong", Keys.ENTER)  # refused: asked again, saying so
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "key-error").is_displayed())
    assert "refused" in driver.find_element(By.ID, "key-error").text
    key.send_keys(KEY, Keys.ENTER)
    WebDriverWait(driver, 10).until(lambda d: not dialog.is_displayed()
                                    and d.find_element(By.ID, "model-name").text)
    assert driver.execute_script("return sessionStorage.getItem('edgellm.apiKey')") == KEY
    assert driver.execute_script("return localStorage.getItem('edgellm.apiKey')") is None
    set_settings(driver, temperature="0", max_tokens="32")
    send(driver, FRANCE)
    wait_idle(driver)
    assert reply_text(driver) and not last_reply(driver).find_elements(By.CSS_SELECTOR, ".error")
    assert not dialog.is_displayed()


def test_reload_keeps_conversation_and_new_clears_it(driver, server):
    open_page(driver, server)
    set_settings(driver, temperature="0", max_tokens="12")
    send(driver, "Hello! Who are you?")
    wait_idle(driver)
    before = driver.find_element(By.ID, "messages").text
    assert "Hello! Who are you?" in before and reply_text(driver)
    driver.refresh()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    assert driver.find_element(By.ID, "messages").text == before
    driver.find_element(By.ID, "new-chat").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    driver.refresh()
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!window.edgellm"))
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    # The old conversation is still in the list and opens again.
    titles = driver.find_elements(By.CSS_SELECTOR, "#conversations .conv-title")
    assert [t.text for t in titles] == ["Hello! Who are you?"]
    titles[0].click()
    assert driver.find_element(By.ID, "messages").text == before


def test_markdown_renderer(driver, server):
    open_page(driver, server)
    source = ("# Title\n\nSome *em*, **strong**, `x < y`, ~~gone~~ and snake_case_name.\nSecond line.\n\n"
              "- a\n- b\n  - nested\n\n1. one\n2. two\n\n> quoted\n\n| h1 | h2 |\n|---|:-:|\n| c1 | c2 |\n\n---\n"
              "```py\nprint(1 < 2)\n```\n\n```js\nlet streaming = true")  # the last fence is still open
    out = driver.execute_script("""
        const probe = document.createElement('div');
        probe.append(window.edgellm.renderMarkdown(arguments[0]));
        const all = (sel) => [...probe.querySelectorAll(sel)].map((n) => n.textContent);
        return {h: all('h3'), em: all('em'), strong: all('strong'), code: all('p code'), del: all('del'),
                p: all('p'), br: probe.querySelectorAll('p br').length, ul: all(':scope > ul > li'),
                nested: all('ul > li > ul > li'), ol: all('ol > li'), quote: all('blockquote'), th: all('th'),
                td: all('td'), hr: probe.querySelectorAll('hr').length, pre: all('pre code'),
                langs: [...probe.querySelectorAll('pre code')].map((n) => n.dataset.lang)};""", source)
    assert out["h"] == ["Title"]
    assert out["em"] == ["em"] and out["strong"] == ["strong"] and out["del"] == ["gone"]
    assert out["code"] == ["x < y"]
    assert "snake_case_name" in out["p"][0] and out["br"] == 1  # no italics inside words; line break kept
    assert out["ul"] == ["a", "bnested"] and out["nested"] == ["nested"]
    assert out["ol"] == ["one", "two"] and out["quote"] == ["quoted"]
    assert out["th"] == ["h1", "h2"] and out["td"] == ["c1", "c2"] and out["hr"] == 1
    assert out["pre"] == ["print(1 < 2)", "let streaming = true"] and out["langs"] == ["py", "js"]


def test_phone_layout(driver, server):
    open_page(driver, server)
    driver.set_window_size(390, 800)
    try:
        fits = "return document.documentElement.scrollWidth <= window.innerWidth"
        sidebar_right = "return document.getElementById('sidebar').getBoundingClientRect().right"
        WebDriverWait(driver, 5).until(lambda d: d.execute_script(sidebar_right) <= 0)  # folded away
        assert driver.execute_script(fits)
        driver.find_element(By.ID, "toggle-sidebar").click()
        WebDriverWait(driver, 5).until(lambda d: d.execute_script(sidebar_right) > 200)
        driver.find_element(By.ID, "prompt").send_keys(Keys.ESCAPE)
        WebDriverWait(driver, 5).until(lambda d: d.execute_script(sidebar_right) <= 0)
        assert driver.find_element(By.ID, "send").is_displayed() and driver.execute_script(fits)
    finally:
        driver.set_window_size(1100, 760)
