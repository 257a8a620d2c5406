"""Atomic writes: a failed writer leaves neither a partial file nor a damaged older version."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pathopeft.files import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    host_name,
    remove_stale_partials,
)


def test_success_renames_into_place(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_failure_keeps_old_version_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    target.write_text("complete old version")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "complete old version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_partial_name_never_matches_the_extension(tmp_path: Path) -> None:
    target = tmp_path / "slide.h5"
    with atomic_path(target) as tmp:
        assert not tmp.name.endswith(".h5")
        assert tmp.name.startswith(".")
        tmp.write_bytes(b"x")
    assert list(tmp_path.glob("*.h5")) == [target]


def test_remove_stale_partials(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is certainly gone: only a gone writer's partial file is stale
    stale = tmp_path / "a" / f".x.h5.partial-{host_name()}-{dead.pid}-abcd"
    stale.write_bytes(b"x")
    keep = tmp_path / "a" / "x.h5"
    keep.write_bytes(b"y")
    assert remove_stale_partials(tmp_path) == 1
    assert not stale.exists() and keep.exists()


def test_json_nan_becomes_null(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    atomic_write_json(path, {"auc": math.nan, "acc": 0.5, "items": [math.inf]})
    assert json.loads(path.read_text()) == {"auc": None, "acc": 0.5, "items": [None]}
