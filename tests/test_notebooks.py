"""The analysis notebooks run top to bottom, headless (nbclient, the venv's "python3" kernel), without error.

They run at their "smoke" scale (TOPKLAB_NOTEBOOK_SCALE): the same cells on fewer samples and indexers, writing
into a temporary results folder (TOPKLAB_RESULTS) that the three share, as they would share results/.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_indexer_recall", "02_fidelity_vs_accuracy", "03_entropy")


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook-results")


def load(name: str):
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean(name):
    nb = load(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert nb.cells[0].cell_type == "markdown"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, results_dir, monkeypatch):
    monkeypatch.setenv("TOPKLAB_RESULTS", str(results_dir))
    monkeypatch.setenv("TOPKLAB_NOTEBOOK_SCALE", "smoke")
    nb = load(name)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    setup = "".join(out.get("text", "") for out in nb.cells[1].outputs)
    assert f"topklab from {ROOT / 'topklab'}" in setup
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    assert len(images) >= 2
