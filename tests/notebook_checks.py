"""What a headless (papermill) run of a notebook must leave behind, shared by the standalone
notebook runs (tests/test_notebooks.py) and the smoke studies (tests/test_repro.py)."""

from pathlib import Path

import nbformat

#: Cell tags of the teaching part that closes every notebook.
TEACHING_TAGS = ("summary", "question", "answer", "try-this")


def tagged(nb, tag: str) -> list:
    """The cells of ``nb`` carrying ``tag``."""
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def assert_ran_headless(executed: Path, out_dir: Path) -> None:
    """The executed notebook ``executed`` saved a figure in ``out_dir``, and its "try this", question
    and answer code cells ran without an error."""
    assert list(Path(out_dir).glob("*.png")), f"{executed.name}: the notebook saved no figure"
    nb = nbformat.read(str(executed), as_version=4)
    for tag in ("try-this", "question", "answer"):
        for cell in tagged(nb, tag):
            if cell.cell_type == "code":
                assert cell.execution_count is not None, f"{executed.name}: a {tag} cell did not run"
                assert not [o for o in cell.outputs if o.output_type == "error"], f"{executed.name}: a {tag} cell failed"
