"""The catalog: what the atlas says about each work (``bib/catalog.yaml``), checked against the vocabulary.

YAML is read through its node tree so that every problem can name ``file:line``. The catalog and the
bibliography are matched one to one by BibTeX key; :func:`load_catalog` checks both and raises
:class:`~reference_impls.knowledge.bibliography.DataError` with every problem found.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from reference_impls.knowledge.bibliography import (
    Bibliography,
    DataError,
    DataProblem,
    check_bibliography,
    parse_bibliography,
)
from reference_impls.knowledge.paths import bib_dir, repo_root

REQUIRED = ("name", "family", "modality", "generator", "feedback", "mechanism", "verified")
OPTIONAL = ("code", "implementation", "notebook")
# Catalog field -> vocabulary section holding its allowed values.
VOCABULARY_FIELDS = {
    "family": "family",
    "modality": "modality",
    "generator": "generator",
    "feedback": "feedback",
}
# The columns of the taxonomy matrix, in this order; other modalities follow if methods use them.
MAIN_MODALITIES = ("image", "video", "3d-4d")


@dataclass(frozen=True)
class Family:
    """A value of the ``family`` field: its display label and whether it is a row of the taxonomy."""

    key: str
    label: str
    method_family: bool


@dataclass(frozen=True)
class Vocabulary:
    """Allowed values of every catalog field (``bib/vocabulary.yaml``), in the file's order."""

    families: dict[str, Family]
    modalities: dict[str, str]
    generators: dict[str, str]
    feedback: dict[str, str]

    def allowed(self, field_name: str) -> dict[str, str]:
        """Value -> label for a vocabulary field (``family``, ``modality``, ``generator``, ``feedback``)."""
        if field_name == "family":
            return {key: family.label for key, family in self.families.items()}
        return {"modality": self.modalities, "generator": self.generators, "feedback": self.feedback}[
            field_name
        ]

    def label(self, field_name: str, value: str) -> str:
        return self.allowed(field_name).get(value, value)

    def short_label(self, field_name: str, value: str) -> str:
        """The label without its parenthesised gloss, for table cells."""
        return self.label(field_name, value).split(" (")[0]

    @property
    def method_families(self) -> list[str]:
        return [key for key, family in self.families.items() if family.method_family]


@dataclass(frozen=True)
class CatalogEntry:
    """One catalogued work; ``year`` and ``title`` come from its BibTeX entry."""

    key: str
    name: str
    family: str
    modality: str
    generator: str
    feedback: tuple[str, ...]
    mechanism: str
    verified: str
    code: str | None = None
    implementation: str | None = None
    notebook: str | None = None
    year: int | None = None
    title: str = ""
    line: int = 0
    field_lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def implemented(self) -> bool:
        return bool(self.implementation)

    @property
    def first_year(self) -> int | None:
        """Year the work first appeared (usually its first arXiv version): the year in its key."""
        match = re.search(r"[0-9]{4}", self.key)
        return int(match.group()) if match else self.year


@dataclass(frozen=True)
class Catalog:
    """The checked catalog, joined with the bibliography and the vocabulary.

    Entries are kept in vocabulary family order, then by key, whatever the file order.
    """

    vocabulary: Vocabulary
    bibliography: Bibliography
    entries: tuple[CatalogEntry, ...]
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {entry.key: entry for entry in self.entries})

    def __getitem__(self, key: str) -> CatalogEntry:
        return self._by_key[key]  # type: ignore[attr-defined]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        return [entry.key for entry in self.entries]

    def is_method(self, entry: CatalogEntry | str) -> bool:
        """True for works in a method family (rows of the taxonomy), False for background works."""
        entry = self[entry] if isinstance(entry, str) else entry
        family = self.vocabulary.families.get(entry.family)
        return bool(family and family.method_family)

    def select(
        self, family: str | None = None, modality: str | None = None, implemented: bool = False
    ) -> list[CatalogEntry]:
        """Entries matching every given filter (None means any)."""
        return [
            entry
            for entry in self.entries
            if (family is None or entry.family == family)
            and (modality is None or entry.modality == modality)
            and (not implemented or entry.implemented)
        ]

    def methods(self, family: str | None = None, modality: str | None = None) -> list[CatalogEntry]:
        """Method entries, implemented ones first, then by year and name (the order of the site)."""
        chosen = [entry for entry in self.select(family, modality) if self.is_method(entry)]
        return sorted(chosen, key=method_order)

    def implemented(self) -> list[CatalogEntry]:
        return [entry for entry in self.entries if entry.implemented]

    def matrix_modalities(self) -> list[str]:
        """Columns of the taxonomy: image, video, 3D/4D, then any other modality methods use."""
        used = {entry.modality for entry in self.entries if self.is_method(entry)}
        extra = [m for m in self.vocabulary.modalities if m in used and m not in MAIN_MODALITIES]
        return [*MAIN_MODALITIES, *extra]

    def matrix(self) -> dict[tuple[str, str], list[CatalogEntry]]:
        """(method family, modality) -> methods in that cell, every cell present (possibly empty)."""
        return {
            (family, modality): self.methods(family, modality)
            for family in self.vocabulary.method_families
            for modality in self.matrix_modalities()
        }


def method_order(entry: CatalogEntry) -> tuple[bool, int, str]:
    return (not entry.implemented, entry.year or 0, entry.name.lower())


def suggest(value: str, allowed: Iterable[str], n: int = 3) -> list[str]:
    """The closest valid names to a mistyped one (for error messages)."""
    return difflib.get_close_matches(value, list(allowed), n=n, cutoff=0.5)


# ---------------------------------------------------------------------------------------------------
# YAML with line numbers


def compose_yaml(path: Path) -> tuple[yaml.Node | None, Any, list[DataProblem]]:
    """Parse YAML keeping the node tree (for line numbers) and the plain data built from it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None, [DataProblem(path, None, None, None, "file not found")]
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        return None, None, [DataProblem(path, line, None, None, f"not valid YAML: {error.problem}")]
    finally:
        loader.dispose()
    return node, data, []


def _mapping_items(node: yaml.Node) -> list[tuple[str, int, yaml.Node]]:
    """(key, 1-based line, value node) for each item of a mapping node."""
    return [(str(key.value), key.start_mark.line + 1, value) for key, value in node.value]


def _duplicates(path: Path, items: list[tuple[str, int, yaml.Node]], owner: str | None) -> list[DataProblem]:
    # PyYAML keeps the last of two equal keys silently; a duplicated record would hide the first.
    seen: dict[str, int] = {}
    problems = []
    for key, line, _ in items:
        if key in seen:
            field_name = key if owner else None
            problems.append(
                DataProblem(path, line, owner or key, field_name, f"given twice (first at line {seen[key]})")
            )
        seen.setdefault(key, line)
    return problems


def load_vocabulary(path: Path | None = None) -> Vocabulary:
    path = path or bib_dir() / "vocabulary.yaml"
    node, data, problems = compose_yaml(path)
    if problems:
        raise DataError(problems)
    if not isinstance(data, dict):
        raise DataError([DataProblem(path, 1, None, None, "must be a mapping of field -> allowed values")])
    missing = [name for name in VOCABULARY_FIELDS.values() if not isinstance(data.get(name), dict)]
    if missing:
        raise DataError(
            [DataProblem(path, 1, None, name, "section missing or not a mapping") for name in missing]
        )
    families = {}
    for key, value in data["family"].items():
        if not isinstance(value, dict) or "label" not in value:
            raise DataError(
                [DataProblem(path, None, key, "family", "needs {label: ..., method_family: ...}")]
            )
        families[str(key)] = Family(str(key), str(value["label"]), bool(value.get("method_family")))
    return Vocabulary(
        families=families,
        modalities={str(k): str(v) for k, v in data["modality"].items()},
        generators={str(k): str(v) for k, v in data["generator"].items()},
        feedback={str(k): str(v) for k, v in data["feedback"].items()},
    )


# ---------------------------------------------------------------------------------------------------
# Checks


def _allowed_message(vocabulary: Vocabulary, field_name: str, value: str) -> str:
    allowed = list(vocabulary.allowed(field_name))
    close = suggest(value, allowed)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (
        f"{value!r} is not an allowed {field_name}.{hint} Allowed: {', '.join(allowed)} (bib/vocabulary.yaml)"
    )


def check_record(
    path: Path, key: str, line: int, value_node: yaml.Node, record: Any, vocabulary: Vocabulary, root: Path
) -> tuple[CatalogEntry | None, list[DataProblem]]:
    """Check one catalog record; returns the entry (None if unusable) and its problems."""
    if not isinstance(record, dict) or not isinstance(value_node, yaml.MappingNode):
        return None, [DataProblem(path, line, key, None, "must be a mapping of field: value")]
    items = _mapping_items(value_node)
    lines = {name: field_line for name, field_line, _ in items}
    problems = _duplicates(path, items, key)

    def problem(field_name: str | None, message: str) -> None:
        problems.append(DataProblem(path, lines.get(field_name or "", line), key, field_name, message))

    for name in record:
        if name not in REQUIRED and name not in OPTIONAL:
            close = suggest(str(name), (*REQUIRED, *OPTIONAL))
            hint = f" (did you mean {close[0]}?)" if close else ""
            problem(str(name), f"unknown field{hint}; fields are {', '.join((*REQUIRED, *OPTIONAL))}")
    for name in REQUIRED:
        value = record.get(name)
        if value is None or (isinstance(value, (str, list)) and not value):
            problem(name, "required but missing or empty")
    for name in ("name", "mechanism", "verified", *OPTIONAL):
        if record.get(name) is not None and not isinstance(record[name], str):
            problem(name, f"must be text, found {type(record[name]).__name__}")

    for name in ("family", "modality", "generator"):
        value = record.get(name)
        if value is not None and str(value) not in vocabulary.allowed(name):
            problem(name, _allowed_message(vocabulary, name, str(value)))
    feedback = record.get("feedback")
    if feedback is not None and not isinstance(feedback, list):
        problem("feedback", f"must be a list, e.g. [{feedback}]")
    elif isinstance(feedback, list):
        for value in feedback:
            if str(value) not in vocabulary.feedback:
                problem("feedback", _allowed_message(vocabulary, "feedback", str(value)))
        if len(set(map(str, feedback))) != len(feedback):
            problem("feedback", "lists a value twice")

    code = record.get("code")
    if isinstance(code, str):
        parsed = urlparse(code)
        if parsed.scheme != "https" or not parsed.netloc or " " in code:
            problem("code", f"{code!r} is not an https:// URL")
    for name in ("implementation", "notebook"):
        target = record.get(name)
        if isinstance(target, str) and target:
            if Path(target).is_absolute() or ".." in Path(target).parts:
                problem(name, f"{target!r} must be a path inside the repository, relative to its root")
            elif not (root / target).is_file():
                problem(name, f"{target!r} does not exist (paths are relative to the repository root)")
    if problems:
        return None, problems
    entry = CatalogEntry(
        key=key,
        name=" ".join(str(record["name"]).split()),
        family=str(record["family"]),
        modality=str(record["modality"]),
        generator=str(record["generator"]),
        feedback=tuple(str(value) for value in record["feedback"]),
        mechanism=" ".join(str(record["mechanism"]).split()),
        verified=str(record["verified"]).strip(),
        code=record.get("code"),
        implementation=record.get("implementation"),
        notebook=record.get("notebook"),
        line=line,
        field_lines=lines,
    )
    return entry, problems


def parse_catalog(
    path: Path, vocabulary: Vocabulary, root: Path
) -> tuple[list[CatalogEntry], dict[str, int], list[DataProblem]]:
    """Checked entries, the line of every record key (valid or not), and the problems found."""
    node, data, problems = compose_yaml(path)
    if problems or data is None:
        return [], {}, problems
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        return [], {}, [DataProblem(path, 1, None, None, "must be a mapping of BibTeX key -> record")]
    items = _mapping_items(node)
    problems = _duplicates(path, items, None)
    entries = []
    for key, line, value_node in items:
        entry, record_problems = check_record(path, key, line, value_node, data.get(key), vocabulary, root)
        problems += record_problems
        if entry:
            entries.append(entry)
    return entries, {key: line for key, line, _ in items}, problems


def match_bibliography(
    entries: list[CatalogEntry], record_lines: dict[str, int], bibliography: Bibliography, catalog_path: Path
) -> tuple[list[CatalogEntry], list[DataProblem]]:
    """Join catalog entries with their BibTeX entries (year, title); report keys on one side only."""
    problems = []
    for key, line in record_lines.items():
        if key not in bibliography:
            close = suggest(key, bibliography.keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(
                DataProblem(catalog_path, line, key, None, f"no entry with this key in references.bib{hint}")
            )
    for bib_entry in bibliography:
        if bib_entry.key not in record_lines:
            problems.append(
                DataProblem(
                    bib_entry.path, bib_entry.line, bib_entry.key, None, "has no record in catalog.yaml"
                )
            )
    joined = [
        dataclasses.replace(entry, year=bibliography[entry.key].year, title=bibliography[entry.key].title)
        for entry in entries
        if entry.key in bibliography
    ]
    return joined, problems


def load_catalog(
    catalog_path: Path | None = None,
    bib_path: Path | None = None,
    vocabulary_path: Path | None = None,
    root: Path | None = None,
) -> Catalog:
    """Load and check the vocabulary, the bibliography and the catalog together.

    Raises :class:`DataError` listing every problem in either file (all at once, so one run of
    ``pytest`` or ``rlvg catalog`` shows the whole list to fix).
    """
    root = root or repo_root()
    catalog_path = catalog_path or bib_dir() / "catalog.yaml"
    bib_path = bib_path or bib_dir() / "references.bib"
    vocabulary = load_vocabulary(vocabulary_path)
    if not bib_path.exists():
        raise DataError([DataProblem(bib_path, None, None, None, "file not found")])
    bibliography, problems = parse_bibliography(bib_path)
    problems += check_bibliography(bibliography)
    entries, record_lines, catalog_problems = parse_catalog(catalog_path, vocabulary, root)
    problems += catalog_problems
    if record_lines or not catalog_problems:
        # An unreadable catalog has no records: matching would only repeat every key as missing.
        entries, match_problems = match_bibliography(entries, record_lines, bibliography, catalog_path)
        problems += match_problems
    if problems:
        raise DataError(problems)
    order = {family: index for index, family in enumerate(vocabulary.families)}
    entries.sort(key=lambda entry: (order[entry.family], entry.key))
    return Catalog(vocabulary, bibliography, tuple(entries), catalog_path)
