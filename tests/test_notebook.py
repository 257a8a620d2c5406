"""The quickstart notebook runs from top to bottom (it is documentation users will try first)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}  # the notebook's working folder
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources)
    client.execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    run_dir = tmp_path / "quickstart_out" / "runs" / "quickstart"
    assert (run_dir / "test_metrics.json").is_file()
    assert (run_dir / "plots" / "learning_curves.png").is_file()
