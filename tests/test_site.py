"""The built site: strict build, nothing loaded from another host, generated pages complete, local MathJax."""

from __future__ import annotations

import re
import time
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import pytest

from reference_impls.knowledge.catalog import load_catalog

REPO_ROOT = Path(__file__).resolve().parents[1]

# <link rel=...> values that make the browser fetch the target; canonical/alternate links are only names.
FETCHING_RELS = {
    "stylesheet",
    "icon",
    "shortcut",
    "apple-touch-icon",
    "preload",
    "modulepreload",
    "prefetch",
    "manifest",
}
CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")\s]+)['\"]?\s*\)|@import\s+['\"]([^'\"]+)['\"]")


class ResourceCollector(HTMLParser):
    """Collects every URL a page makes the browser load (scripts, styles, images, frames, media)."""

    def __init__(self) -> None:
        super().__init__()
        self.resources: list[tuple[str, str]] = []  # (tag, url)
        self.links: list[str] = []  # <a href>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "a" and "href" in values:
            self.links.append(values["href"])
        elif tag == "link":
            rels = set(values.get("rel", "").lower().split())
            if rels & FETCHING_RELS:
                self.resources.append((tag, values.get("href", "")))
        elif tag in ("script", "img", "iframe", "source", "video", "audio", "embed", "track", "input"):
            for name in ("src", "poster"):
                if values.get(name):
                    self.resources.append((tag, values[name]))
            for candidate in values.get("srcset", "").split(","):
                if candidate.strip():
                    self.resources.append((tag, candidate.split()[0]))
        elif tag == "object" and values.get("data"):
            self.resources.append((tag, values["data"]))
        if values.get("style"):
            self.resources += [(f"{tag}[style]", url) for url in css_urls(values["style"])]


def css_urls(css: str) -> list[str]:
    return [a or b for a, b in CSS_URL.findall(css)]


def is_remote(url: str) -> bool:
    """Anything with a host (http://, https://, //host) is remote; data: and relative URLs are local."""
    parsed = urlparse(url.strip())
    return bool(parsed.netloc) or parsed.scheme not in ("", "data", "blob")


def parse_page(path: Path) -> ResourceCollector:
    collector = ResourceCollector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_site_builds_strict(built_site: Path) -> None:
    assert (built_site / "index.html").is_file()
    assert (built_site / "taxonomy" / "index.html").is_file()
    assert (built_site / "bibliography" / "index.html").is_file()


def test_no_page_loads_anything_from_another_host(built_site: Path) -> None:
    offenders = []
    pages = sorted(built_site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        for tag, url in parse_page(page).resources:
            if is_remote(url):
                offenders.append(f"{page.relative_to(built_site)}: <{tag}> {url}")
    for stylesheet in sorted(built_site.rglob("*.css")):
        for url in css_urls(stylesheet.read_text(encoding="utf-8", errors="replace")):
            if is_remote(url):
                offenders.append(f"{stylesheet.relative_to(built_site)}: url({url})")
    assert not offenders, "resources loaded from another host:\n" + "\n".join(offenders[:40])


def test_taxonomy_links_every_catalogued_method(built_site: Path, catalog) -> None:
    links = {urlparse(href).path for href in parse_page(built_site / "taxonomy" / "index.html").links}
    missing = [e.key for e in catalog.methods() if f"../methods/{e.key}/" not in links]
    assert not missing, f"methods missing from the taxonomy page: {missing}"
    for entry in catalog.methods():
        assert (built_site / "methods" / entry.key / "index.html").is_file()


def test_family_pages_list_their_methods(built_site: Path, catalog) -> None:
    for family in catalog.vocabulary.method_families:
        links = set(parse_page(built_site / "families" / family / "index.html").links)
        for entry in catalog.methods(family):
            assert f"../../methods/{entry.key}/" in links, (family, entry.key)


def code_blocks(html: str) -> list[str]:
    """Text of every highlighted code block (Pygments wraps each token in a span)."""
    blocks = re.findall(r'<div class="[^"]*highlight[^"]*"><pre>(.*?)</pre></div>', html, flags=re.S)
    return [unescape(re.sub(r"<[^>]+>", "", block)) for block in blocks]


def test_method_page_has_bibtex_block(built_site: Path, catalog) -> None:
    for entry in catalog.methods()[:3]:
        bib = catalog.bibliography[entry.key]
        html = (built_site / "methods" / entry.key / "index.html").read_text(encoding="utf-8")
        blocks = [b for b in code_blocks(html) if b.startswith(f"@{bib.entry_type}{{{entry.key},")]
        assert len(blocks) == 1, f"{entry.key}: no BibTeX code block"
        assert '"content.code.copy"' in html  # the theme adds a copy button to every code block
        assert f"../../bibliography/#{entry.key}" in html


def test_bibliography_has_an_anchor_and_bibtex_for_every_entry(built_site: Path, catalog) -> None:
    html = (built_site / "bibliography" / "index.html").read_text(encoding="utf-8")
    missing = [key for key in catalog.keys if f'id="{key}"' not in html]
    assert not missing, f"bibliography anchors missing: {missing[:10]}"
    assert html.count('<details class="quote">') == len(catalog)
    assert len([b for b in code_blocks(html) if b.startswith("@")]) == len(catalog)


def test_timeline_figure_is_embedded(built_site: Path) -> None:
    png = built_site / "assets" / "generated" / "timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (built_site / "taxonomy" / "index.html").read_text(encoding="utf-8")
    assert "assets/generated/timeline.png" in html


def test_mathjax_is_served_locally(built_site: Path) -> None:
    assert (built_site / "assets" / "mathjax" / "MathJax.js").is_file()
    for page in (built_site / "index.html", built_site / "taxonomy" / "index.html"):
        scripts = [url for tag, url in parse_page(page).resources if tag == "script"]
        mathjax = [url for url in scripts if url.endswith("assets/mathjax/MathJax.js")]
        assert mathjax, f"{page} does not load MathJax"
        assert all(not url.startswith("/") and not is_remote(url) for url in mathjax), mathjax


def test_every_bibliography_link_points_at_an_entry(built_site: Path, catalog) -> None:
    """Pages cite works as bibliography.md#KEY; MkDocs only reports a missing anchor at INFO level."""
    broken = []
    for page in sorted(built_site.rglob("*.html")):
        for href in parse_page(page).links:
            parsed = urlparse(href)
            fragment = parsed.fragment
            if not parsed.path.endswith("bibliography/") or not fragment or fragment.startswith("family-"):
                continue  # not a link to one entry (family sections are anchors of their own)
            if fragment not in catalog:
                broken.append(f"{page.relative_to(built_site)}: #{fragment}")
    assert not broken, "links to keys that are not in bib/references.bib:\n" + "\n".join(sorted(set(broken)))


# ---------------------------------------------------------------------------------------------------
# The generator itself, without MkDocs


def test_generate_is_fast_idempotent_and_cleans_up(tmp_path: Path, catalog) -> None:
    from reference_impls.knowledge import sitegen

    docs = tmp_path / "docs"
    stale = docs / "methods" / "removed2020method.md"
    stale.parent.mkdir(parents=True)
    stale.write_text("old", encoding="utf-8")
    start = time.perf_counter()
    nav = sitegen.generate(docs, catalog)
    elapsed = time.perf_counter() - start
    print(f"generate() took {elapsed:.2f} s")  # reported, not asserted: timings belong in benchmarks/
    assert not stale.exists()
    first = {p.relative_to(docs): p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in docs.rglob("*") if p.is_file()}
    assert sitegen.generate(docs, catalog) == nav
    assert {p.relative_to(docs): p.read_bytes() for p in docs.rglob("*") if p.is_file()} == first
    # Unchanged files are not rewritten, so `mkdocs serve` does not rebuild on its own output.
    assert {p: p.stat().st_mtime_ns for p in docs.rglob("*") if p.is_file()} == mtimes
    assert nav["Methods"][0] == "methods/index.md"  # the tab opens the section's index
    methods = [page for section in nav["Methods"][1:] for pages in section.values() for page in pages]
    assert len(methods) == len(catalog.methods())
    assert nav["Taxonomy"][0] == "taxonomy.md" and nav["Bibliography"] == ["bibliography.md"]


def test_handwritten_pages_are_included(tmp_path: Path, catalog) -> None:
    from reference_impls.knowledge import sitegen

    entry = catalog.methods()[0]
    docs = tmp_path / "docs"
    (docs / "_handwritten" / "methods").mkdir(parents=True)
    (docs / "_handwritten" / "families").mkdir(parents=True)
    (docs / "_handwritten" / "methods" / f"{entry.key}.md").write_text(
        "# Ignored title\n\n## Background\n\nHand-written text.\n", encoding="utf-8"
    )
    (docs / "_handwritten" / "families" / f"{entry.family}.md").write_text(
        "## Background\n\nFamily text.\n", encoding="utf-8"
    )
    sitegen.generate(docs, catalog)
    page = (docs / "methods" / f"{entry.key}.md").read_text(encoding="utf-8")
    assert "Hand-written text." in page and "Ignored title" not in page
    assert "Catalogued, not implemented" not in page
    assert page.index("## At a glance") < page.index("## Background") < page.index("## References")
    assert "```bibtex" in page
    family = (docs / "families" / f"{entry.family}.md").read_text(encoding="utf-8")
    assert family.index("Family text.") < family.index("## Methods in this family")
    other = catalog.methods()[1]
    assert "Catalogued, not implemented" in (docs / "methods" / f"{other.key}.md").read_text(
        encoding="utf-8"
    ) or (other.implemented)


def test_no_page_shows_a_path_of_the_build_machine(built_site: Path) -> None:
    from reference_impls.knowledge.notebooks import machine_paths

    paths = [p for p in machine_paths() if len(p) > 4]
    offenders = {}
    for page in built_site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        found = [p for p in paths if p in text]
        if found:
            offenders[page.relative_to(built_site).as_posix()] = found
    assert not offenders, offenders


def test_notebook_pages_are_clean_and_linked(built_site: Path, catalog) -> None:
    docs = REPO_ROOT / "docs" / "notebooks"
    for entry in catalog.implemented():
        if not entry.notebook:
            continue
        name = Path(entry.notebook).stem
        page = (docs / f"{name}.md").read_text(encoding="utf-8")
        assert page.startswith("# "), f"{name}: the title must come first"
        assert f"../methods/{entry.key}.md" in page and f"({name}.ipynb)" in page
        assert "![png]" not in page and "TqdmWarning" not in page and "# Parameters" not in page
        assert (built_site / "notebooks" / f"{name}.ipynb").is_file()


def test_bibtex_downloads_parse_and_cover_the_bibliography(built_site: Path, catalog) -> None:
    import bibtexparser

    everything = bibtexparser.parse_string((built_site / "bib" / "rlvg-atlas.bib").read_text(encoding="utf-8"))
    assert {e.key for e in everything.entries} == {e.key for e in catalog.entries}
    grpo = bibtexparser.parse_string((built_site / "bib" / "family-grpo.bib").read_text(encoding="utf-8"))
    assert {e.key for e in grpo.entries} == {e.key for e in catalog.select("grpo")}
    html = (built_site / "bibliography" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'<a (download )?href="(\.\./)?bib/rlvg-atlas\.bib"( download)?', html) and "download" in html, (
        "no download link on the bibliography page")


def test_written_pages_hold_no_control_characters() -> None:
    """A LaTeX command typed in a non-raw Python string (\\frac, \\text) becomes a form feed or a tab."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "docs", "reference_impls", "bib"], cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True).stdout.split()  # generated pages are not ours
    sources = [REPO_ROOT / name for name in tracked if name.endswith((".md", ".py", ".yaml"))]
    assert len(sources) > 200
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            bad = [hex(ord(c)) for c in line if ord(c) < 32 and c not in "\t"] + (
                ["tab in math"] if "\t" in line and ("$" in line or "\\" in line) else [])
            assert not bad, f"{path.relative_to(REPO_ROOT)}:{number}: control character(s) {bad}"


def test_site_url_is_not_pinned_to_loopback() -> None:
    text = (REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "127.0.0.1" not in text.split("site_url:")[1].splitlines()[0]


def test_method_summaries_are_well_formed(catalog) -> None:
    """Each catalogued method's summary: the three sections, balanced display math, links only to methods."""
    from reference_impls.knowledge import sitegen

    folder = REPO_ROOT / "docs" / sitegen.HANDWRITTEN / sitegen.SUMMARIES
    summaries = sorted(folder.glob("*.md"))
    assert summaries, f"no summaries in {folder}"
    implemented = {entry.key for entry in catalog.methods() if entry.implemented}
    catalogued = {entry.key for entry in catalog.methods()}
    for path in summaries:
        text = path.read_text(encoding="utf-8")
        assert path.stem in catalogued and path.stem not in implemented, f"{path.name}: not a catalogue-only method"
        positions = [text.find(heading) for heading in sitegen.SUMMARY_HEADINGS]
        assert -1 not in positions and positions == sorted(positions), f"{path.name}: sections missing or out of order"
        assert text.count("$$") % 2 == 0, f"{path.name}: unbalanced $$"
        for target in re.findall(r"\]\(([^)#]+\.md)", text):
            assert Path(target).stem in implemented, f"{path.name}: links {target}, not an implemented method page"


def test_catalogued_page_shows_its_summary(tmp_path: Path, catalog) -> None:
    from reference_impls.knowledge import sitegen

    folder = REPO_ROOT / "docs" / sitegen.HANDWRITTEN / sitegen.SUMMARIES
    key = sorted(folder.glob("*.md"))[0].stem
    page = sitegen.method_page(catalog, catalog[key], REPO_ROOT / "docs")
    assert "## The method in brief" in page and "### Reported result" in page
    assert "Catalogued, not implemented" in page


def test_unused_mathjax_parts_are_not_shipped(built_site: Path) -> None:
    from reference_impls.knowledge.mkdocs_hooks import MATHJAX_UNUSED

    mathjax = built_site / "assets" / "mathjax"
    assert (mathjax / "MathJax.js").is_file()
    assert not [part for part in MATHJAX_UNUSED if (mathjax / part).exists()]
