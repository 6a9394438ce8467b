"""Citation formats for bibliography entries: BibTeX, plain text and Markdown.

- ``to_bibtex``: the entry as written in ``references.bib``, normalised (one field per line, two-space
  indent, values in braces, whitespace collapsed), so that a copied entry is clean and stable.
- ``to_text``: ``K. Black, M. Janner, Y. Du, et al. Title. Venue, 2024. arXiv:2305.13301.`` (a DOI or
  URL stands in for works not on arXiv);
- ``to_markdown``: the same with the title in italics and the arXiv id linked to its abstract page.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from reference_impls.knowledge.bibliography import BibEntry, split_authors, unwrap

# Authors shown before "et al." in the text and Markdown formats.
MAX_AUTHORS = 3
FORMATS = ("bibtex", "text", "markdown")
_URL_COMMAND = re.compile(r"\\url\{([^}]*)\}")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|>#])")


@lru_cache(maxsize=1)
def _latex_converter():  # noqa: ANN202 - pylatexenc type
    # pylatexenc ships with bibtexparser 2 (a dependency), so this adds nothing to install.
    from pylatexenc.latex2text import LatexNodes2Text

    return LatexNodes2Text(math_mode="text", strict_latex_spaces=True)


@lru_cache(maxsize=4096)
def latex_to_text(value: str) -> str:
    """Plain Unicode from a BibTeX value: accents decoded, protecting braces and ``\\url`` removed."""
    value = _URL_COMMAND.sub(lambda match: match.group(1), value)
    if not any(char in value for char in "\\{}$~"):
        return " ".join(value.split())  # the common case, without the LaTeX parser
    text = _latex_converter().latex_to_text(value)
    return " ".join(text.replace("\xa0", " ").split())


# ---------------------------------------------------------------------------------------------------
# BibTeX


def to_bibtex(entry: BibEntry) -> str:
    """The entry in normalised form; parses back to the same fields."""
    lines = [f"@{entry.entry_type}{{{entry.key},"]
    for name, raw_value in entry.raw_fields:
        value = unwrap(raw_value)
        if value is None:  # malformed values are reported by validation; export them as written
            rendered = raw_value.strip()
        elif raw_value.strip()[0] in '{"':
            rendered = "{" + " ".join(value.split()) + "}"
        else:
            rendered = value  # a bare number or month macro stays bare
        lines.append(f"  {name} = {rendered},")
    lines.append("}")
    return "\n".join(lines) + "\n"


def bibtex_file(entries: Iterable[BibEntry], header: str | None = None) -> str:
    """Several entries as one .bib text, separated by blank lines, with an optional % comment."""
    blocks = [to_bibtex(entry) for entry in entries]
    prefix = "".join(f"% {line}\n" for line in header.splitlines()) + "\n" if header else ""
    return prefix + "\n".join(blocks)


# ---------------------------------------------------------------------------------------------------
# Text and Markdown


def _initials(given: str) -> str:
    """``Kevin`` -> ``K.``; ``Jean-Pierre`` -> ``J.-P.``; ``Y. Z.`` stays ``Y. Z.``."""
    words = []
    for word in given.split():
        parts = [part for part in word.split("-") if part]
        words.append("-".join(f"{part[0]}." for part in parts))
    return " ".join(words)


def short_name(name: str) -> str:
    """One author as ``F. Last``; organisations (a name in braces) are kept whole."""
    stripped = name.strip()
    if stripped.startswith("{") and stripped.endswith("}") and unwrap(stripped) is not None:
        return latex_to_text(stripped)
    depth, commas = 0, []
    for index, char in enumerate(stripped):
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            commas.append(index)
    if commas:  # "Last, First" or "Last, Jr., First"
        last = stripped[: commas[0]]
        given = stripped[commas[-1] + 1 :]
        suffix = stripped[commas[0] + 1 : commas[-1]] if len(commas) > 1 else ""
    else:  # "First Last": the last word is the family name
        words = stripped.split()
        last, given, suffix = words[-1], " ".join(words[:-1]), ""
    last_text, given_text = latex_to_text(last), latex_to_text(given)
    initials = _initials(given_text)
    shown = f"{initials} {last_text}" if initials else last_text
    return f"{shown}, {latex_to_text(suffix)}" if suffix.strip() else shown


def author_list(entry: BibEntry, limit: int = MAX_AUTHORS) -> str:
    """``A. One, B. Two, C. Three, et al.``; ``and others`` in the .bib also gives ``et al.``."""
    names = split_authors(entry.get("author"))
    truncated = bool(names) and names[-1].lower() == "others"
    names = [name for name in names if name.lower() != "others"]
    if len(names) > limit:
        names, truncated = names[:limit], True
    shown = ", ".join(short_name(name) for name in names)
    return f"{shown}, et al." if truncated else shown


def venue(entry: BibEntry) -> str:
    """Where the work appeared, in words; arXiv-only works say ``arXiv preprint``."""
    for name in ("booktitle", "journal", "howpublished", "publisher"):
        value = entry.get(name)
        if value:
            text = latex_to_text(value)
            return "arXiv preprint" if text.lower().startswith("arxiv preprint") else text
    return ""


def _sentence(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in ".?!" else text + "."


def to_text(entry: BibEntry) -> str:
    """``Authors. Title. Venue, Year. arXiv:ID.``"""
    parts = [_sentence(author_list(entry)), _sentence(latex_to_text(entry.title))]
    place = ", ".join(part for part in (venue(entry), entry.get("year")) if part)
    if place:
        parts.append(_sentence(place))
    if entry.eprint:
        parts.append(f"arXiv:{entry.eprint}.")
    elif entry.get("doi"):
        parts.append(f"doi:{entry.get('doi')}.")
    elif entry.get("url"):
        parts.append(_sentence(entry.get("url")))
    return " ".join(part for part in parts if part)


def escape_markdown(text: str) -> str:
    """Backslash-escape characters Markdown (and Markdown tables) would interpret.

    ``<`` has no backslash escape in Python-Markdown, so it becomes an entity.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("<", "&lt;")


def to_markdown(entry: BibEntry) -> str:
    """Like :func:`to_text`, with the title in italics and a link to the arXiv abstract page."""
    title = latex_to_text(entry.title).rstrip(".")
    stop = "" if title.endswith(("?", "!")) else "."
    parts = [_sentence(escape_markdown(author_list(entry))), f"*{escape_markdown(title)}*{stop}"]
    place = ", ".join(part for part in (venue(entry), entry.get("year")) if part)
    if place:
        parts.append(_sentence(escape_markdown(place)))
    if entry.eprint:
        parts.append(f"[arXiv:{entry.eprint}]({entry.arxiv_url}).")
    elif entry.get("doi"):
        parts.append(f"[doi:{entry.get('doi')}](https://doi.org/{entry.get('doi')}).")
    elif entry.get("url"):
        parts.append(f"<{entry.get('url')}>")
    return " ".join(part for part in parts if part)


def format_entry(entry: BibEntry, style: str) -> str:
    """One entry in ``bibtex``, ``text`` or ``markdown`` style."""
    if style == "bibtex":
        return to_bibtex(entry)
    if style == "text":
        return to_text(entry)
    if style == "markdown":
        return to_markdown(entry)
    raise ValueError(f"unknown citation format {style!r}; use one of {', '.join(FORMATS)}")
