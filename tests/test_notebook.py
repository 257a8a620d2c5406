"""The quickstart notebook runs from top to bottom on a demo folder (documentation users try first)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests._demo_cohort import tiny_demo

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes_on_the_demo(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = tiny_demo(tmp_path_factory)
    monkeypatch.setenv("PATHOPEFT_DEMO", str(demo))  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [
        o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(figures) == 4  # slide + heatmap, result matrix, learning curves, segmentation
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "backward transfer" in text and "segmentation test metrics" in text
    assert not (tmp_path / "demo").exists()  # it used the given demo, it did not run a new one
