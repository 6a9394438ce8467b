"""``rlvg cite`` and ``rlvg catalog``: the knowledge base from the command line.

Bad input (an unknown key, family or modality) and malformed data files both raise
``reference_impls.cli.UsageError``, which ``rlvg`` prints without a traceback and exits with 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from reference_impls.knowledge import cite
from reference_impls.knowledge.bibliography import DataError, load_aliases
from reference_impls.knowledge.catalog import Catalog, CatalogEntry, load_catalog, suggest


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cite`` and ``catalog`` subcommands to the ``rlvg`` parser."""
    cite_parser = subparsers.add_parser(
        "cite",
        help="print citations (BibTeX, text, Markdown) or export a family's entries as .bib",
        description="Print the citation of one or more works by BibTeX key, or export every entry of a "
        "family and/or modality as a .bib file. Keys: `rlvg catalog`.",
        epilog="examples:\n  rlvg cite black2023ddpo\n  rlvg cite black2023ddpo --format text\n"
        "  rlvg cite --family dpo --out dpo.bib\n  rlvg cite --family grpo --modality video",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cite_parser.add_argument("keys", nargs="*", metavar="KEY", help="BibTeX keys, e.g. black2023ddpo")
    cite_parser.add_argument("--format", choices=cite.FORMATS, default="bibtex", help="default: bibtex")
    cite_parser.add_argument("--family", help="add every entry of this family (see `rlvg catalog`)")
    cite_parser.add_argument("--modality", help="add every entry of this modality (image, video, 3d-4d, ...)")
    cite_parser.add_argument(
        "--out", type=Path, metavar="FILE.bib", help="write to this file instead of stdout"
    )
    cite_parser.set_defaults(handler=run_cite)

    catalog_parser = subparsers.add_parser(
        "catalog",
        help="list the catalogued works (table, JSON or CSV)",
        description="List the works of the atlas with their family, modality and generator.",
    )
    catalog_parser.add_argument("--family", help="only this family")
    catalog_parser.add_argument("--modality", help="only this modality")
    catalog_parser.add_argument("--implemented", action="store_true", help="only works implemented here")
    catalog_parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    catalog_parser.set_defaults(handler=run_catalog)


# ---------------------------------------------------------------------------------------------------
# Shared


def _usage_error(message: str) -> Exception:
    from reference_impls.cli import UsageError  # imported here: cli imports this module

    return UsageError(message)


def _load() -> Catalog:
    try:
        return load_catalog()
    except DataError as error:
        raise _usage_error(str(error)) from error


def _check_vocabulary_value(catalog: Catalog, field_name: str, value: str | None) -> None:
    if value is None:
        return
    allowed = list(catalog.vocabulary.allowed(field_name))
    if value not in allowed:
        close = suggest(value, allowed)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise _usage_error(f"unknown {field_name} {value!r}.{hint} Allowed values: {', '.join(allowed)}")


def _resolve_aliases(keys: list[str]) -> list[str]:
    aliases = load_aliases()
    resolved = []
    for key in keys:
        if key in aliases:
            print(f"rlvg cite: {key} is now {aliases[key]} (renamed so that the key's year is the year the "
                  "work first appeared)", file=sys.stderr)
        resolved.append(aliases.get(key, key))
    return resolved


def _check_keys(catalog: Catalog, keys: list[str]) -> None:
    unknown = [key for key in keys if key not in catalog.bibliography]
    if not unknown:
        return
    lines = []
    for key in unknown:
        close = suggest(key, catalog.bibliography.keys)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        lines.append(f"unknown key {key!r}.{hint}")
    raise _usage_error(" ".join(lines) + " (`rlvg catalog` lists every key)")


def _write(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# rlvg cite


def run_cite(args: argparse.Namespace) -> int:
    catalog = _load()
    _check_vocabulary_value(catalog, "family", args.family)
    _check_vocabulary_value(catalog, "modality", args.modality)
    args.keys = _resolve_aliases(args.keys)
    _check_keys(catalog, args.keys)
    filtered = args.family is not None or args.modality is not None
    if not args.keys and not filtered:
        raise _usage_error("give at least one KEY, or --family/--modality to export a subset")
    keys = list(dict.fromkeys(args.keys))  # keep the order given, without repeats
    if filtered:
        keys += [e.key for e in catalog.select(args.family, args.modality) if e.key not in keys]
    entries = [catalog.bibliography[key] for key in keys]
    if not entries:
        print("rlvg cite: no entries match these filters", file=sys.stderr)
        return 0
    if args.format == "bibtex":
        header = None
        if filtered:
            chosen = " ".join(
                f"{flag} {value}"
                for flag, value in (("--family", args.family), ("--modality", args.modality))
                if value
            )
            header = f"Exported by `rlvg cite {chosen}` from the RL-for-visual-generation atlas ({len(entries)} entries)."
        text = cite.bibtex_file(entries, header)
    else:
        text = "\n".join(cite.format_entry(entry, args.format) for entry in entries) + "\n"
    _write(text, args.out)
    if args.out is not None:
        print(f"rlvg cite: wrote {len(entries)} entries to {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------
# rlvg catalog

TABLE_COLUMNS = ("key", "name", "family", "modality", "generator", "year", "implemented")


def _row(entry: CatalogEntry) -> dict[str, str]:
    return {
        "key": entry.key,
        "name": entry.name,
        "family": entry.family,
        "modality": entry.modality,
        "generator": entry.generator,
        "year": str(entry.year or ""),
        "implemented": "yes" if entry.implemented else "no",
    }


def _record(entry: CatalogEntry, catalog: Catalog) -> dict[str, object]:
    """Everything the catalog knows about a work, for JSON."""
    bib = catalog.bibliography[entry.key]
    return {
        "key": entry.key,
        "name": entry.name,
        "title": cite.latex_to_text(entry.title),
        "year": entry.year,
        "family": entry.family,
        "method": catalog.is_method(entry),
        "modality": entry.modality,
        "generator": entry.generator,
        "feedback": list(entry.feedback),
        "mechanism": entry.mechanism,
        "arxiv": bib.eprint,
        "code": entry.code,
        "implementation": entry.implementation,
        "notebook": entry.notebook,
    }


def format_table(rows: list[dict[str, str]], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """Columns padded to their widest cell, a rule under the header, a count at the end."""
    widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() for row in rows]
    lines.append(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}")
    return "\n".join(lines) + "\n"


def format_csv(entries: list[CatalogEntry]) -> str:
    buffer = io.StringIO()
    columns = [*TABLE_COLUMNS, "feedback", "implementation", "notebook", "code"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        extra = {
            "feedback": ";".join(entry.feedback),
            "implementation": entry.implementation or "",
            "notebook": entry.notebook or "",
            "code": entry.code or "",
        }
        writer.writerow({**_row(entry), **extra})
    return buffer.getvalue()


def run_catalog(args: argparse.Namespace) -> int:
    catalog = _load()
    _check_vocabulary_value(catalog, "family", args.family)
    _check_vocabulary_value(catalog, "modality", args.modality)
    entries = catalog.select(args.family, args.modality, implemented=args.implemented)
    if args.format == "json":
        text = json.dumps([_record(entry, catalog) for entry in entries], indent=2, ensure_ascii=False) + "\n"
    elif args.format == "csv":
        text = format_csv(entries)
    else:
        text = format_table([_row(entry) for entry in entries])
    sys.stdout.write(text)
    return 0
