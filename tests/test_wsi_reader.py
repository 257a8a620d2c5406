"""Slide readers: the fast TIFF path gives OpenSlide's pixels and geometry; bad inputs fail clearly.

Pixel equality: on every fixture here (Aperio SVS with 240-px JPEG/RGB tiles and JPEG tables,
OpenSlide's generic-TIFF ``boxes.tiff``, our YCbCr 4:2:0 synthetic TIFFs) the fast path is
bit-identical to OpenSlide, because both decode the same JPEG bytes with libjpeg(-turbo) using
the same colour-space handling — so the tolerance asserted is 0 wherever a location maps to a
whole level pixel. Locations between level pixels are resampled bilinearly by both readers and
agree within the tolerance stated in ``tests/test_wsi_subpixel.py``.
"""

from __future__ import annotations

import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from pathopeft.wsi import MissingMppError, OpenSlideSlide, SlideError, TiffSlide, open_slide
from pathopeft.wsi.synth import make_synthetic_slide

FIXTURES = "openslide_fixtures"


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reader") / "synth.tiff"
    make_synthetic_slide(path, width=1500, height=1100, seed=3, tile=128)
    return path


def _random_regions(rng: np.random.Generator, slide, level: int, n: int = 25):
    """Regions at level-0 locations that map to whole level pixels, some crossing the edges."""
    w, h = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    for _ in range(n):
        lx, ly = int(rng.integers(-40, w)), int(rng.integers(-40, h))
        size = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        yield (round(lx * ds), round(ly * ds)), size


def _assert_same_pixels(path: Path, *, exact_levels: list[int] | None = None) -> None:
    fast = open_slide(path)
    ref = open_slide(path, backend="openslide")
    assert isinstance(fast, TiffSlide) and isinstance(ref, OpenSlideSlide)
    assert fast.level_dimensions == ref.level_dimensions
    assert fast.level_downsamples == ref.level_downsamples
    assert fast.native_mpp == ref.native_mpp
    rng = np.random.default_rng(0)
    for level in exact_levels if exact_levels is not None else range(fast.level_count):
        whole_fast, whole_ref = fast.read_level(level), ref.read_level(level)
        assert whole_fast.dtype == np.uint8 and whole_fast.shape == whole_ref.shape
        np.testing.assert_array_equal(whole_fast, whole_ref)  # tolerance 0: bit-identical
        for loc, size in _random_regions(rng, fast, level):
            if fast.level_downsamples[level] != round(fast.level_downsamples[level]) and loc != (0, 0):
                continue  # non-integer downsample: only (0, 0) maps to a whole level pixel
            a, b = fast.read_region(loc, level, size), ref.read_region(loc, level, size)
            assert a.shape == (size[1], size[0], 3)
            np.testing.assert_array_equal(a, b, err_msg=f"{path.name} level {level} at {loc} size {size}")


def test_fast_path_matches_openslide_on_real_svs(shared_data: Path) -> None:
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    _assert_same_pixels(path)
    with open_slide(path) as slide:
        assert slide.backend == "tiff" and slide.level_count == 1
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.properties["openslide.vendor"] == "aperio"


def test_fast_path_matches_openslide_on_generic_tiff_fixture(shared_data: Path) -> None:
    path = shared_data / FIXTURES / "boxes.tiff"
    _assert_same_pixels(path)
    slide = open_slide(path)
    assert slide.level_count == 4
    assert slide.level_downsamples == list(openslide.OpenSlide(str(path)).level_downsamples)


def test_fast_path_matches_openslide_on_synthetic_pyramid(synth_slide: Path) -> None:
    _assert_same_pixels(synth_slide)
    assert open_slide(synth_slide).level_count == 5  # 1500 → 94 px: halve until one tile


def test_outside_the_slide_is_white(synth_slide: Path) -> None:
    for backend in ("tiff", "openslide"):
        slide = open_slide(synth_slide, backend=backend)
        w, h = slide.dimensions
        region = slide.read_region((w - 10, h - 5), 0, (30, 20))
        assert (region[5:, :] == 255).all() and (region[:, 10:] == 255).all()
        assert (slide.read_region((-500, -500), 0, (100, 100)) == 255).all()


def test_dicom_folder_and_small_svs_open(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "boxes_dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(shared_data / FIXTURES / name, folder / name)
    slide = open_slide(folder)
    assert slide.backend == "openslide" and slide.slide_id == "boxes_dicom"
    assert slide.properties["openslide.vendor"] == "dicom"
    ref = openslide.OpenSlide(str(folder / "boxes_0.dcm"))
    assert slide.level_dimensions == [tuple(d) for d in ref.level_dimensions]
    np.testing.assert_array_equal(
        slide.read_level(0), np.asarray(ref.read_region((0, 0), 0, ref.dimensions))[..., :3]
    )
    with pytest.raises(SlideError, match="fast TIFF reader"):
        open_slide(folder, backend="tiff")

    svs = open_slide(shared_data / FIXTURES / "small.svs")
    assert svs.dimensions == (16, 16) and svs.mpp == pytest.approx(0.499)
    assert svs.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


def test_flat_png_opens_through_imageslide(shared_data: Path) -> None:
    slide = open_slide(shared_data / FIXTURES / "boxes.png")
    assert slide.backend == "openslide" and slide.dimensions == (300, 250)
    assert slide.native_mpp is None
    assert slide.read_region((0, 0), 0, (300, 250)).shape == (250, 300, 3)


def test_flat_tiff_mpp_from_resolution_tags(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    image = np.full((64, 80, 3), 200, np.uint8)
    tifffile.imwrite(
        path, image, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER"
    )
    slide = open_slide(path)
    assert slide.native_mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(slide.read_level(0), image)
    nounit = tmp_path / "nounit.tif"
    tifffile.imwrite(nounit, image, photometric="rgb")  # unit "none": an aspect ratio, not a size
    assert open_slide(nounit).native_mpp is None


def _bad_inputs(shared: Path, tmp: Path) -> dict[str, Path]:
    cmu = (shared / "wsi" / "CMU-1-Small-Region.svs").read_bytes()
    files = {
        "zero.svs": b"",
        "truncated.svs": cmu[:20_000],
        "notaslide.svs": b"slide_id,label\nA,tumor\n",
        "random.tiff": np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
    }
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    out["unopenable.tiff"] = shared / FIXTURES / "unopenable.tiff"
    out["unreadable.svs"] = shared / FIXTURES / "unreadable.svs"
    out["missing.svs"] = tmp / "missing.svs"
    (tmp / "empty_folder").mkdir()
    out["empty_folder"] = tmp / "empty_folder"
    return out


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_bad_inputs_raise_slide_error_naming_the_file(
    shared_data: Path, tmp_path: Path, backend: str
) -> None:
    for name, path in _bad_inputs(shared_data, tmp_path).items():
        with pytest.raises(SlideError) as info:
            slide = open_slide(path, backend=backend)  # type: ignore[arg-type]
            slide.read_region((0, 0), 0, (16, 16))  # unreadable.svs opens; reading must fail
        message = str(info.value)
        assert str(path) in message, name
        assert "\n" not in message and len(message) < 400, name


def test_truncated_pyramid_is_an_error_not_a_flat_image(synth_slide: Path, tmp_path: Path) -> None:
    data = synth_slide.read_bytes()
    for frac in (0.3, 0.95):
        cut = tmp_path / f"cut{frac}.tiff"
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(SlideError, match="cut"):
            open_slide(cut).read_level(0)


def test_missing_mpp_is_an_error_until_given(tmp_path: Path) -> None:
    path = tmp_path / "nompp.tiff"
    make_synthetic_slide(path, width=512, height=512, mpp=None, tile=128)
    slide = open_slide(path)
    assert slide.native_mpp is None
    with pytest.raises(MissingMppError, match="nompp.tiff"):
        _ = slide.mpp
    assert open_slide(path, mpp=0.5).mpp == 0.5
    with pytest.raises(ValueError):
        open_slide(path, mpp=-1)


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_pickle_round_trip_reopens_lazily(synth_slide: Path, backend: str) -> None:
    slide = open_slide(synth_slide, slide_id="S1", mpp=0.4, backend=backend)  # type: ignore[arg-type]
    before = slide.read_region((300, 200), 1, (96, 64))
    clone = pickle.loads(pickle.dumps(slide))
    assert clone.slide_id == "S1" and clone.mpp == 0.4 and clone.backend == backend
    assert clone.level_dimensions == slide.level_dimensions
    np.testing.assert_array_equal(clone.read_region((300, 200), 1, (96, 64)), before)
    slide.close()  # closed slides reopen on the next read
    np.testing.assert_array_equal(slide.read_region((300, 200), 1, (96, 64)), before)


def test_threads_share_one_fast_slide(synth_slide: Path) -> None:
    slide = open_slide(synth_slide, cache_mb=0.2)  # tiny cache: evictions under concurrency
    coords = [(x, y) for y in range(0, 1000, 100) for x in range(0, 1400, 100)]
    expected = [open_slide(synth_slide, backend="openslide").read_region(c, 0, (128, 128)) for c in coords]
    results: dict[int, list[np.ndarray]] = {}

    def work(k: int) -> None:
        results[k] = [slide.read_region(c, 0, (128, 128)) for c in coords]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        for got, want in zip(results[k], expected):
            np.testing.assert_array_equal(got, want)


def test_invalid_requests(synth_slide: Path) -> None:
    slide = open_slide(synth_slide)
    with pytest.raises(ValueError, match="level"):
        slide.read_region((0, 0), 9, (4, 4))
    with pytest.raises(ValueError, match="size"):
        slide.read_region((0, 0), 0, (0, 4))
    with pytest.raises(ValueError, match="backend"):
        open_slide(synth_slide, backend="cucim")  # type: ignore[arg-type]
