"""Every notebook under notebooks/ runs top to bottom (code cells executed in order, in-process)."""

import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(path))
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
    assert cells
    env: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), path, "exec"), env)
