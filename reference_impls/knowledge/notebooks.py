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
from typing import TYPE_CHECKING

import nbformat

from reference_impls.knowledge.paths import executed_notebooks_dir, notebooks_dir, repo_root

if TYPE_CHECKING:
    from reference_impls.knowledge.catalog import CatalogEntry

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
    # One torch thread in the kernel unless the caller chose: the notebooks' models are tiny, and a kernel
    # with a thread per core beside other work (a test worker, another notebook) ran the denoising-MDP
    # notebook in 37 s instead of 15 s on 2 shared cores.
    threads_chosen = "OMP_NUM_THREADS" in os.environ
    os.environ.setdefault("OMP_NUM_THREADS", "1")
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
        if not threads_chosen:
            os.environ.pop("OMP_NUM_THREADS", None)
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


def clean_for_page(notebook: nbformat.NotebookNode, hidden_prefixes: tuple[str, ...]) -> list[str]:
    """Make an executed notebook fit to read as a page; returns the alt text of each image output, in order.

    Drops papermill's injected-parameters cell (the page's banner states the parameters) and every stderr
    stream (progress bars, which tqdm writes as one paragraph per refresh, and warnings that print the
    build machine's paths); removes any remaining machine path from text outputs.
    """
    notebook.cells = [c for c in notebook.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    alts: list[str] = []
    figure = 0
    heading = ""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            titles = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            heading = titles[-1] if titles else heading
        if cell.cell_type != "code":
            continue
        cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        comment = next((line.lstrip("# ").strip() for line in cell.source.splitlines()
                        if line.startswith("#") and line.lstrip("# ").strip()), "")
        for output in cell.outputs:
            if output.get("output_type") == "stream":
                output["text"] = _without_paths(output.get("text", ""), hidden_prefixes)
            for kind in ("text/plain", "text/html"):
                if kind in output.get("data", {}):
                    output["data"][kind] = _without_paths(output["data"][kind], hidden_prefixes)
            if "image/png" in output.get("data", {}):
                figure += 1
                alts.append(f"Figure {figure}: {comment or heading or 'output of the notebook'}")
    return alts


def _without_paths(text: str | list[str], prefixes: tuple[str, ...]) -> str:
    joined = "".join(text) if isinstance(text, list) else text
    for prefix in prefixes:
        joined = joined.replace(prefix.rstrip("/") + "/", "").replace(prefix, "")
    return joined


def _with_alt_texts(body: str, alts: list[str]) -> str:
    """nbconvert writes every figure as ``![png](...)``; give each its own description instead."""
    pieces = body.split("![png](")
    out = [pieces[0]]
    for index, piece in enumerate(pieces[1:]):
        alt = alts[index] if index < len(alts) else "Figure"
        out.append(f"![{alt.replace(']', ')')}](" + piece)
    return "".join(out)


def page_links(name: str, method: CatalogEntry | None) -> str:
    """One line linking the method page, the implementation and the notebook file itself."""
    from reference_impls.knowledge.sitegen import code_link

    links = [f"[:material-download: {name}.ipynb]({name}.ipynb){{ download }}"]
    if method:
        links.insert(0, f"[Method page: {method.name}](../methods/{method.key}.md)")
        if method.implementation:
            links.insert(1, f"[Code: `{method.implementation}`]({code_link(method, '../')})")
    return " · ".join(links) + "\n\n"


def render_page(source: Path, docs_notebooks: Path, executed_dir: Path | None = None,
                method: CatalogEntry | None = None) -> tuple[str, str]:
    """Write ``docs_notebooks/<name>.md`` from the executed copy (or the source, saying so).

    The page opens with the notebook's title, then the build note and links to the method page, the
    implementation and the ``.ipynb`` (copied next to the page for download). Returns (title, page path
    relative to the docs directory).
    """
    from nbconvert import MarkdownExporter

    executed_dir = executed_dir or executed_notebooks_dir()
    executed = executed_dir / source.name
    is_executed = executed.exists() and executed.stat().st_mtime >= source.stat().st_mtime
    notebook = nbformat.read(executed if is_executed else source, as_version=4)
    name = source.stem
    title = notebook_title(notebook, name.replace("_", " ").replace("-", " ").capitalize())
    alts = clean_for_page(notebook, machine_paths())
    body, resources = MarkdownExporter().from_notebook_node(
        notebook, resources={"output_files_dir": f"{name}_files"}
    )
    body = _with_alt_texts(body, alts)
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
            f"`make lab` (then open `notebooks/{source.name}`), or with full settings: "
            f"`python -m reference_impls.knowledge.notebooks --full {name}`.\n\n"
        )
    else:
        banner = (
            '!!! warning "Not executed"\n    No executed copy was found when this site was built, so the '
            "page shows the notebook without outputs. `make site` executes every notebook first.\n\n"
        )
    header = banner + page_links(name, method)
    # The title comes first; the note and the links go right under it.
    heading = f"# {title}\n"
    if body.lstrip().startswith("# "):
        first, _, rest = body.lstrip().partition("\n")
        page = first + "\n\n" + header + rest
    else:
        page = heading + "\n" + header + body
    docs_notebooks.mkdir(parents=True, exist_ok=True)
    (docs_notebooks / f"{name}.md").write_text(page, encoding="utf-8")
    shutil.copyfile(source, docs_notebooks / source.name)  # the committed notebook, outputs cleared
    return title, f"notebooks/{name}.md"


def machine_paths() -> tuple[str, ...]:
    """Paths of this build machine that must not appear on a page (longest first)."""
    import site

    paths = {str(repo_root()), sys.prefix, sys.base_prefix, str(Path.home()), *site.getsitepackages()}
    return tuple(sorted((p for p in paths if p and p != "/"), key=len, reverse=True))


def notebook_methods(root: Path | None = None) -> dict[str, CatalogEntry]:
    """Notebook file name -> the catalog method it demonstrates."""
    from reference_impls.knowledge.catalog import load_catalog

    catalog = load_catalog(root=root or repo_root())
    return {Path(entry.notebook).name: entry for entry in catalog.methods() if entry.notebook}


def index_page(entries: list[tuple[str, str, CatalogEntry | None]]) -> str:
    """The Notebooks section's index: every notebook with its method page."""
    out = ["# Notebooks\n",
           "Every notebook runs a method end to end on ShapeWorld: it trains in the smoke setting (seconds, "
           "executed when this site was built) and then shows the committed full-run results (the Results "
           "page's measurements). Open them yourself with `make lab`.\n",
           "| Notebook | Method | Download |", "|---|---|---|"]
    for title, page, method in entries:
        name = Path(page).stem
        method_cell = f"[{method.name}](../methods/{method.key}.md)" if method else "-"
        out.append(f"| [{title}]({name}.md) | {method_cell} | [{name}.ipynb]({name}.ipynb){{ download }} |")
    return "\n".join(out) + "\n"


def render_all(docs_dir: Path) -> list:
    """Render every notebook as a page plus the section index; returns mkdocs nav entries."""
    target = docs_dir / "notebooks"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    methods = notebook_methods()
    rendered = []
    for source in discover():
        method = methods.get(source.name)
        title, page = render_page(source, target, method=method)
        rendered.append((title, page, method))
    (target / "index.md").write_text(index_page(rendered), encoding="utf-8")
    return ["notebooks/index.md", *({title: page} for title, page, _ in rendered)]


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
