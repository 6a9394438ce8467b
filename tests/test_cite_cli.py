"""``rlvg cite`` and ``rlvg catalog``: formats, subset export, and exit code 2 with helpful messages."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bibtexparser
import pytest

from reference_impls.cli import main
from reference_impls.knowledge import cite
from reference_impls.knowledge.bibliography import parse_bibliography, unwrap
from reference_impls.knowledge.catalog import load_catalog

REPO_ROOT = Path(__file__).resolve().parents[1]
RLVG = Path(sys.executable).parent / "rlvg"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def arxiv_method(catalog):
    """A method entry with an arXiv id (the formats are checked on it)."""
    return next(e for e in catalog.methods() if catalog.bibliography[e.key].eprint)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_bibtex(text: str) -> bibtexparser.Library:
    logging.getLogger("bibtexparser").setLevel(logging.ERROR)
    library = bibtexparser.parse_string(text)
    assert not library.failed_blocks
    return library


# ---------------------------------------------------------------------------------------------------
# rlvg cite


def test_cite_bibtex_round_trips(capsys, catalog, arxiv_method) -> None:
    code, out, _ = run(capsys, "cite", arxiv_method.key)
    assert code == 0
    [entry] = parse_bibtex(out).entries
    original = catalog.bibliography[arxiv_method.key]
    assert entry.key == original.key
    assert {f.key.lower(): " ".join(f.value.split()) for f in entry.fields} == original.fields


def test_every_entry_normalises_to_the_same_fields(catalog, tmp_path: Path) -> None:
    text = cite.bibtex_file(catalog.bibliography)
    path = tmp_path / "all.bib"
    path.write_text(text, encoding="utf-8")
    reparsed, problems = parse_bibliography(path)
    assert problems == []
    for entry in catalog.bibliography:
        assert reparsed[entry.key].fields == entry.fields, entry.key
        assert reparsed[entry.key].entry_type == entry.entry_type


def test_cite_text_and_markdown(capsys, catalog, arxiv_method) -> None:
    bib = catalog.bibliography[arxiv_method.key]
    code, out, _ = run(capsys, "cite", arxiv_method.key, "--format", "text")
    assert code == 0
    line = out.strip()
    assert line.endswith(f"arXiv:{bib.eprint}.")
    assert f"{bib.get('year')}." in line
    assert "{" not in line and "}" not in line
    code, out, _ = run(capsys, "cite", arxiv_method.key, "--format", "markdown")
    assert code == 0
    assert f"[arXiv:{bib.eprint}](https://arxiv.org/abs/{bib.eprint})" in out
    assert "*" in out  # the title in italics


def test_cite_several_keys_in_order(capsys, catalog) -> None:
    keys = catalog.keys[:3]
    code, out, _ = run(capsys, "cite", *reversed(keys))
    assert code == 0
    assert [e.key for e in parse_bibtex(out).entries] == list(reversed(keys))


def test_family_export_to_file_parses_back(capsys, catalog, tmp_path: Path) -> None:
    out_file = tmp_path / "exports" / "dpo.bib"
    code, out, err = run(capsys, "cite", "--family", "dpo", "--out", str(out_file))
    assert code == 0 and out == ""
    expected = {e.key for e in catalog.select(family="dpo")}
    assert f"wrote {len(expected)} entries" in err
    library = parse_bibtex(out_file.read_text(encoding="utf-8"))
    assert {e.key for e in library.entries} == expected


def test_family_and_modality_subset_to_stdout(capsys, catalog) -> None:
    code, out, _ = run(capsys, "cite", "--family", "grpo", "--modality", "video")
    assert code == 0
    expected = {e.key for e in catalog.select("grpo", "video")}
    assert {e.key for e in parse_bibtex(out).entries} == expected


def test_unknown_key_exits_2_with_a_suggestion(capsys, arxiv_method) -> None:
    typo = arxiv_method.key[:-1]
    code, out, err = run(capsys, "cite", typo)
    assert code == 2 and out == ""
    assert f"unknown key '{typo}'" in err
    assert f"Did you mean {arxiv_method.key}" in err or arxiv_method.key in err


def test_unknown_family_exits_2_listing_allowed_values(capsys, catalog) -> None:
    code, _, err = run(capsys, "cite", "--family", "ppo")
    assert code == 2
    assert "unknown family 'ppo'" in err
    assert "Allowed values: " + ", ".join(catalog.vocabulary.families) in err
    code, _, err = run(capsys, "catalog", "--modality", "3d")
    assert code == 2 and "3d-4d" in err


def test_cite_without_keys_or_filters_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys, "cite")
    assert code == 2 and "at least one KEY" in err


def test_malformed_data_exits_2_with_file_line_field(capsys, monkeypatch, tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "bib", tmp_path / "bib", ignore=shutil.ignore_patterns("parts", "*.py"))
    bib = tmp_path / "bib" / "references.bib"
    text = bib.read_text(encoding="utf-8")
    first_eprint = text.index("eprint = {")
    bib.write_text(
        text[:first_eprint] + "eprint = {1234.5v2}" + text[text.index("}", first_eprint) + 1 :],
        encoding="utf-8",
    )
    line = text[:first_eprint].count("\n") + 1
    monkeypatch.setenv("RLVG_REPO_ROOT", str(tmp_path))
    code, _, err = run(capsys, "catalog")
    assert code == 2
    assert f"{bib}:{line}:" in err and "field 'eprint'" in err


# ---------------------------------------------------------------------------------------------------
# rlvg catalog


def test_catalog_table(capsys, catalog) -> None:
    code, out, _ = run(capsys, "catalog", "--family", "grpo")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["key", "name", "family", "modality", "generator", "year", "implemented"]
    assert set(lines[1]) <= {"-", " "}
    rows = lines[2:-1]
    assert len(rows) == len(catalog.select("grpo")) and lines[-1].endswith("entries")
    # Aligned: every column starts where its header starts.
    start = lines[0].index("family")
    assert all(row[start:].startswith("grpo") for row in rows)


def test_catalog_json_csv_and_implemented(capsys, catalog) -> None:
    code, out, _ = run(capsys, "catalog", "--format", "json", "--modality", "video")
    assert code == 0
    records = json.loads(out)
    assert {r["key"] for r in records} == {e.key for e in catalog.select(modality="video")}
    assert all(isinstance(r["feedback"], list) and r["year"] for r in records)
    code, out, _ = run(capsys, "catalog", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(catalog) and rows[0]["implemented"] in ("yes", "no")
    code, out, _ = run(capsys, "catalog", "--implemented", "--format", "json")
    assert code == 0
    assert {r["key"] for r in json.loads(out)} == {e.key for e in catalog.implemented()}


# ---------------------------------------------------------------------------------------------------
# The installed command


@pytest.mark.skipif(not RLVG.exists(), reason=f"{RLVG} not installed (pip install -e .)")
def test_installed_rlvg_command(arxiv_method, tmp_path: Path) -> None:
    env = {**os.environ, "RLVG_REPO_ROOT": str(REPO_ROOT)}
    result = subprocess.run(
        [str(RLVG), "cite", arxiv_method.key, "--format", "text"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert arxiv_method.key not in result.stdout and "arXiv:" in result.stdout
    result = subprocess.run(
        [str(RLVG), "catalog", "--family", "nope"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert "Allowed values: policy-gradient" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [str(RLVG), "cite", "--family", "reward-backprop", "--out", str(tmp_path / "rb.bib")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert parse_bibtex((tmp_path / "rb.bib").read_text(encoding="utf-8")).entries


# ---------------------------------------------------------------------------------------------------
# Formatting units


def test_author_names_and_et_al(tmp_path: Path) -> None:
    path = tmp_path / "x.bib"
    path.write_text(
        '@article{muller2020x,\n  title = {A {GAN} for {\\"O}zg{\\"u}r?},\n'
        '  author = {M{\\"u}ller, Jean-Pierre and Ng, Andrew Y. and {DeepSeek-AI} and Doe, J. and others},\n'
        "  journal = {Nature},\n  year = {2020},\n  doi = {10.1/x},\n}\n",
        encoding="utf-8",
    )
    bibliography, problems = parse_bibliography(path)
    assert problems == []
    entry = bibliography["muller2020x"]
    assert (
        cite.to_text(entry)
        == "J.-P. Müller, A. Y. Ng, DeepSeek-AI, et al. A GAN for Özgür? Nature, 2020. doi:10.1/x."
    )
    assert cite.to_markdown(entry).startswith(
        "J.-P. Müller, A. Y. Ng, DeepSeek-AI, et al. *A GAN for Özgür?* Nature"
    )
    assert unwrap("{a {b} c}") == "a {b} c" and unwrap("{a} b = {c}") is None
