"""The page at GET /, in a real browser: headless Chromium (the distribution's `chromium`
and `chromium-driver`) driven by Selenium, against a real `perceiver serve` on the shipped
small model. What the page shows is compared with what /v1/fill answers and with how the
terminal colours it (render.py).

Without Chromium and its driver these tests skip with one line, except in CI (CI=true),
where a missing browser fails the run (.ci/run installs it). With PERCEIVER_SCREENSHOT=PATH
the fill test saves the page as a PNG there (README's screenshot).
"""

from __future__ import annotations

import base64
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from perceiver_cli import page, render
from perceiver_cli.results import result_from_wire
from tests.serving import SMALL, Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TEXT = "The capital of France is [MASK]. Some words are [MASK:9]."
HTML = {"Accept": "text/html"}


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"no {' or '.join(missing)}: apt-get install chromium chromium-driver; pip install selenium"
        if os.environ.get("CI") == "true":
            pytest.fail("the page's browser tests need a browser in CI: " + reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, Selenium Manager downloads nothing
    profile = tempfile.mkdtemp(prefix="perceiver-chromium-")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Server(SMALL, tmp_path_factory.mktemp("page"))
    yield served
    assert served.stop() == 0


@pytest.fixture
def tab(browser, server):
    """A fresh page at GET /; afterwards, the browser's console must hold no error (but the
    browser's own line for a request the server refused with 400, which the page shows)."""
    browser.get("about:blank")
    browser.get_log("browser")  # drop what came before
    browser.set_window_size(1000, 1000)
    browser.get(server.url + "/")
    wait(browser, lambda: "model:" in _text(browser, "model") and "…" not in _text(browser, "model"))
    yield browser
    assert console_errors(browser) == []


def console_errors(driver, *allowed: int) -> list[dict]:
    """The console's errors: the page's own, a resource that failed, a refused request
    (but the browser's network lines for the statuses `allowed`)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and not (e["source"] == "network" and any(f"status of {s} " in e["message"] for s in allowed))]


def wait(driver, condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the page did not get there in time: " + driver.find_element("tag name", "body").text[:2000])


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def fill(driver, text: str, *, top_k: int | None = None, strategy: str | None = None, choices: str | None = None,
         keys: bool = False):
    """Type `text` (and controls) and fill, by the button or by Ctrl+Enter; wait for the answer."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select

    box = driver.find_element("id", "text")
    box.clear()
    driver.execute_script("arguments[0].value = arguments[1]", box, text) if len(text) > 2000 else box.send_keys(text)
    if top_k is not None:
        driver.find_element("id", "top-k").clear()
        driver.find_element("id", "top-k").send_keys(str(top_k))
    if strategy is not None:
        Select(driver.find_element("id", "strategy")).select_by_value(strategy)
    if choices is not None:
        driver.find_element("id", "choices").clear()
        driver.find_element("id", "choices").send_keys(choices)
    done = int(driver.find_element("id", "fill-form").get_attribute("data-done") or 0)
    if keys:
        box.send_keys(Keys.CONTROL, Keys.ENTER)
    else:
        driver.find_element("id", "fill").click()
    wait(driver, lambda: int(driver.find_element("id", "fill-form").get_attribute("data-done") or 0) > done)


def api(server, text: str, **options):
    status, _, _, answer = server.request("POST", "/v1/fill", {"text": text, "options": options, "detail": True})
    assert status == 200, answer
    return result_from_wire(answer)


def expected_runs(result) -> list[list[tuple[str, str]]]:
    """Per fill, its (colour, characters) runs as the terminal colours them (render.document)."""
    fills = []
    for span in result.spans:
        runs: list[tuple[str, str]] = []
        for ch, a, b in render.utf8_chars(span.data):
            colour = render.confidence_colour(math.exp(sum(span.byte_logprobs[a:b])))
            if runs and runs[-1][0] == colour:
                runs[-1] = (colour, runs[-1][1] + ch)
            else:
                runs.append((colour, ch))
        fills.append(runs)
    return fills


def page_runs(driver) -> list[list[tuple[str, str]]]:
    return [[tuple(run) for run in runs] for runs in driver.execute_script(
        "return [...document.querySelectorAll('#result .fill')].map(f => [...f.children].map("
        "s => [s.className.replace('band-', ''), s.textContent]))")]


def test_a_fill_shows_the_filled_text_coloured_as_the_terminal_does(tab, server):
    fill(tab, TEXT, top_k=3)
    expected = api(server, TEXT, top_k=3, explain=True)
    assert _text(tab, "result") == expected.text
    assert page_runs(tab) == expected_runs(expected)
    legend = _text(tab, "legend")
    assert all(label in legend for _, _, label in render.CONFIDENCE)
    colours = tab.execute_script(
        "return [...document.querySelectorAll('#legend span')].map(s => getComputedStyle(s).color)")
    assert len(set(colours)) == len(render.CONFIDENCE)  # four bands, four colours
    if os.environ.get("PERCEIVER_SCREENSHOT"):
        tab.find_elements("css selector", "#result .fill")[0].click()
        tab.set_window_size(900, 1000)
        Path(os.environ["PERCEIVER_SCREENSHOT"]).write_bytes(base64.b64decode(tab.get_screenshot_as_base64()))


def test_ctrl_enter_fills_with_the_chosen_strategy(tab, server):
    fill(tab, "She went to the [MASK] yesterday.", strategy="oneshot", keys=True)
    expected = api(server, "She went to the [MASK] yesterday.", strategy="oneshot", explain=True)
    assert _text(tab, "result") == expected.text
    assert page_runs(tab) == expected_runs(expected)


def test_a_click_on_a_fill_shows_its_candidates_and_each_bytes_alternatives(tab, server):
    fill(tab, TEXT, top_k=3)
    expected = api(server, TEXT, top_k=3, explain=True).spans[1]
    tab.find_elements("css selector", "#result .fill")[1].click()
    wait(tab, lambda: tab.find_element("id", "details").is_displayed())
    rows = tab.execute_script("return [...document.querySelectorAll('#candidates tbody tr')].map("
                              "r => [...r.cells].map(c => c.textContent))")
    assert rows == [[str(i + 1), render.show_fill(c.fill), render.percent(math.exp(c.logprob)), f"{c.logprob:.3f}"]
                    for i, c in enumerate(expected.candidates[:3])]
    rows = tab.execute_script("return [...document.querySelectorAll('#bytes tbody tr')].map("
                              "r => [...r.cells].map(c => c.textContent))")
    assert len(rows) == expected.length == 9
    for i, (row, alts) in enumerate(zip(rows, expected.alternatives)):
        filled, lp = expected.data[i], expected.byte_logprobs[i]  # the byte filled there, and the best others
        rest = [(b, x) for b, x in alts if b != filled][: len(alts) - 1]
        assert row[1] == f"{render.show_byte(filled)} {render.percent(math.exp(lp))}"
        assert row[2] == "   ".join(f"{render.show_byte(b)} {render.percent(math.exp(x))}" for b, x in rest)


def test_a_fill_opens_from_the_keyboard(tab):
    from selenium.webdriver.common.keys import Keys

    fill(tab, TEXT)
    first = tab.find_elements("css selector", "#result .fill")[0]
    first.send_keys(Keys.ENTER)
    wait(tab, lambda: tab.find_element("id", "details").is_displayed())
    assert first.get_attribute("aria-pressed") == "true" and first.get_attribute("tabindex") == "0"


def test_choices_fill_every_span_with_the_best_word(tab, server):
    fill(tab, "The capital of France is [MASK].", choices=" Paris\n London\n Rome")
    expected = api(server, "The capital of France is [MASK].", choices=[" Paris", " London", " Rome"], explain=True)
    assert _text(tab, "result") == expected.text
    tab.find_elements("css selector", "#result .fill")[0].click()
    wait(tab, lambda: tab.find_element("id", "details").is_displayed())
    shown = tab.execute_script("return [...document.querySelectorAll('#candidates tbody tr')].map(r => r.cells[1].textContent)")
    assert shown == [render.show_fill(c.fill) for c in expected.spans[0].candidates] and len(shown) == 3


def test_the_servers_error_is_shown_as_it_is(tab, server):
    fill(tab, "no marker in this text")
    status, _, _, answer = server.request("POST", "/v1/fill", {"text": "no marker in this text"})
    assert status == 400
    assert tab.find_element("id", "error").is_displayed()
    assert _text(tab, "error") == answer["error"]
    assert console_errors(tab, 400) == []  # the browser's line for the 400, nothing else


def test_a_megabyte_of_text_renders_what_fits_and_says_what_was_cut(tab, server):
    text = "word " * 200_000 + "The capital of France is [MASK]."  # 1 MB; the fill comes after the cut
    fill(tab, text, strategy="oneshot")
    shown = tab.execute_script("return document.getElementById('result').textContent.length")
    assert shown == page.MAX_CHARS
    cut = _text(tab, "cut")
    assert f"Showing the first 0 of 1 fills and {page.MAX_CHARS:,} characters" in cut


def test_thousands_of_spans_render_up_to_the_pages_limit(tab, server):
    text = "ab [MASK:1] " * (page.MAX_SPANS + 100)
    fill(tab, text, strategy="oneshot")
    assert len(tab.find_elements("css selector", "#result .fill")) == page.MAX_SPANS
    assert f"Showing the first {page.MAX_SPANS} of {page.MAX_SPANS + 100} fills" in _text(tab, "cut")


def test_every_control_has_a_label_and_a_phone_width_has_no_sideways_scroll(tab):
    unlabelled = tab.execute_script(
        "return [...document.querySelectorAll('input, select, textarea, button')].filter(e =>"
        " e.tagName !== 'BUTTON' ? !(e.labels && e.labels.length) : !e.textContent.trim()).map(e => e.id)")
    assert unlabelled == []
    tab.set_window_size(390, 844)
    fill(tab, TEXT, top_k=3)
    tab.find_elements("css selector", "#result .fill")[0].click()
    assert tab.execute_script("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def test_with_an_api_key_the_page_loads_asks_for_the_key_and_keeps_it_for_the_tab(browser, tmp_path):
    keyed = Server(SMALL, tmp_path, env={"PERCEIVER_API_KEY": "s3cret"})
    try:
        assert keyed.request("GET", "/", headers=HTML)[0] == 200  # the page itself needs no key
        assert keyed.request("GET", "/info")[0] == 401
        browser.get("about:blank")
        browser.get_log("browser")
        browser.get(keyed.url + "/")
        wait(browser, lambda: browser.find_element("id", "key-dialog").is_displayed())  # /info answered 401
        assert "missing API key" in _text(browser, "key-why")
        browser.find_element("id", "key").send_keys("wrong")
        browser.find_element("id", "key-ok").click()
        wait(browser, lambda: "wrong API key" in _text(browser, "key-why"))
        browser.find_element("id", "key").send_keys("s3cret")
        browser.find_element("id", "key-ok").click()
        wait(browser, lambda: "perceiver-small" in _text(browser, "model"))
        fill(browser, TEXT)
        assert _text(browser, "result") == api_with_key(keyed, TEXT)
        assert browser.execute_script("return sessionStorage.getItem('perceiver-api-key')") == "s3cret"
        assert "s3cret" not in browser.current_url
        assert browser.execute_script("return localStorage.length") == 0
        assert console_errors(browser, 401) == []  # the refused requests are the browser's network lines
    finally:
        assert keyed.stop() == 0


def api_with_key(server, text: str) -> str:
    status, _, _, answer = server.request("POST", "/v1/fill", {"text": text},
                                          headers={"Authorization": "Bearer s3cret"})
    assert status == 200
    return answer["text"]


def test_the_docs_page_lists_every_route_of_the_document(tab, server):
    tab.get(server.url + "/docs")
    wait(tab, lambda: len(tab.find_elements("css selector", ".route")) > 0)
    titles = [t.text for t in tab.find_elements("css selector", ".route h2")]
    from perceiver_cli.openapi import document

    expected = [f"{method.upper()}{path}" for path, item in document()["paths"].items() for method in item]
    assert [t.replace(" ", "").replace("\n", "") for t in titles] == expected
