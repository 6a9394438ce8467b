"""The bibliography: ``bib/references.bib`` parsed with bibtexparser 2.x, checked against bib/README.md.

Every problem is reported as a :class:`DataProblem` that names the file, the line, the entry key and the
field, so a contributor can go straight to the place to fix. :func:`load_bibliography` raises
:class:`DataError` holding all problems at once rather than stopping at the first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bibtexparser
from bibtexparser.model import DuplicateBlockKeyBlock, DuplicateFieldKeyBlock, Entry

from reference_impls.knowledge.paths import bib_dir

KEY_PATTERN = re.compile(r"[a-z]+[0-9]{4}[a-z0-9]+")
# New style: YYMM.NNNN (2007-2014) or YYMM.NNNNN (2015 on); old style: archive[.SUBJ]/YYMMNNN.
ARXIV_NEW = re.compile(r"[0-9]{4}\.[0-9]{4,5}")
ARXIV_OLD = re.compile(r"[a-z]+(-[a-z]+)*(\.[A-Z]{2})?/[0-9]{7}")
ARXIV_VERSION = re.compile(r"v[0-9]+$")

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "inproceedings": ("title", "author", "booktitle", "year"),
    "article": ("title", "author", "journal", "year"),
    "book": ("title", "author", "publisher", "year"),
    "misc": ("title", "author", "year"),
}
# The year field (cited version) may follow the key's year (first appearance) by this much.
MAX_KEY_YEAR_GAP = 2
# @misc needs at least one of these to say where the work can be found.
MISC_LOCATION_FIELDS = ("howpublished", "url")


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong in a data file, located precisely enough to fix it without searching."""

    path: Path
    line: int | None
    key: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        parts = [where]
        if self.key:
            parts.append(self.key)
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.message}"


class DataError(Exception):
    """A data file (bibliography, catalog, vocabulary) is malformed; holds every problem found."""

    def __init__(self, problems: Iterable[DataProblem]):
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the atlas data:\n{lines}")


@dataclass(frozen=True)
class BibEntry:
    """One BibTeX entry: its type, key, fields (values without their outer braces) and provenance.

    ``raw_fields`` keeps each value as written (``{...}``, ``"..."`` or a bare number/macro) so that
    the BibTeX export can reproduce the entry faithfully; ``fields`` holds the unwrapped values, keyed
    by lower-case field name.
    """

    key: str
    entry_type: str
    fields: dict[str, str]
    raw_fields: tuple[tuple[str, str], ...]
    raw: str
    path: Path
    line: int
    field_lines: dict[str, int] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name.lower(), default)

    @property
    def title(self) -> str:
        return self.get("title")

    @property
    def year(self) -> int | None:
        value = self.get("year")
        return int(value) if value.isdigit() else None

    @property
    def authors(self) -> list[str]:
        """Author names as written, split on the BibTeX ``and`` separator (outside braces)."""
        return split_authors(self.get("author"))

    @property
    def eprint(self) -> str | None:
        return self.get("eprint") or None

    @property
    def arxiv_url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.eprint}" if self.eprint else None

    def line_of(self, name: str) -> int:
        return self.field_lines.get(name.lower(), self.line)


@dataclass(frozen=True)
class Bibliography:
    """All entries of one .bib file, in file order, with a lookup by key."""

    path: Path
    entries: tuple[BibEntry, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {entry.key: entry for entry in self.entries})

    def __getitem__(self, key: str) -> BibEntry:
        return self._by_key[key]  # type: ignore[attr-defined]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[BibEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [entry.key for entry in self.entries]


def default_path() -> Path:
    return bib_dir() / "references.bib"


def split_authors(value: str) -> list[str]:
    """Split ``A and B and others`` at top-level ``and`` (an ``and`` inside braces is part of a name)."""
    value = " ".join(value.split())
    names, depth, start, index = [], 0, 0, 0
    while index < len(value):
        char = value[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 0 and value[index : index + 5].lower() == " and ":
            names.append(value[start:index])
            start = index + 5
            index += 4
        index += 1
    names.append(value[start:])
    return [" ".join(name.split()) for name in names if name.strip()]


def unwrap(value: str) -> str | None:
    """The content of a field value written ``{...}`` or ``"..."``; a bare number or macro as is.

    Returns None when the value is not one balanced group, which is what a missing comma between two
    fields looks like after parsing (``{x} year = 2020``).
    """
    value = value.strip()
    if value.startswith("{"):
        depth = 0
        for index, char in enumerate(value):
            depth += char == "{"
            depth -= char == "}"
            if depth == 0:
                return value[1:index] if index == len(value) - 1 else None
        return None
    if value.startswith('"'):
        return value[1:-1] if value.endswith('"') and len(value) > 1 and '"' not in value[1:-1] else None
    return value if re.fullmatch(r"[A-Za-z0-9_.:-]+", value) else None


def is_arxiv_id(value: str) -> bool:
    return bool(ARXIV_NEW.fullmatch(value) or ARXIV_OLD.fullmatch(value))


def _entry_from_block(block: Entry, path: Path, problems: list[DataProblem]) -> BibEntry:
    line = block.start_line + 1  # bibtexparser counts lines from 0
    fields: dict[str, str] = {}
    field_lines: dict[str, int] = {}
    raw_fields: list[tuple[str, str]] = []
    for item in block.fields:
        name = item.key.lower()
        field_line = (item.start_line + 1) if item.start_line is not None else line
        value = unwrap(item.value)
        if value is None:
            problems.append(
                DataProblem(
                    path,
                    field_line,
                    block.key,
                    item.key,
                    f'value {item.value[:60]!r} is not one {{...}} or "..." group (a missing comma '
                    "before the next field?)",
                )
            )
            value = item.value
        fields[name] = " ".join(value.split())
        field_lines[name] = field_line
        raw_fields.append((item.key, item.value))
    return BibEntry(
        key=block.key,
        entry_type=block.entry_type.lower(),
        fields=fields,
        raw_fields=tuple(raw_fields),
        raw=block.raw,
        path=path,
        line=line,
        field_lines=field_lines,
    )


def parse_bibliography(path: Path) -> tuple[Bibliography, list[DataProblem]]:
    """Parse a .bib file; syntax errors and duplicates come back as problems, not exceptions."""
    problems: list[DataProblem] = []
    text = path.read_text(encoding="utf-8")
    # bibtexparser logs every failed block as a warning; we report them ourselves with file and line.
    parser_logger = logging.getLogger("bibtexparser")
    previous_level = parser_logger.level
    parser_logger.setLevel(logging.ERROR)
    try:
        library = bibtexparser.parse_string(text, parse_stack=[])
    finally:
        parser_logger.setLevel(previous_level)
    for failed in library.failed_blocks:
        line = failed.start_line + 1
        if isinstance(failed, DuplicateBlockKeyBlock):
            first = next((e for e in library.entries if e.key == failed.key), None)
            where = f" (first at line {first.start_line + 1})" if first else ""
            problems.append(DataProblem(path, line, failed.key, None, f"duplicate key{where}"))
        elif isinstance(failed, DuplicateFieldKeyBlock):
            key = getattr(failed.ignore_error_block, "key", None)
            names = ", ".join(sorted(getattr(failed, "duplicate_keys", ()))) or None
            problems.append(DataProblem(path, line, key, names, "field given more than once"))
        else:
            reason = getattr(failed.error, "abort_reason", None) or str(failed.error) or "syntax error"
            head = failed.raw.strip().splitlines()[0][:60] if failed.raw.strip() else ""
            problems.append(DataProblem(path, line, None, None, f"cannot parse entry {head!r}: {reason}"))
    entries = tuple(_entry_from_block(block, path, problems) for block in library.entries)
    return Bibliography(path, entries), problems


def check_entry(entry: BibEntry) -> list[DataProblem]:
    """Everything wrong with one entry against the conventions of bib/README.md."""
    problems: list[DataProblem] = []

    def problem(field_name: str | None, message: str) -> None:
        line = entry.line_of(field_name) if field_name else entry.line
        problems.append(DataProblem(entry.path, line, entry.key, field_name, message))

    if not KEY_PATTERN.fullmatch(entry.key):
        problem(None, "key must look like <lastname><year><shortname>, only [a-z0-9], e.g. black2023ddpo")
    required = REQUIRED_FIELDS.get(entry.entry_type)
    if required is None:
        problem(
            None,
            f"entry type @{entry.entry_type} is not used here; use one of @{', @'.join(REQUIRED_FIELDS)}",
        )
        required = ()
    for name in required:
        if not entry.get(name).strip():
            problem(name, f"required for @{entry.entry_type} but missing or empty")
    if entry.entry_type == "misc" and not any(entry.get(name) for name in MISC_LOCATION_FIELDS):
        problem("howpublished", "@misc needs 'howpublished' or 'url'")
    year = entry.get("year")
    if year and not re.fullmatch(r"[0-9]{4}", year):
        problem("year", f"{year!r} is not a four-digit year")
    key_year = re.search(r"[0-9]{4}", entry.key)
    # The key carries the year the work first appeared; `year` is the cited version's (bib/README.md).
    if year.isdigit() and key_year and KEY_PATTERN.fullmatch(entry.key):
        gap = int(year) - int(key_year.group())
        if not 0 <= gap <= MAX_KEY_YEAR_GAP:
            problem(
                "year",
                f"year {year} is not within {MAX_KEY_YEAR_GAP} years after the year {key_year.group()} in "
                "the key (the key's year is when the work first appeared)",
            )
    first = arxiv_year(entry.get("eprint"))
    if first and key_year and KEY_PATTERN.fullmatch(entry.key) and int(key_year.group()) != first:
        problem(None, f"the key's year {key_year.group()} is not {first}, the year of arXiv:{entry.get('eprint')} "
                      f"(the key carries the year the work first appeared; rename it, e.g. "
                      f"{entry.key.replace(key_year.group(), str(first), 1)}, and add the old key to bib/aliases.yaml)")
    problems.extend(_check_arxiv(entry))
    return problems


def arxiv_year(eprint: str | None) -> int | None:
    """Year an arXiv id was first posted: 2305.13301 -> 2023, cs/0101001 -> 2001 (None if not an id)."""
    if not eprint or not is_arxiv_id(eprint):
        return None
    digits = eprint.split("/")[-1][:2]
    year = int(digits)
    return 1900 + year if year >= 91 else 2000 + year


def _check_arxiv(entry: BibEntry) -> list[DataProblem]:
    problems: list[DataProblem] = []
    eprint = entry.get("eprint")
    prefix = entry.get("archiveprefix")

    def problem(field_name: str, message: str) -> None:
        problems.append(DataProblem(entry.path, entry.line_of(field_name), entry.key, field_name, message))

    if not eprint:
        if prefix:
            problem("archivePrefix", "archivePrefix given without eprint")
        return problems
    if ARXIV_VERSION.search(eprint) and is_arxiv_id(ARXIV_VERSION.sub("", eprint)):
        problem("eprint", f"{eprint!r} has a version suffix; write {ARXIV_VERSION.sub('', eprint)!r}")
    elif not is_arxiv_id(eprint):
        problem("eprint", f"{eprint!r} is not an arXiv id (2305.13301 or cs/0101001 style)")
    if prefix != "arXiv":
        problem("archivePrefix", f"must be 'arXiv' when eprint is given (found {prefix or 'nothing'!r})")
    journal = entry.get("journal")
    cited = re.search(r"arXiv:\s*(\S+)", journal)
    if cited and cited.group(1).rstrip(".,") != eprint:
        problem("journal", f"cites arXiv:{cited.group(1)} but eprint is {eprint}")
    return problems


def check_bibliography(bibliography: Bibliography) -> list[DataProblem]:
    """Per-entry checks plus uniqueness of arXiv ids across entries."""
    problems = [problem for entry in bibliography for problem in check_entry(entry)]
    owners: dict[str, BibEntry] = {}
    for entry in bibliography:
        if entry.eprint:
            first = owners.setdefault(entry.eprint, entry)
            if first is not entry:
                problems.append(
                    DataProblem(
                        entry.path,
                        entry.line_of("eprint"),
                        entry.key,
                        "eprint",
                        f"arXiv id {entry.eprint} already used by {first.key} (line {first.line})",
                    )
                )
    return problems


def load_aliases(path: Path | None = None) -> dict[str, str]:
    """Old BibTeX key -> current key (``bib/aliases.yaml``): keys renamed to follow the key rule keep working."""
    import yaml

    path = path or default_path().with_name("aliases.yaml")
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise DataError([DataProblem(path, None, None, None,
                                     f"must map old keys to current keys (old: new), found {type(data).__name__}")])
    return {str(old): str(new) for old, new in data.items()}


def load_bibliography(path: Path | None = None) -> Bibliography:
    """Parse and check ``references.bib``; raises :class:`DataError` listing every problem."""
    path = path or default_path()
    if not path.exists():
        raise DataError([DataProblem(path, None, None, None, "file not found")])
    bibliography, problems = parse_bibliography(path)
    problems += check_bibliography(bibliography)
    if problems:
        raise DataError(problems)
    return bibliography
