"""``pathopeft demo``: every stage through the real commands, same seed same table, reruns skip.

Also the two ``synth`` options the demo needs: ``--lesion`` (a second lesion look) and
``--classes`` (a second task's class names).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from click.testing import CliRunner

from pathopeft.cli import main
from pathopeft.config.wsi import SynthConfig
from pathopeft.demo import DemoError, DemoSettings, run_demo
from pathopeft.demo.run import STAGES
from pathopeft.wsi.synth import make_synthetic_cohort
from tests._demo_cohort import TINY, tiny_demo

# --- synth: lesion looks and class names ------------------------------------------------------------


def _lesion_pixels(root: Path, lesion: str) -> tuple[np.ndarray, np.ndarray]:
    cfg = SynthConfig(n=1, width=1024, height=1024, lesion_fraction=1.0, lesion=lesion, seed=5)
    (info,) = make_synthetic_cohort(root / lesion, cfg)
    with openslide.OpenSlide(str(info.path)) as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, (1024, 1024)).convert("RGB"), dtype=np.float32)
    inside = info.mask(1.0, lesion=True).astype(bool)
    normal = info.mask(1.0).astype(bool) & ~inside
    return rgb[inside], rgb[normal]


def test_synth_lesion_kinds_differ_inside_lesions_only(tmp_path: Path) -> None:
    dense_lesion, dense_normal = _lesion_pixels(tmp_path, "dense")
    ves_lesion, ves_normal = _lesion_pixels(tmp_path, "vesicular")
    assert dense_lesion.shape == ves_lesion.shape  # same seed: same shapes
    np.testing.assert_allclose(dense_normal.mean(0), ves_normal.mean(0), atol=1.0)  # same normal tissue
    # vesicular lesions are paler (fewer, paler nuclei on paler stroma) than dense ones
    assert ves_lesion.mean() > dense_lesion.mean() + 20
    # and still stand out from the normal tissue around them (a lesion a model can find)
    assert np.linalg.norm(ves_lesion.mean(0) - ves_normal.mean(0)) > 10


def test_synth_cli_classes_and_lesion(tmp_path: Path) -> None:
    out = tmp_path / "liver"
    result = CliRunner().invoke(
        main,
        [
            "synth",
            str(out),
            "--n",
            "2",
            "--size",
            "512",
            "--lesion",
            "vesicular",
            "--classes",
            "liver_n,liver_t",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0] == "slide_id,label" and {r.split(",")[1] for r in rows[1:]} == {"liver_n", "liver_t"}
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--n", "1", "--classes", "a,A"])
    assert bad.exit_code == 2 and "classes" in bad.output
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "y"), "--n", "1", "--lesion", "cystic"])
    assert bad.exit_code == 2


# --- the demo -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The shared tiny demo (A), a second run with the same seed in another folder (B), a rerun of A."""
    first: list[str] = []
    a = tiny_demo(tmp_path_factory, first)
    b = tmp_path_factory.mktemp("demo_b")
    second: list[str] = []
    run_demo(b, TINY, echo=second.append)
    rerun: list[str] = []
    run_demo(a, TINY, echo=rerun.append)
    return {"a": a, "b": b, "second": second, "rerun": rerun}


@pytest.mark.slow
def test_demo_same_seed_same_table(demo_runs: dict) -> None:
    a = json.loads((demo_runs["a"] / "demo_summary.json").read_text())
    b = json.loads((demo_runs["b"] / "demo_summary.json").read_text())
    assert a == b
    # the summary really holds per-task metrics and both modes (not an empty dict that trivially matches)
    assert [t["task"] for t in a["tasks"]] == ["dense", "vesicular"]
    assert set(a["backward_transfer"]) == {"task_aware", "class_incremental"}
    assert set(a["matrices"]["task_aware"]) == {"bag_auc", "instance_auc"}


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports(demo_runs: dict) -> None:
    printed = "\n".join(demo_runs["second"])
    for i, (name, _) in enumerate(STAGES, start=1):
        assert f"[{i}/{len(STAGES)}] {name}" in printed
    assert "backward transfer" in printed and "pathopeft view" in printed
    assert "randomly initialised" in printed  # the honesty note about random-init features
    out: Path = demo_runs["b"]
    summary = json.loads((out / "demo_summary.json").read_text())
    for key in ("geojson", "tiff", "png", "learning_curves", "segmentation"):
        paths = summary["outputs"][key]
        assert paths and all((out / p).is_file() for p in paths), key
    assert {Path(p).parent.name for p in summary["outputs"]["geojson"]} == {"dense", "vesicular"}
    # numbers come from the files the commands wrote
    trained = json.loads((out / "runs" / "dense" / "test_metrics.json").read_text())
    assert summary["tasks"][0]["when_trained"]["bag_auc"] == pytest.approx(trained["bag_auc"], abs=1e-6)
    after = json.loads((out / "runs" / "vesicular" / "evaluation.json").read_text())["results"]
    assert summary["tasks"][1]["after_last_task"]["class_incremental"]["bag_auc"] == pytest.approx(
        after["vesicular"]["class_incremental"]["bag_auc"], abs=1e-6
    )
    # OWLoRA, task-aware: the first task's outputs are unchanged by the second, so BWT is exactly 0
    if summary["backward_transfer"]["task_aware"]["bag_auc"] is not None:
        assert summary["backward_transfer"]["task_aware"]["bag_auc"] == 0.0
    # every stage left a done-marker and its commands' output
    for name, _ in STAGES:
        assert (out / ".demo" / f"{name}.done").is_file()
        assert (out / "logs" / f"{name}.log").read_text().startswith("$ pathopeft ")


@pytest.mark.slow
def test_demo_rerun_skips_finished_stages(demo_runs: dict) -> None:
    rerun = demo_runs["rerun"]
    skipped = [line for line in rerun if line.startswith("[") and "skip" in line]
    assert len(skipped) == len(STAGES)
    assert any("backward transfer" in line for line in rerun)  # the table is printed again


@pytest.mark.slow
def test_demo_refuses_a_folder_made_with_other_settings(demo_runs: dict) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(demo_runs["a"]), "--seed", "99"])
    assert result.exit_code == 1 and "other settings" in result.output and "seed" in result.output


def test_demo_failed_stage_names_command_and_log(tmp_path: Path) -> None:
    settings = DemoSettings(n_slides=6, size=1024, backbone="no_such_backbone_xyz")
    with pytest.raises(DemoError, match=r"pathopeft tile .*no_such_backbone_xyz.*logs/tile\.log"):
        run_demo(tmp_path, settings, echo=lambda _line: None)
    assert (tmp_path / ".demo" / "synth.done").is_file()
    assert not (tmp_path / ".demo" / "tile.done").exists()  # the failed stage is redone next time


def test_demo_settings_too_small_for_the_splits_are_refused() -> None:
    with pytest.raises(DemoError, match="at least 6 slides"):
        DemoSettings(n_slides=4)
