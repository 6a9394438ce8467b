"""Assemble ``bib/references.bib`` and ``bib/catalog.yaml`` from the parts under ``bib/parts/``.

The bibliography was verified in parallel, one part per contributor (``parts/a.bib`` + ``parts/a.yaml``,
...). This script concatenates the parts into the two files the project reads, keeping every entry's
text as its author wrote it, ordered by catalog family (vocabulary order) then key. It refuses keys that
appear twice (within or across parts) and arXiv ids claimed by two keys. After the merge the two files
are the source of truth and the parts can be deleted; nothing else reads ``bib/parts``.

Usage: ``python bib/merge_parts.py [--check]`` (``--check`` reports without writing). Exit 0 on
success, 2 when the parts cannot be merged.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

BIB_DIR = Path(__file__).resolve().parent
PARTS_DIR = BIB_DIR / "parts"

# An entry starts with "@type{key," at the beginning of a line; @comment/@string/@preamble are not entries.
ENTRY_START = re.compile(r"^@(?P<type>[A-Za-z]+)\s*[{(]\s*(?P<key>[^,\s]*)\s*,", re.MULTILINE)
NON_ENTRY_TYPES = {"comment", "string", "preamble"}
# A catalog record starts with an unindented "key:" line.
RECORD_START = re.compile(r"^(?P<key>[^\s#:][^:]*):\s*(#.*)?$")
EPRINT = re.compile(r"eprint\s*=\s*[{\"]\s*([^}\"]+?)\s*[}\"]", re.IGNORECASE)

BIB_HEADER = """\
% references.bib: the bibliography of the RL-for-visual-generation atlas. THIS FILE IS THE SOURCE OF TRUTH.
% It was assembled from verified parts (bib/parts/*.bib) by bib/merge_parts.py; edit it directly now.
% Conventions (keys, entry types, required fields, arXiv ids): bib/README.md. Checked by tests/test_bibliography.py.
"""

CATALOG_HEADER = """\
# catalog.yaml: what the atlas says about each work, keyed by the BibTeX key in references.bib.
# THIS FILE IS THE SOURCE OF TRUTH. It was assembled from verified parts (bib/parts/*.yaml) by
# bib/merge_parts.py, sorted by family then key; edit it directly now.
# Fields and allowed values: bib/README.md and bib/vocabulary.yaml. Checked by tests/test_catalog.py.
"""


class MergeError(Exception):
    """The parts cannot be merged; the message says which file and key."""


@dataclass(frozen=True)
class Chunk:
    """One entry's text (a BibTeX entry or a catalog record) and where it came from."""

    key: str
    text: str
    source: Path
    line: int


def split_bib(path: Path) -> list[Chunk]:
    """Cut a .bib file into entry texts; text between entries (comments) is dropped."""
    text = path.read_text(encoding="utf-8")
    starts = [m for m in ENTRY_START.finditer(text) if m.group("type").lower() not in NON_ENTRY_TYPES]
    chunks = []
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        body = _trim_trailing_comments(text[match.start() : end], "%")
        line = text.count("\n", 0, match.start()) + 1
        if not match.group("key"):
            raise MergeError(f"{path}:{line}: entry without a key")
        chunks.append(Chunk(match.group("key"), body, path, line))
    return chunks


def split_catalog(path: Path) -> list[Chunk]:
    """Cut a catalog part into top-level records, keeping each record's own lines as written.

    Comment lines between records go with the record that follows them (those above the first record
    describe the part and are dropped); blank lines between records are
    dropped (the merged file separates records by one blank line) but kept inside a record.
    """
    chunks: list[Chunk] = []
    pending: list[str] = []  # comments and blank lines not yet known to belong to a record
    current: tuple[str, int, list[str]] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = RECORD_START.match(line)
        if match:
            if current:
                chunks.append(_record_chunk(current, path))
            # Comments above the first record describe the part file itself, not the record.
            comments = [kept for kept in pending if kept.strip()] if current else []
            current = (match.group("key").strip().strip("'\""), number, [*comments, line])
            pending = []
        elif line.startswith("#") or not line.strip():
            pending.append(line)
        elif current is None:
            raise MergeError(f"{path}:{number}: indented text before the first record")
        else:
            current[2].extend(pending)  # blank lines inside a folded mechanism are content
            pending = []
            current[2].append(line)
    if current:
        chunks.append(_record_chunk(current, path))
    return chunks


def _record_chunk(current: tuple[str, int, list[str]], path: Path) -> Chunk:
    key, line, body = current
    return Chunk(key, "\n".join(body).rstrip() + "\n", path, line)


def _trim_trailing_comments(text: str, marker: str) -> str:
    """Drop comment and blank lines after an entry: they introduce the next one."""
    lines = text.rstrip().splitlines()
    while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith(marker)):
        lines.pop()
    return "\n".join(lines) + "\n"


def family_order() -> dict[str, int]:
    vocabulary = yaml.safe_load((BIB_DIR / "vocabulary.yaml").read_text(encoding="utf-8"))
    return {family: index for index, family in enumerate(vocabulary["family"])}


def record_family(chunk: Chunk) -> str:
    try:
        record = yaml.safe_load(chunk.text)
    except yaml.YAMLError as error:
        raise MergeError(f"{chunk.source}:{chunk.line}: {chunk.key}: not valid YAML ({error})") from error
    fields = record.get(chunk.key) if isinstance(record, dict) else None
    if not isinstance(fields, dict) or "family" not in fields:
        raise MergeError(f"{chunk.source}:{chunk.line}: {chunk.key}: field 'family' is missing")
    return str(fields["family"])


def refuse_duplicates(chunks: list[Chunk], what: str) -> None:
    seen: dict[str, Chunk] = {}
    problems = []
    for chunk in chunks:
        if chunk.key in seen:
            first = seen[chunk.key]
            problems.append(
                f"duplicate {what} key '{chunk.key}': {first.source.name}:{first.line} and "
                f"{chunk.source.name}:{chunk.line} (keep one, verified entry)"
            )
        seen.setdefault(chunk.key, chunk)
    by_id: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        for eprint in EPRINT.findall(chunk.text) if what == "BibTeX" else []:
            by_id.setdefault(eprint, []).append(chunk)
    for eprint, holders in by_id.items():
        if len(holders) > 1:
            where = ", ".join(f"{c.key} ({c.source.name}:{c.line})" for c in holders)
            problems.append(f"arXiv id {eprint} appears in more than one entry: {where}")
    if problems:
        raise MergeError("\n".join(problems))


def merge(parts_dir: Path = PARTS_DIR) -> tuple[str, str, list[str]]:
    """Return (references.bib text, catalog.yaml text, warnings)."""
    bib_parts = sorted(parts_dir.glob("*.bib"))
    catalog_parts = sorted(parts_dir.glob("*.yaml"))
    if not bib_parts and not catalog_parts:
        raise MergeError(
            f"no parts under {parts_dir}: nothing to merge. bib/references.bib and bib/catalog.yaml are "
            "the source of truth; edit them directly."
        )
    entries = [chunk for path in bib_parts for chunk in split_bib(path)]
    records = [chunk for path in catalog_parts for chunk in split_catalog(path)]
    refuse_duplicates(entries, "BibTeX")
    refuse_duplicates(records, "catalog")

    order = family_order()
    families = {record.key: record_family(record) for record in records}
    unknown = sorted({f for f in families.values() if f not in order})
    if unknown:
        raise MergeError(f"unknown family value(s) {unknown}; allowed: {', '.join(order)}")

    def sort_key(chunk: Chunk) -> tuple[int, str]:
        # Entries without a catalog record sort last; the checks in tests/ report them.
        return (order.get(families.get(chunk.key, ""), len(order)), chunk.key)

    warnings = [
        f"{c.source.name}:{c.line}: BibTeX entry '{c.key}' has no catalog record"
        for c in entries
        if c.key not in families
    ]
    bib_keys = {c.key for c in entries}
    warnings += [
        f"{c.source.name}:{c.line}: catalog record '{c.key}' has no BibTeX entry"
        for c in records
        if c.key not in bib_keys
    ]
    bib_text = BIB_HEADER + "".join("\n" + c.text for c in sorted(entries, key=sort_key))
    catalog_text = CATALOG_HEADER + "".join("\n" + c.text for c in sorted(records, key=sort_key))
    return bib_text, catalog_text, warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="report problems without writing")
    parser.add_argument("--parts", type=Path, default=PARTS_DIR, help="directory of the parts")
    parser.add_argument("--out", type=Path, default=BIB_DIR, help="where to write the two files")
    args = parser.parse_args(argv)
    try:
        bib_text, catalog_text, warnings = merge(args.parts)
    except MergeError as error:
        print(f"merge_parts: error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"merge_parts: warning: {warning}", file=sys.stderr)
    counts = Counter(line.split("{", 1)[0].lower() for line in bib_text.splitlines() if line.startswith("@"))
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    if args.check:
        print(f"merge_parts: {summary} would be written (--check: nothing written)")
        return 0
    (args.out / "references.bib").write_text(bib_text, encoding="utf-8")
    (args.out / "catalog.yaml").write_text(catalog_text, encoding="utf-8")
    print(f"merge_parts: wrote {args.out / 'references.bib'} ({summary}) and {args.out / 'catalog.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
