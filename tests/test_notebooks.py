"""Every notebook under notebooks/ runs top to bottom through a real Jupyter kernel (``nbclient`` +
``ipykernel``, as Jupyter and Colab run it: magics, inline figures, one process per notebook), with
notebooks/ as its working directory; any cell error fails the test. The committed files must carry
no outputs or execution counts (clear them before committing: Jupyter's "Clear All Outputs")."""

import glob
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NB_DIR, "*.ipynb")))
CELL_TIMEOUT_S = 600

# appended to the executed copy only: which interpreter and environment the kernel runs
_WHICH_PYTHON = "import sys; print(sys.executable); print(sys.prefix)"


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NB_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_outputs_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{os.path.basename(path)}: cells {dirty} carry outputs or execution counts; strip them"
    assert nb.cells and nb.cells[0].cell_type == "markdown", "the first cell should be the title (markdown)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    # the kernel named "python3" must be this environment's ipykernel: put this prefix's kernel
    # specs first (JUPYTER_PATH wins over user and system ones); jupyter_client starts a spec whose
    # argv[0] is "python" with sys.executable
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [os.path.join(sys.prefix, "share", "jupyter")] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]))
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_WHICH_PYTHON))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": NB_DIR}})
    try:
        client.execute()
    except CellExecutionError as e:   # the message holds the cell and its traceback
        pytest.fail(f"{os.path.basename(path)}: a cell failed\n{e}", pytrace=False)
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream").split()
    # the same environment (a venv's python is often a symlink to the base one: compare prefixes too)
    assert out == [sys.executable, sys.prefix], f"the kernel ran {out}, not {[sys.executable, sys.prefix]}"
