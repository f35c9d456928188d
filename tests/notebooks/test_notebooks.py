"""Every notebook runs top to bottom on CPU at tiny sizes, so none can silently rot.

The kernel is a fresh process: it gets 8 host CPU devices through XLA_FLAGS (the
same sharding as the rest of the suite) and APOLLO_NOTEBOOK_TINY=1, which each
notebook reads to shrink its sizes. Outputs must be stripped in the repository.
"""

import os
import pathlib

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  monkeypatch.setenv("APOLLO_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("APOLLO_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_env):
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # raises CellExecutionError naming the cell on any failure
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not any(o.get("output_type") == "error" for o in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_outputs_are_stripped(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs"
