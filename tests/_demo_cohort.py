"""One tiny ``pathopeft demo`` folder shared by the demo, README and notebook tests.

The demo resumes (finished stages are skipped), so every test module can ask for it: the first
one runs it, the others only read it. Under pytest-xdist the folder sits next to the workers'
temporary folders and a file lock makes the second worker wait instead of running it again.
Readers must not write into it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

from pathopeft.demo import DemoSettings, run_demo

# Small enough for a CI machine: 6 slides of 1536² px per task, 1 epoch, 8 segmentation images.
TINY = DemoSettings(seed=3, n_slides=6, size=1536, epochs=1, backbone="resnet18", seg_images=8, seg_epochs=1)


def shared_root(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def tiny_demo(factory: pytest.TempPathFactory, lines: list[str] | None = None) -> Path:
    """The shared tiny demo folder (run on first use); ``lines`` collects what the demo printed."""
    root = shared_root(factory)
    out = root / "tiny_demo"
    with FileLock(str(root / "tiny_demo.lock")):
        run_demo(out, TINY, echo=(lines.append if lines is not None else lambda _line: None))
    return out
