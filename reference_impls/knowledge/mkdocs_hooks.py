"""MkDocs hook: generate the data-driven pages before MkDocs collects files.

All page generation is plain Python in ``sitegen`` and ``notebooks``; this hook only calls it and
fills the generated sections of the navigation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from reference_impls.knowledge import notebooks, results_page, sitegen

# Parts of the MathJax package this site never loads (checked in a browser: HTML-CSS output with STIX-Web fonts,
# English, no accessibility menu), about 9 MB of the 12 MB: not shipped.
MATHJAX_UNUSED = ("jax/output/SVG", "extensions/a11y", "localization")


def _copy_mathjax(docs_dir: Path) -> None:
    """Serve MathJax from the site itself (the jupyter-server-mathjax package ships it), minus unused parts."""
    import jupyter_server_mathjax

    source = Path(jupyter_server_mathjax.__file__).parent / "static"
    target = docs_dir / "assets" / "mathjax"
    if not (target / "MathJax.js").exists():
        unused = {(source / part).resolve() for part in MATHJAX_UNUSED}
        shutil.copytree(source, target, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if (Path(folder) / n).resolve() in unused])
    for part in MATHJAX_UNUSED:  # a copy made before this list existed
        shutil.rmtree(target / part, ignore_errors=True)


def _replace_section(nav: list, title: str, entries: list) -> None:
    for index, item in enumerate(nav):
        if isinstance(item, dict) and title in item:
            nav[index] = {title: entries}
            return
    nav.append({title: entries})


def on_config(config):  # noqa: ANN001, ANN201 - MkDocs hook signature
    docs_dir = Path(config["docs_dir"])
    _copy_mathjax(docs_dir)
    sections = sitegen.generate(docs_dir)
    sections["Notebooks"] = notebooks.render_all(docs_dir)
    # The section index (methods/index.md) first, so that the Methods tab opens it; then the results.
    methods = sections.get("Methods", [])
    index, rest = methods[:1], methods[1:]
    sections["Methods"] = index + results_page.write(docs_dir) + rest
    for title, entries in sections.items():
        _replace_section(config["nav"], title, entries)
    return config
