"""``pathopeft tile`` end to end on small synthetic slides (in-process CliRunner): outputs, resume,
parameter changes, bad inputs, exit codes, CSV / --mpp, local weights, offline hub error."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from pathopeft.cli import main
from pathopeft.features.backbones import build_backbone
from pathopeft.features.dataset import Preprocess, TileDataset
from pathopeft.files import PARTIAL_MARKER, host_name
from pathopeft.wsi import open_slide, read_coords
from pathopeft.wsi.synth import make_synthetic_slide

# cheap but real: a timm ResNet-18 (random init) on 64-px tiles at 1 µm/px (128 level-0 px)
FAST = [
    "--backbone", "resnet18", "--no-pretrained", "--tile-px", "64", "--target-mpp", "1.0",
    "--set", "features.resize_to=tile", "--workers", "0", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    """Two brightfield slides, one without µm/px metadata, one blank (no tissue)."""
    root = tmp_path_factory.mktemp("synth")
    infos = {}
    for i in range(2):
        infos[f"s{i}"] = make_synthetic_slide(root / f"s{i}.tiff", width=1536, height=1024, seed=i, tile=128)
    infos["nompp"] = make_synthetic_slide(
        root / "nompp.tiff", width=1024, height=768, seed=5, tile=128, mpp=None
    )
    infos["blank"] = make_synthetic_slide(
        root / "blank.tiff", width=512, height=512, tile=128, modality="blank"
    )
    return infos


def _slides(tmp_path: Path, synth: dict, names=("s0", "s1")) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(synth[name].path, folder / f"{name}.tiff")
    return folder


def _run(*args: str, expect: int | None = 0):
    result = CliRunner().invoke(main, ["tile", *map(str, args)], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    return result


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def _no_partials(root: Path) -> None:
    assert not [p for p in root.rglob("*") if PARTIAL_MARKER in p.name]


def _expected_tiles(info, tile0: int = 128, min_fraction: float = 0.25) -> int:
    """Grid cells whose true tissue fraction (from the synthetic ground truth) reaches the threshold."""
    mask = info.mask(8).astype(np.float64)
    step = tile0 // 8
    rows, cols = info.height // tile0, info.width // tile0
    cells = mask[: rows * step, : cols * step].reshape(rows, step, cols, step).mean(axis=(1, 3))
    return int((cells >= min_fraction).sum())


def test_outputs_layout_and_geometry(tmp_path, synth) -> None:
    slides = _slides(tmp_path, synth)
    (slides / "s0.json").write_text("{}")  # sidecars are ignored, not broken slides
    (slides / "labels.csv").write_text("slide_id,label\ns0,tumor\n")
    (slides / "notes.txt").write_text("x")
    (slides / "s1.xml").write_text("<a/>")
    out = tmp_path / "out"
    result = _run(slides, "--out", out, *FAST)
    assert "2 slide(s)" in result.stdout and "2 ok (0 reused), 0 empty, 0 error" in result.stdout

    rows = _manifest(out)
    assert set(rows) == {"s0", "s1"}
    for sid, row in rows.items():
        info = synth[sid]
        assert row["status"] == "ok" and row["error"] == ""
        assert float(row["mpp"]) == pytest.approx(0.5) and float(row["target_mpp"]) == 1.0
        assert row["tile_px"] == "64" and row["backbone"] == "resnet18" and row["level"] == "1"
        n = int(row["n_tiles"])
        # tile count consistent with the known tissue area
        assert abs(n - _expected_tiles(info)) <= max(3, 0.15 * n)

        # coords: plain h5py, CLAM layout
        with h5py.File(out / "coords" / f"{sid}.h5", "r") as f:
            coords = f["coords"][:]
            assert coords.shape == (n, 2) and coords.dtype == np.int64
            assert f["coords"].attrs["patch_size"] == 64 and f["coords"].attrs["patch_level"] == 1
            assert f["coords"].attrs["target_mpp"] == 1.0
        assert (coords >= 0).all()
        assert (coords[:, 0] + 128 <= info.width).all() and (coords[:, 1] + 128 <= info.height).all()
        truth = info.mask(8)
        covered = [truth[y // 8 : (y + 128) // 8, x // 8 : (x + 128) // 8].mean() for x, y in coords]
        assert min(covered) > 0.1  # every kept tile really lies on tissue

        # features: plain h5py, TRIDENT/CLAM layout
        with h5py.File(out / "features" / "resnet18" / f"{sid}.h5", "r") as f:
            feats, fcoords = f["features"][:], f["coords"][:]
            attrs = dict(f.attrs)
        assert feats.shape == (n, 512) and feats.dtype == np.float32 and np.isfinite(feats).all()
        np.testing.assert_array_equal(fcoords, coords)
        assert attrs["backbone"] == "resnet18" and attrs["weights"] == "random:0"
        assert attrs["patch_size"] == 64 and attrs["mpp"] == pytest.approx(0.5)
        assert attrs["patch_size_level0"] == 128 and attrs["feature_dim"] == 512

        png = (out / "thumbnails" / f"{sid}.png").read_bytes()
        assert png.startswith(b"\x89PNG")
    _no_partials(out)


def test_resume_parameter_change_and_overwrite(tmp_path, synth) -> None:
    slides = _slides(tmp_path, synth)
    out = tmp_path / "out"
    _run(slides, "--out", out, *FAST)
    coords, feats = out / "coords" / "s0.h5", out / "features" / "resnet18" / "s0.h5"
    stamp = {p: p.stat().st_mtime_ns for p in (coords, feats)}

    again = _run(slides, "--out", out, *FAST)  # same parameters: nothing recomputed
    assert "2 ok (2 reused)" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp

    seed = _run(slides, "--out", out, *FAST, "--set", "features.seed=1")  # other weights: features only
    assert "2 ok (0 reused)" in seed.stdout and "reusing coords" in seed.stderr
    assert coords.stat().st_mtime_ns == stamp[coords] and feats.stat().st_mtime_ns != stamp[feats]
    with h5py.File(feats, "r") as f:
        assert f.attrs["weights"] == "random:1"
    half = _run(slides, "--out", out, *FAST, "--set", "features.seed=1", "--set", "features.dtype=float16")
    assert "2 ok (0 reused)" in half.stdout and "float16 requested" in half.stderr  # storage dtype honoured
    with h5py.File(feats, "r") as f:
        assert f["features"].dtype == np.float16

    bigger = [*FAST, "--tile-px", "96"]  # tiling parameter changed: everything recomputed
    changed = _run(slides, "--out", out, *bigger)
    assert "2 ok (0 reused)" in changed.stdout and "tiling parameters changed" in changed.stderr
    assert read_coords(coords).tile_px == 96
    with h5py.File(feats, "r") as f:
        assert f.attrs["patch_size"] == 96 and len(f["coords"]) == len(read_coords(coords).coords)

    stamp = coords.stat().st_mtime_ns
    redo = _run(slides, "--out", out, *bigger, "--overwrite")
    assert "2 ok (0 reused)" in redo.stdout and coords.stat().st_mtime_ns != stamp


def test_no_features_then_features_reuses_coords(tmp_path, synth) -> None:
    slides = _slides(tmp_path, synth, ("s0",))
    out = tmp_path / "out"
    _run(slides, "--out", out, *FAST, "--no-features")
    assert not (out / "features").exists()
    row = _manifest(out)["s0"]
    assert row["status"] == "ok" and row["backbone"] == "" and int(row["n_tiles"]) > 0
    stamp = (out / "coords" / "s0.h5").stat().st_mtime_ns
    assert "1 ok (1 reused)" in _run(slides, "--out", out, *FAST, "--no-features").stdout

    result = _run(slides, "--out", out, *FAST)
    assert "reusing coords" in result.stderr
    assert (out / "coords" / "s0.h5").stat().st_mtime_ns == stamp
    assert (out / "features" / "resnet18" / "s0.h5").is_file()
    assert _manifest(out)["s0"]["backbone"] == "resnet18"


def test_bad_inputs_each_get_a_row_and_leave_nothing_behind(tmp_path, synth) -> None:
    slides = _slides(tmp_path, synth, ("s0", "blank"))
    (slides / "zero.svs").write_bytes(b"")
    (slides / "truncated.tiff").write_bytes(synth["s1"].path.read_bytes()[:3000])
    (slides / "fake.svs").write_text("this is not a slide\n")
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # left by a killed run (a pid that is certainly gone)
    stale = out / "coords" / f".blank.h5{PARTIAL_MARKER}{host_name()}-{dead.pid}-dead"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")

    result = _run(slides, "--out", out, *FAST)  # some failures: still exit 0
    rows = _manifest(out)
    status = {sid: row["status"] for sid, row in rows.items()}
    assert status == {"s0": "ok", "blank": "empty", "zero": "error", "truncated": "error", "fake": "error"}
    assert "no tissue" in rows["blank"]["error"]
    assert "0 bytes" in rows["zero"]["error"]
    for sid in ("truncated", "fake"):
        assert sid in rows[sid]["error"] and "\n" not in rows[sid]["error"]
    assert "1 ok (0 reused), 1 empty, 3 error" in result.stdout
    _no_partials(out)
    # files match the rows: only the ok slide has coords/features; the empty one keeps its QC thumbnail
    assert sorted(p.stem for p in (out / "coords").iterdir()) == ["s0"]
    assert sorted(p.stem for p in (out / "features" / "resnet18").iterdir()) == ["s0"]
    assert sorted(p.stem for p in (out / "thumbnails").iterdir()) == ["blank", "s0"]

    strict = _run(slides, "--out", out, *FAST, "--strict", expect=1)
    assert "3 error" in strict.stdout

    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    (bad_only / "zero.svs").write_bytes(b"")
    (bad_only / "fake.tiff").write_bytes(b"II*\x00" + b"\x00" * 100)
    _run(bad_only, "--out", tmp_path / "out2", *FAST, expect=1)  # every slide failed
    assert {r["status"] for r in _manifest(tmp_path / "out2").values()} == {"error"}


def test_openslide_error_fixtures(tmp_path, synth, shared_data) -> None:
    """unopenable.tiff fails to open; unreadable.svs opens but its tiles do not decode."""
    slides = _slides(tmp_path, synth, ("s0",))
    for name in ("unreadable.svs", "unopenable.tiff"):
        shutil.copy(shared_data / "openslide_fixtures" / name, slides)
    out = tmp_path / "out"
    result = _run(slides, "--out", out, *FAST)
    rows = _manifest(out)
    assert {sid: row["status"] for sid, row in rows.items()} == {
        "s0": "ok",
        "unreadable": "error",
        "unopenable": "error",
    }
    assert "unopenable.tiff" in rows["unopenable"]["error"]
    assert "unreadable.svs" in rows["unreadable"]["error"]
    assert "1 ok (0 reused), 0 empty, 2 error" in result.stdout
    _no_partials(out)
    assert sorted(p.stem for p in (out / "coords").iterdir()) == ["s0"]


def test_unreadable_tiles_fail_during_features(tmp_path, synth, monkeypatch) -> None:
    """A slide that opens and tiles fine but whose pixels fail to decode during feature extraction."""
    import pathopeft.features.dataset as dataset

    slides = _slides(tmp_path, synth, ("s0", "s1"))
    original = dataset.TileDataset.read_tile

    def flaky(self, index, out):
        if self.slide.slide_id == "s1" and index == 3:
            raise OSError("cannot decode stored tile 7: Bogus marker length")
        return original(self, index, out)

    monkeypatch.setattr(dataset.TileDataset, "read_tile", flaky)
    out = tmp_path / "out"
    _run(slides, "--out", out, *FAST)
    rows = _manifest(out)
    assert rows["s0"]["status"] == "ok"
    assert rows["s1"]["status"] == "error" and "Bogus marker length" in rows["s1"]["error"]
    for sub in ("coords", "features/resnet18", "thumbnails"):  # nothing of s1 remains
        assert not (out / sub / ("s1.png" if sub == "thumbnails" else "s1.h5")).exists()


def test_csv_inputs_mpp_and_manifest_merge(tmp_path, synth) -> None:
    table = tmp_path / "slides.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "slide_id", "mpp"])
        w.writerow([synth["s0"].path, "case-A", ""])
        w.writerow([synth["nompp"].path, "nompp-csv", "0.5"])  # no metadata: the CSV gives it
        w.writerow([synth["nompp"].path.with_name("gone.tiff"), "missing", ""])
    out = tmp_path / "out"
    _run(table, "--out", out, *FAST)
    rows = _manifest(out)
    assert rows["case-A"]["status"] == "ok" and (out / "coords" / "case-A.h5").is_file()
    assert rows["nompp-csv"]["status"] == "ok" and float(rows["nompp-csv"]["mpp"]) == 0.5
    assert rows["missing"]["status"] == "error" and "not found" in rows["missing"]["error"]

    # a slide without metadata and without --mpp fails clearly; --mpp fixes it
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(synth["nompp"].path, lone / "nompp.tiff")
    _run(lone, "--out", out, *FAST, expect=1)
    rows = _manifest(out)
    assert rows["nompp"]["status"] == "error" and "--mpp" in rows["nompp"]["error"]
    assert {"case-A", "nompp-csv", "missing"} <= set(rows)  # earlier rows are kept
    _run(lone, "--out", out, *FAST, "--mpp", "0.5")
    assert _manifest(out)["nompp"]["status"] == "ok"
    # --mpp fills gaps only: it does not override real metadata unless asked to
    _run(synth["s0"].path, "--out", out, *FAST, "--mpp", "0.25", "--no-features")
    assert float(_manifest(out)["s0"]["mpp"]) == 0.5
    _run(
        synth["s0"].path,
        "--out",
        out,
        *FAST,
        "--mpp",
        "0.25",
        "--no-features",
        "--set",
        "slides.mpp_override=true",
    )
    assert float(_manifest(out)["s0"]["mpp"]) == 0.25


def test_weights_from_safetensors_give_the_same_features(tmp_path, synth) -> None:
    ref = build_backbone("resnet18", pretrained=False, seed=42)
    weights = tmp_path / "encoder.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in ref.model.state_dict().items()}, str(weights))
    slides = _slides(tmp_path, synth, ("s0",))
    out = tmp_path / "out"
    args = [a for a in FAST if a != "--no-pretrained"]
    _run(slides, "--out", out, *args, "--weights", weights, "--workers", "1")  # workers normalise (CPU)
    with h5py.File(out / "features" / "resnet18" / "s0.h5", "r") as f:
        feats, coords, wid = f["features"][:], f["coords"][:], f.attrs["weights"]
    assert wid.startswith("sha256:")

    grid = read_coords(out / "coords" / "s0.h5")
    ds = TileDataset(open_slide(synth["s0"].path), coords, grid.level, grid.read_size, 64)
    tiles = ds.__getitems__(list(range(len(ds))))
    with torch.inference_mode():
        expected = ref.model(Preprocess(ref.mean, ref.std)(tiles)).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)

    bad = tmp_path / "wrong.safetensors"
    other = build_backbone("resnet34", pretrained=False).model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(bad))
    result = _run(slides, "--out", out, *args, "--weights", bad, expect=1)
    assert "match the checkpoint" in result.stderr and "wrong.safetensors" in result.stderr


def test_offline_pretrained_is_a_clear_error(tmp_path, synth, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    slides = _slides(tmp_path, synth, ("s0",))
    args = [a for a in FAST if a != "--no-pretrained"]
    result = _run(slides, "--out", tmp_path / "out", *args, expect=1)
    assert "--weights PATH" in result.stderr and "--no-pretrained" in result.stderr
    assert not (tmp_path / "out" / "manifest.csv").exists()  # failed before touching any slide


def test_progress_bar_and_bad_usage(tmp_path, synth) -> None:
    slides = _slides(tmp_path, synth, ("s0",))
    fast = [a for a in FAST if a != "--no-progress"]
    result = _run(slides, "--out", tmp_path / "out", *fast, "--no-features")
    assert "tiles/s" in result.stderr and "slide" in result.stderr

    assert _run(slides, *FAST, "--set", "grid.tile_pix=3", expect=2).exit_code == 2
    assert "unknown key" in _run(slides, *FAST, "--set", "nope.x=1", expect=2).stderr
    assert "no such file" in _run(tmp_path / "missing", *FAST, expect=2).stderr
    assert _run(slides, *FAST, "--tile-px", "4", expect=2).exit_code == 2
    usage = CliRunner().invoke(main, ["tile"])
    assert usage.exit_code == 2


def test_config_file_and_flags(tmp_path, synth) -> None:
    slides = _slides(tmp_path, synth, ("s0",))
    config = tmp_path / "tile.yaml"
    config.write_text(
        f"output:\n  dir: {tmp_path / 'from_config'}\n"
        "grid:\n  tile_px: 96\n  target_mpp: 1.0\n"
        "features:\n  backbone: resnet18\n  pretrained: false\n  resize_to: tile\n  num_workers: 0\n"
        "  name: r18\n"
    )
    _run(slides, "--config", config, "--no-progress", "--tile-px", "64")  # the flag wins over the file
    out = tmp_path / "from_config"
    assert _manifest(out)["s0"]["tile_px"] == "64"
    assert (out / "features" / "r18" / "s0.h5").is_file()


def test_default_output_folder_is_tiles_in_cwd(tmp_path, synth) -> None:
    slides = _slides(tmp_path, synth, ("s0",))
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        result = runner.invoke(main, ["tile", str(slides), *FAST, "--no-features"])
        assert result.exit_code == 0, result.output
        assert Path("tiles/manifest.csv").is_file() and Path("tiles/coords/s0.h5").is_file()
        assert [p.name for p in Path("tiles/thumbnails").iterdir()] == ["s0.png"]


def test_open_failure_on_rerun_keeps_finished_outputs(tmp_path, synth) -> None:
    """Issue 13 item 1: a slide that cannot be opened this time keeps its complete outputs."""
    slides = _slides(tmp_path, synth, ("s0",))
    out = tmp_path / "out"
    _run(slides, "--out", out, *FAST, "--no-features")
    coords = out / "coords" / "s0.h5"
    assert coords.is_file()
    (slides / "s0.tiff").write_bytes(b"not a slide any more")  # e.g. a half-synced network copy
    _run(slides, "--out", out, *FAST, "--no-features", expect=None)
    assert coords.is_file() and len(read_coords(coords).coords) > 0
    assert _manifest(out)["s0"]["status"] == "error"
