"""The catalog: vocabulary, one-to-one match with the bibliography, linked files, taxonomy cells, and the
validator's messages on broken catalogs."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from reference_impls.knowledge.bibliography import DataError
from reference_impls.knowledge.catalog import MAIN_MODALITIES, load_catalog, load_vocabulary

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


# ---------------------------------------------------------------------------------------------------
# The real catalog


def test_every_value_is_in_the_vocabulary(catalog) -> None:
    vocabulary = load_vocabulary()
    for entry in catalog:
        assert entry.family in vocabulary.families, entry.key
        assert entry.modality in vocabulary.modalities, entry.key
        assert entry.generator in vocabulary.generators, entry.key
        assert entry.feedback and set(entry.feedback) <= set(vocabulary.feedback), entry.key
        assert entry.name and entry.mechanism and entry.verified, entry.key


def test_catalog_and_bibliography_match_one_to_one(catalog) -> None:
    assert sorted(catalog.keys) == sorted(catalog.bibliography.keys)


def test_linked_files_exist_and_code_is_https(catalog) -> None:
    for entry in catalog:
        for target in (entry.implementation, entry.notebook):
            if target:
                assert (REPO_ROOT / target).is_file(), f"{entry.key}: {target}"
        if entry.code:
            assert entry.code.startswith("https://"), entry.key


def test_every_method_family_and_modality_cell_counts(catalog) -> None:
    matrix = catalog.matrix()
    methods = catalog.methods()
    families = catalog.vocabulary.method_families
    modalities = catalog.matrix_modalities()
    # Every cell exists, each method sits in exactly one cell, and the cells add up to the methods.
    assert set(matrix) == {(f, m) for f in families for m in modalities}
    placed = [entry.key for cell in matrix.values() for entry in cell]
    assert sorted(placed) == sorted(entry.key for entry in methods)
    counts = {cell: len(entries) for cell, entries in matrix.items()}
    for family in families:
        assert sum(counts[(family, m)] for m in modalities) == len(catalog.methods(family)) > 0, family
    for modality in MAIN_MODALITIES:
        assert sum(counts[(f, modality)] for f in families) > 0, f"no method for {modality}"


def test_helpers(catalog) -> None:
    methods = catalog.methods()
    assert all(catalog.is_method(entry) for entry in methods)
    background = [entry for entry in catalog if not catalog.is_method(entry)]
    assert len(methods) + len(background) == len(catalog)
    assert all(entry.implemented for entry in catalog.implemented())
    assert catalog.select(family="dpo") == [entry for entry in catalog if entry.family == "dpo"]
    order = [(not e.implemented, e.year or 0) for e in catalog.methods("grpo")]
    assert order == sorted(order), "implemented first, then by year"
    assert all(entry.year for entry in catalog), "every entry gets its year from the bibliography"


# ---------------------------------------------------------------------------------------------------
# Broken catalogs: every error names the file, the line and the field

BIB = """\
@article{ho2020ddpm,
  title = {Denoising Diffusion Probabilistic Models},
  author = {Ho, Jonathan and Jain, Ajay and Abbeel, Pieter},
  journal = {arXiv preprint arXiv:2006.11239},
  year = {2020},
  eprint = {2006.11239},
  archivePrefix = {arXiv},
}

@inproceedings{black2023ddpo,
  title = {Training Diffusion Models with Reinforcement Learning},
  author = {Black, Kevin},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2024},
  eprint = {2305.13301},
  archivePrefix = {arXiv},
}
"""

CATALOG = """\
ho2020ddpm:
  name: DDPM
  family: backbone
  modality: image
  generator: diffusion
  feedback: [none]
  mechanism: A denoising diffusion model.
  verified: arXiv abs page
black2023ddpo:
  name: DDPO
  family: policy-gradient
  modality: image
  generator: diffusion
  feedback: [learned-reward-model, verifiable-rule]
  mechanism: >-
    Treats denoising as an MDP.
  code: https://github.com/kvablack/ddpo-pytorch
  implementation: reference_impls/algorithms/ddpo.py
  verified: arXiv abs page
"""


@pytest.fixture
def mini_repo(tmp_path: Path) -> Path:
    """A repository with the real vocabulary, two entries, and the implementation file they link."""
    (tmp_path / "bib").mkdir()
    shutil.copy(REPO_ROOT / "bib" / "vocabulary.yaml", tmp_path / "bib" / "vocabulary.yaml")
    (tmp_path / "bib" / "references.bib").write_text(BIB, encoding="utf-8")
    (tmp_path / "bib" / "catalog.yaml").write_text(CATALOG, encoding="utf-8")
    (tmp_path / "reference_impls" / "algorithms").mkdir(parents=True)
    (tmp_path / "reference_impls" / "algorithms" / "ddpo.py").write_text("", encoding="utf-8")
    return tmp_path


def load_mini(root: Path):
    return load_catalog(
        root / "bib" / "catalog.yaml",
        root / "bib" / "references.bib",
        root / "bib" / "vocabulary.yaml",
        root=root,
    )


def catalog_problems(root: Path, catalog_text: str) -> list[str]:
    (root / "bib" / "catalog.yaml").write_text(textwrap.dedent(catalog_text), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_mini(root)
    return [str(problem) for problem in caught.value.problems]


def test_mini_repo_loads(mini_repo: Path) -> None:
    catalog = load_mini(mini_repo)
    assert catalog.keys == ["black2023ddpo", "ho2020ddpm"]  # vocabulary family order, then key
    assert catalog.is_method("black2023ddpo") and not catalog.is_method("ho2020ddpm")
    assert [e.key for e in catalog.implemented()] == ["black2023ddpo"]
    assert catalog["black2023ddpo"].year == 2024


def test_unknown_family_names_line_field_and_suggestion(mini_repo: Path) -> None:
    path = mini_repo / "bib" / "catalog.yaml"
    [problem] = catalog_problems(
        mini_repo, CATALOG.replace("family: policy-gradient", "family: policy-gradiant")
    )
    assert problem.startswith(f"{path}:11: black2023ddpo: field 'family'")
    assert "Did you mean policy-gradient?" in problem
    assert "Allowed: policy-gradient, reward-backprop" in problem


def test_bad_feedback_modality_generator(mini_repo: Path) -> None:
    text = CATALOG.replace(
        "feedback: [learned-reward-model, verifiable-rule]", "feedback: learned-reward-model"
    ).replace(
        "modality: image\n  generator: diffusion\n  feedback: [none]",
        "modality: pictures\n  generator: difusion\n  feedback: [nothing]",
    )
    problems = catalog_problems(mini_repo, text)
    assert any(":14: black2023ddpo: field 'feedback'" in p and "must be a list" in p for p in problems)
    assert any(":4: ho2020ddpm: field 'modality'" in p for p in problems)
    assert any(":5: ho2020ddpm: field 'generator'" in p and "diffusion" in p for p in problems)
    assert any(":6: ho2020ddpm: field 'feedback'" in p for p in problems)


def test_missing_required_and_unknown_field(mini_repo: Path) -> None:
    text = CATALOG.replace(
        "  verified: arXiv abs page\nblack2023ddpo", "  verfied: arXiv abs page\nblack2023ddpo"
    )
    problems = catalog_problems(mini_repo, text)
    assert any(":8: ho2020ddpm: field 'verfied'" in p and "did you mean verified" in p for p in problems)
    assert any(":1: ho2020ddpm: field 'verified'" in p and "required" in p for p in problems)


def test_linked_paths_must_exist_and_code_must_be_https(mini_repo: Path) -> None:
    text = CATALOG.replace("ddpo.py", "ddpo_missing.py").replace("https://github.com", "http://github.com")
    text += "  notebook: notebooks/ddpo.ipynb\n"
    problems = catalog_problems(mini_repo, text)
    assert any(":18: black2023ddpo: field 'implementation'" in p and "does not exist" in p for p in problems)
    assert any(":20: black2023ddpo: field 'notebook'" in p for p in problems)
    assert any(":17: black2023ddpo: field 'code'" in p and "https" in p for p in problems)


def test_keys_must_match_the_bibliography(mini_repo: Path) -> None:
    problems = catalog_problems(mini_repo, CATALOG.replace("black2023ddpo:", "black2023ddop:"))
    catalog_path = mini_repo / "bib" / "catalog.yaml"
    bib_path = mini_repo / "bib" / "references.bib"
    assert any(
        p.startswith(f"{catalog_path}:9: black2023ddop") and "did you mean black2023ddpo" in p
        for p in problems
    )
    assert any(
        p.startswith(f"{bib_path}:10: black2023ddpo") and "no record in catalog.yaml" in p for p in problems
    )


def test_duplicate_record_and_yaml_syntax(mini_repo: Path) -> None:
    problems = catalog_problems(mini_repo, CATALOG + CATALOG.split("black2023ddpo:")[0])
    assert any(":20: ho2020ddpm" in p and "given twice (first at line 1)" in p for p in problems)
    problems = catalog_problems(mini_repo, CATALOG.replace("name: DDPO", "name: [DDPO"))
    assert (
        len(problems) == 1
        and "not valid YAML" in problems[0]
        and str(mini_repo / "bib" / "catalog.yaml") in problems[0]
    )


def test_every_implemented_method_is_catalogued_with_its_code_and_notebook():
    from reference_impls.algorithms import METHODS
    from reference_impls.knowledge.catalog import load_catalog

    catalog = load_catalog()
    entries = catalog.entries if isinstance(catalog.entries, dict) else {e.key: e for e in catalog.entries}
    for name, cls in METHODS.items():
        entry = entries[cls.bib_key]
        assert entry.implementation, f"{name}: catalog row {cls.bib_key} has no implementation"
        assert entry.notebook, f"{name}: catalog row {cls.bib_key} has no notebook"
