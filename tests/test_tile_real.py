"""``pathopeft tile`` on the shared real slides (Aperio SVS, generic TIFF, DICOM) and on synthetic
slides of different native resolutions (the requested µm/px is honoured, the level is chosen)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pathopeft.cli import main
from pathopeft.wsi.synth import make_synthetic_slide

FAST = [
    "--backbone", "resnet18", "--no-pretrained", "--tile-px", "64",
    "--set", "features.resize_to=tile", "--workers", "0", "--no-progress",
]  # fmt: skip


def _run(*args: str, expect: int = 0):
    result = CliRunner().invoke(main, ["tile", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def test_real_slides_svs_tiff_dicom(tmp_path, shared_data) -> None:
    fixtures = shared_data / "openslide_fixtures"
    slides = tmp_path / "slides"
    (slides / "dicom_boxes").mkdir(parents=True)  # a folder of .dcm files is one DICOM slide
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(fixtures / name, slides / "dicom_boxes" / name)
    shutil.copy(fixtures / "boxes.tiff", slides)
    shutil.copy(fixtures / "small.svs", slides)
    shutil.copy(shared_data / "wsi" / "CMU-1-Small-Region.svs", slides)
    out = tmp_path / "out"
    _run(slides, "--out", out, *FAST, "--target-mpp", "2.0")
    rows = _manifest(out)
    assert set(rows) == {"CMU-1-Small-Region", "boxes", "small", "dicom_boxes"}

    cmu = rows["CMU-1-Small-Region"]  # real H&E, one pyramid level only
    assert cmu["status"] == "ok" and cmu["level"] == "0" and float(cmu["mpp"]) == pytest.approx(0.499)
    n = int(cmu["n_tiles"])
    with h5py.File(out / "features" / "resnet18" / "CMU-1-Small-Region.h5", "r") as f:
        assert f["features"][:].shape == (n, 512) and f["coords"][:].shape == (n, 2)
        tile0 = f.attrs["patch_size_level0"]
        # what made the features (issue 13 items 5, 9): QuPath frame offset, loaded tensors' hash
        assert (f.attrs["bounds_x"], f.attrs["bounds_y"]) == (0, 0)
        assert len(f.attrs["weights_tensors_sha256"]) == 64
        coords = f["coords"][:]
    assert tile0 == round(64 * 2.0 / 0.499)
    assert 20 <= n <= 88  # 8 × 11 grid cells of 256 level-0 px, most of them tissue
    assert (coords[:, 0] + tile0 <= 2220).all() and (coords[:, 1] + tile0 <= 2967).all()

    # boxes.tiff says 72 dpi (352 µm/px): refused with a message that says what to pass
    assert rows["boxes"]["status"] == "error" and "--mpp" in rows["boxes"]["error"]
    # 16×16-px slides open (SVS and DICOM), but no tile fits: empty with the reason, not an error
    for sid in ("small", "dicom_boxes"):
        assert rows[sid]["status"] == "empty" and rows[sid]["error"]
        assert float(rows[sid]["mpp"]) == pytest.approx(0.499)
    assert (out / "thumbnails" / "CMU-1-Small-Region.png").is_file()

    # the CSV's mpp column overrides wrong metadata
    table = tmp_path / "boxes.csv"
    table.write_text(f"path,mpp\n{slides / 'boxes.tiff'},0.5\n")
    # (its boxes are pure red/green/blue, which the pen filter rightly takes for ink: off here)
    _run(table, "--out", out, *FAST, "--target-mpp", "1.0", "--set", "tissue.min_region_um2=0",
         "--set", "tissue.pen_filter=[]")  # fmt: skip
    rows = _manifest(out)
    assert rows["boxes"]["status"] == "ok" and float(rows["boxes"]["mpp"]) == 0.5
    assert rows["CMU-1-Small-Region"]["status"] == "ok"  # kept from the first run


def test_requested_mpp_is_honoured_across_native_resolutions(tmp_path) -> None:
    """The same physical tissue scanned at 0.25 and 0.5 µm/px gives tiles of the same physical size."""
    slides = tmp_path / "slides"
    fine = make_synthetic_slide(slides / "fine.tiff", width=2048, height=1536, mpp=0.25, seed=3, tile=128)
    coarse = make_synthetic_slide(slides / "coarse.tiff", width=1024, height=768, mpp=0.5, seed=3, tile=128)
    out = tmp_path / "out"
    _run(slides, "--out", out, *FAST, "--target-mpp", "1.0", "--no-features")
    rows = _manifest(out)
    assert rows["fine"]["level"] == "2" and rows["coarse"]["level"] == "1"  # downsample 4 vs 2
    for sid, info, tile0 in (("fine", fine, 256), ("coarse", coarse, 128)):
        with h5py.File(out / "coords" / f"{sid}.h5", "r") as f:
            attrs = f["coords"].attrs
            assert attrs["patch_size_level0"] == tile0 and attrs["read_size"] == 64
            coords = f["coords"][:]
        # every tile covers 64 µm × 64 µm; count ≈ tissue area / tile area (small slides: loose)
        tiles_area_um2 = len(coords) * 64.0 * 64.0
        assert 0.8 <= tiles_area_um2 / info.tissue_area_um2() <= 2.0
        assert np.all(coords % 4 == 0) if sid == "fine" else np.all(coords % 2 == 0)
