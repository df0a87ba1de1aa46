"""Every notebook in notebooks/ executes top to bottom on CPU (nbclient, a fresh python3 kernel, cwd notebooks/),
and is committed without outputs, so none can rot or carry stale numbers. The notebooks assert their own key
numbers against the paper (e.g. 671B / 37B, 35,136 KV elements per token) and closed forms."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_notebooks_exist():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"architecture_tour.ipynb", "load_balancing.ipynb", "scaling.ipynb", "fp8_numerics.ipynb",
            "decoding.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path} cell {i} has stale outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    env_ok = os.environ.get("JAX_PLATFORMS")  # conftest sets cpu; the kernel inherits the environment
    assert env_ok
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
