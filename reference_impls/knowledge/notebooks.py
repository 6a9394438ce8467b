"""The notebook pipeline: check, execute with papermill (smoke parameters), render as site pages.

Every notebook under ``notebooks/`` has a cell tagged ``parameters`` that defines at least ``smoke``,
``device`` and ``seed``; committed notebooks carry no outputs. Executed copies go to ``build/notebooks``
and are converted to Markdown pages (with their plots) under ``docs/notebooks`` at site build time.

Command line: ``python -m reference_impls.knowledge.notebooks [--smoke|--full] [NAME ...]``.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

from reference_impls.knowledge.paths import executed_notebooks_dir, notebooks_dir

REQUIRED_PARAMETERS = ("smoke", "device", "seed")
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


@dataclass(frozen=True)
class NotebookProblem:
    """One reason a committed notebook is not acceptable, with what to do about it."""

    path: Path
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}. Fix: {self.fix}"


def discover(directory: Path | None = None) -> list[Path]:
    directory = directory or notebooks_dir()
    return sorted(p for p in directory.glob("*.ipynb") if not p.name.startswith("_"))


def parameters_cell_index(notebook: nbformat.NotebookNode) -> int | None:
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return index
    return None


def assigned_names(source: str) -> set[str]:
    """Names assigned at top level of a cell (how papermill parameters are declared)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                names.add(target.id)
    return names


def check_notebook(path: Path) -> list[NotebookProblem]:
    """Everything wrong with a committed notebook (empty list when it is fine)."""
    problems: list[NotebookProblem] = []
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:  # malformed JSON or schema
        return [NotebookProblem(path, f"cannot be read as a notebook ({error})", "re-save it from Jupyter")]
    index = parameters_cell_index(notebook)
    if index is None:
        problems.append(
            NotebookProblem(
                path,
                "has no code cell tagged 'parameters'",
                "in Jupyter, open View > Cell Toolbar > Tags and tag the cell that defines "
                f"{', '.join(REQUIRED_PARAMETERS)} with 'parameters'",
            )
        )
    else:
        missing = set(REQUIRED_PARAMETERS) - assigned_names(notebook.cells[index].source)
        if missing:
            problems.append(
                NotebookProblem(
                    path,
                    f"its parameters cell does not define {', '.join(sorted(missing))}",
                    f"assign {', '.join(REQUIRED_PARAMETERS)} in the cell tagged 'parameters'",
                )
            )
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    if dirty:
        problems.append(
            NotebookProblem(
                path,
                f"is committed with outputs or execution counts (cells {dirty[:5]})",
                f"clear them: python -m reference_impls.knowledge.notebooks --strip {path}",
            )
        )
    return problems


def strip_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.write(notebook, path)


def execute(
    path: Path,
    *,
    smoke: bool = True,
    seed: int = 0,
    device: str = "cpu",
    output_dir: Path | None = None,
    timeout_s: int = 600,
) -> Path:
    """Run one notebook with papermill; returns the executed copy's path."""
    import papermill

    output_dir = output_dir or executed_notebooks_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / path.name
    partial = output.with_suffix(".partial.ipynb")
    # The kernel inherits our environment; a machine with MPLBACKEND=Agg (common on headless hosts)
    # would swallow every figure, so the kernel is told to use the inline backend explicitly.
    previous_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    try:
        papermill.execute_notebook(
            str(path),
            str(partial),
            parameters={"smoke": smoke, "seed": seed, "device": device},
            cwd=str(path.parent.parent),  # the repository root, so relative paths match the README
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=timeout_s,
        )
    finally:
        if previous_backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = previous_backend
    partial.replace(output)  # an interrupted run never leaves a half-written page source
    return output


def notebook_title(notebook: nbformat.NotebookNode, fallback: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def render_page(source: Path, docs_notebooks: Path, executed_dir: Path | None = None) -> tuple[str, str]:
    """Write ``docs_notebooks/<name>.md`` from the executed copy (or the source, saying so).

    Returns (title, page path relative to the docs directory).
    """
    from nbconvert import MarkdownExporter

    executed_dir = executed_dir or executed_notebooks_dir()
    executed = executed_dir / source.name
    is_executed = executed.exists() and executed.stat().st_mtime >= source.stat().st_mtime
    notebook = nbformat.read(executed if is_executed else source, as_version=4)
    name = source.stem
    title = notebook_title(notebook, name.replace("_", " ").replace("-", " ").capitalize())
    body, resources = MarkdownExporter().from_notebook_node(
        notebook, resources={"output_files_dir": f"{name}_files"}
    )
    files_dir = docs_notebooks / f"{name}_files"
    if files_dir.exists():
        shutil.rmtree(files_dir)
    for relative, data in resources.get("outputs", {}).items():
        target = docs_notebooks / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    if is_executed:
        banner = (
            f'!!! info "Executed at site build time"\n    This page is `notebooks/{source.name}` run by '
            "papermill with smoke parameters (`smoke=True, device='cpu', seed=0`). Run it yourself with "
            f"`jupyter lab notebooks/{source.name}`, or with full settings: "
            f"`python -m reference_impls.knowledge.notebooks --full {name}`.\n\n"
        )
    else:
        banner = (
            '!!! warning "Not executed"\n    No executed copy was found when this site was built, so the '
            "page shows the notebook without outputs. `make site` executes every notebook first.\n\n"
        )
    docs_notebooks.mkdir(parents=True, exist_ok=True)
    (docs_notebooks / f"{name}.md").write_text(banner + body, encoding="utf-8")
    return title, f"notebooks/{name}.md"


def render_all(docs_dir: Path) -> list[dict[str, str]]:
    """Render every notebook as a page; returns mkdocs nav entries."""
    target = docs_dir / "notebooks"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    entries = []
    for source in discover():
        title, page = render_page(source, target)
        entries.append({title: page})
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", default=True, help="smoke parameters (default)")
    mode.add_argument("--full", action="store_true", help="full settings (minutes per notebook)")
    mode.add_argument("--check", action="store_true", help="only check committed notebooks")
    mode.add_argument("--strip", nargs="+", type=Path, metavar="NOTEBOOK", help="clear outputs in place")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = parser.parse_args(argv)
    if args.strip:
        for path in args.strip:
            strip_outputs(path)
        return 0
    notebooks = discover()
    if args.names:
        known = {p.stem: p for p in notebooks}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            print(f"unknown notebook(s) {unknown}; valid names: {sorted(known)}", file=sys.stderr)
            return 2
        notebooks = [known[n] for n in args.names]
    problems = [p for path in notebooks for p in check_notebook(path)]
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    if args.check:
        return 0
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None  # type: ignore[assignment]
    iterator = tqdm(notebooks, desc="notebooks", unit="nb") if tqdm else notebooks
    for path in iterator:
        start = time.perf_counter()
        execute(path, smoke=not args.full, seed=args.seed, device=args.device)
        print(f"executed {path.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
