"""The README's Python example runs as written (offline, small sizes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_adapter_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        # our own README's example, executed like a doctest
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "adapter_out" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_out" / "adapter_model.safetensors").is_file()
