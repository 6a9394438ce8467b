"""The built site in a real browser: headless Debian Chromium driven by Selenium, served from loopback.

ChromeDriver is given by path (never Selenium Manager, which would try to download one). Screenshots of
every visited page go to test-artifacts/browser/ for a human to look at.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
WAIT_S = 30

if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
    pytest.skip(
        f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER}: run `make browser` as root, or "
        "`sudo apt-get install chromium chromium-driver`",
        allow_module_level=True,
    )

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="module")
def site_url(built_site: Path) -> Iterator[str]:
    """Serve the built site on 127.0.0.1 and a free port, in a background thread."""
    handler = functools.partial(QuietHandler, directory=str(built_site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must not reach the network
    profile = tempfile.mkdtemp(prefix="rlvg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1366,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors explain failures
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def visit(driver: webdriver.Chrome, url: str, screenshot: str) -> None:
    driver.get(url)
    WebDriverWait(driver, WAIT_S).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "article.md-content__inner h1"))
    )
    driver.save_screenshot(str(ARTIFACTS / f"{screenshot}.png"))


@pytest.fixture(scope="module")
def catalog():
    from reference_impls.knowledge.catalog import load_catalog

    return load_catalog()


def test_home_and_taxonomy(browser, site_url: str, catalog) -> None:
    visit(browser, site_url, "home")
    assert "atlas" in browser.title.lower()
    visit(browser, site_url + "taxonomy/", "taxonomy")
    table = browser.find_element(By.CSS_SELECTOR, "table.taxonomy")
    names = {link.text for link in table.find_elements(By.CSS_SELECTOR, "td a")}
    assert {entry.name for entry in catalog.methods()} <= names
    figure = browser.find_element(By.CSS_SELECTOR, "img[src$='timeline.png']")
    assert browser.execute_script("return arguments[0].naturalWidth", figure) > 0, (
        "timeline image did not load"
    )


def test_method_page_with_copyable_bibtex(browser, site_url: str, catalog) -> None:
    entry = catalog.methods()[0]
    visit(browser, site_url + f"methods/{entry.key}/", "method")
    assert browser.find_element(By.CSS_SELECTOR, "article h1").text.startswith(entry.name)
    # The theme adds a copy button to each code block once its JavaScript has run (md-clipboard up to
    # Material 9.6, md-code__button since).
    WebDriverWait(browser, WAIT_S).until(
        expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, "button.md-clipboard, button.md-code__button")
        )
    )
    code = browser.find_elements(By.CSS_SELECTOR, "div.highlight code")
    assert any(block.text.startswith("@") and entry.key in block.text for block in code)


def test_bibliography_anchor(browser, site_url: str, catalog) -> None:
    key = catalog.keys[-1]
    visit(browser, site_url + f"bibliography/#{key}", "bibliography")
    anchor = browser.find_element(By.ID, key)
    assert anchor is not None
    details = browser.find_elements(By.CSS_SELECTOR, "details.quote")
    assert len(details) == len(catalog)


def test_search_finds_a_method(browser, site_url: str, catalog) -> None:
    entry = next(e for e in catalog.methods() if len(e.name) >= 4 and e.name.isascii())
    visit(browser, site_url, "search-before")
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    if not box.is_displayed():  # narrow windows hide the box behind the header's search button
        browser.find_element(By.CSS_SELECTOR, "label.md-header__button[for='__search']").click()
    WebDriverWait(browser, WAIT_S).until(expected_conditions.element_to_be_clickable(box))
    box.click()
    box.send_keys(entry.name)
    results = WebDriverWait(browser, WAIT_S).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, ".md-search-result__item")
    )
    browser.save_screenshot(str(ARTIFACTS / "search.png"))
    assert results
    assert entry.name.lower() in browser.find_element(By.CSS_SELECTOR, ".md-search-result").text.lower()


def test_formula_renders_with_local_mathjax(browser, site_url: str, built_site: Path) -> None:
    pages = (
        sorted((built_site / "foundations").rglob("index.html"))
        if (built_site / "foundations").exists()
        else []
    )
    with_math = [p for p in pages if 'class="arithmatex"' in p.read_text(encoding="utf-8")]
    if not with_math:
        pytest.skip("no foundations page with a formula in this build")
    relative = with_math[0].parent.relative_to(built_site).as_posix()
    visit(browser, site_url + relative + "/", "formula")
    # MathJax 2 marks its output by renderer: .MathJax_SVG (SVG), .MathJax (HTML-CSS), .MathJax_CHTML.
    try:
        rendered = WebDriverWait(browser, WAIT_S).until(
            lambda driver: driver.find_elements(
                By.CSS_SELECTOR, ".MathJax_SVG, .MathJax_SVG_Display, .MathJax, .MathJax_CHTML"
            )
        )
    except TimeoutException:
        errors = list(
            dict.fromkeys(e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE")
        )
        pytest.fail(f"no formula rendered on /{relative}/ after {WAIT_S} s; browser errors: {errors[:5]}")
    assert rendered
    sources = [
        s.get_attribute("src") for s in browser.find_elements(By.CSS_SELECTOR, "script[src*='MathJax']")
    ]
    assert sources and all(src.startswith(site_url) for src in sources), sources
    # Wide display equations scroll inside their block instead of being cut at the right edge.
    blocks = browser.find_elements(By.CSS_SELECTOR, "div.arithmatex")
    assert all(browser.execute_script("return getComputedStyle(arguments[0]).overflowX", b) == "auto" for b in blocks)
    browser.save_screenshot(str(ARTIFACTS / "formula.png"))
    # No request of the page failed (MathJax's TeX fonts are not shipped: nothing may ask for them).
    time.sleep(1)  # fonts are requested when the (hidden) assistive MathML is laid out, after rendering
    failed = browser.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.responseStatus >= 400).map(e => e.responseStatus + ' ' + e.name)")
    assert not failed, failed


def test_taxonomy_shows_every_modality_column_at_1400px(browser, site_url: str, catalog) -> None:
    browser.set_window_size(1400, 900)
    try:
        visit(browser, site_url + "taxonomy/", "taxonomy-1400")
        table = browser.find_element(By.CSS_SELECTOR, "table.taxonomy")
        right_edge = browser.execute_script(
            "var r = arguments[0].getBoundingClientRect(); return Math.min(r.right, window.innerWidth);", table)
        headers = table.find_elements(By.CSS_SELECTOR, "thead th")
        labels = [catalog.vocabulary.label("modality", m) for m in catalog.matrix_modalities()]
        assert [h.text for h in headers[1:]] == labels
        for header in headers:
            box = browser.execute_script("return arguments[0].getBoundingClientRect().right;", header)
            assert box <= right_edge + 1, f"column {header.text!r} is cut off at 1400 px ({box} > {right_edge})"
        # The filter hides catalogued-only names and keeps the implemented (bold) ones.
        implemented = {e.name for e in catalog.methods() if e.implemented}
        browser.find_element(By.ID, "rlvg-implemented-only").click()
        shown = {a.text for a in table.find_elements(By.CSS_SELECTOR, "td a") if a.is_displayed()}
        assert shown == implemented
    finally:
        browser.set_window_size(1366, 900)


def test_section_indexes_open_from_the_tabs(browser, site_url: str) -> None:
    for section, heading in (("methods/", "Methods"), ("notebooks/", "Notebooks")):
        visit(browser, site_url + section, section.strip("/"))
        assert browser.find_element(By.CSS_SELECTOR, "article h1").text.startswith(heading)
    links = browser.find_elements(By.CSS_SELECTOR, "article a[download]")
    assert links, "the notebooks index offers no .ipynb download"
