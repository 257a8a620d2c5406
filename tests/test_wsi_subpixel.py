"""Fast TIFF reader vs OpenSlide above level 0, on pyramids with non-integer downsamples.

Real pyramids are floor-rounded (Aperio: downsample 4.000121...), so a level-0 location almost
never maps to a whole level pixel. OpenSlide then paints the level translated by the fractional
offset with bilinear filtering; the fast reader must give the same pixels. Stated tolerance
(module docstring of ``pathopeft.wsi.tiff_backend``): max abs difference ≤ 3 of 255 per channel,
mean ≤ 0.5, at random level-1/2 positions (including ones crossing the slide's edges and
negative ones). Before the fix the reader snapped to ``floor`` and differed by up to ~190.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from pathopeft.wsi import OpenSlideSlide, TiffSlide, open_slide
from pathopeft.wsi.synth import make_synthetic_slide

MAX_ABS, MAX_MEAN = 3, 0.5


def _write_pyramid(path: Path, level0: np.ndarray, dims: list[tuple[int, int]], compression: str) -> None:
    """A generic tiled TIFF whose levels have exactly ``dims`` (so downsamples are non-integer)."""
    with tifffile.TiffWriter(path) as tw:
        for i, (w, h) in enumerate([(level0.shape[1], level0.shape[0]), *dims]):
            image = level0 if i == 0 else cv2.resize(level0, (w, h), interpolation=cv2.INTER_AREA)
            tw.write(
                image,
                tile=(128, 128),
                compression=compression,
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                resolution=(2e4, 2e4),
                resolutionunit="CENTIMETER",
            )


def _compare(path: Path, n: int = 40) -> list[tuple[int, float, int]]:
    fast, ref = open_slide(path), open_slide(path, backend="openslide")
    assert isinstance(fast, TiffSlide) and isinstance(ref, OpenSlideSlide)
    assert fast.level_downsamples == ref.level_downsamples
    rng = np.random.default_rng(0)
    report = []
    for level in (1, 2):
        ds = fast.level_downsamples[level]
        assert abs(ds - round(ds)) > 1e-3, ds  # the point of the test: a non-integer downsample
        w, h = fast.level_dimensions[level]
        worst, means = 0, []
        for _ in range(n):
            size = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
            loc = (int(rng.integers(-120, int(w * ds))), int(rng.integers(-120, int(h * ds))))
            a = fast.read_region(loc, level, size).astype(np.int16)
            b = ref.read_region(loc, level, size).astype(np.int16)
            diff = np.abs(a - b)
            worst = max(worst, int(diff.max()))
            means.append(float(diff.mean()))
            assert diff.max() <= MAX_ABS, f"level {level} at {loc} size {size}: max diff {diff.max()}"
        report.append((level, float(np.mean(means)), worst))
        assert np.mean(means) <= MAX_MEAN, (level, np.mean(means))
    return report


@pytest.fixture(scope="module")
def texture(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    path = tmp_path_factory.mktemp("subpixel") / "flat.tiff"
    make_synthetic_slide(path, width=1200, height=1000, levels=1, seed=11, tile=128)
    with open_slide(path) as slide:
        return slide.read_level(0)


@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_non_integer_downsamples_match_openslide_on_texture(
    texture: np.ndarray, tmp_path: Path, compression: str
) -> None:
    path = tmp_path / f"nonint_{compression}.tiff"
    _write_pyramid(path, texture, [(299, 249), (149, 125)], compression)  # ds ≈ 4.01, 8.02
    _compare(path)


def test_non_integer_downsamples_match_openslide_on_real_svs(shared_data: Path, tmp_path: Path) -> None:
    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs", backend="openslide") as svs:
        level0 = svs.read_region((0, 0), 0, (1600, 1400))  # a real H&E region
    path = tmp_path / "cmu_nonint.tiff"
    _write_pyramid(path, level0, [(399, 349), (199, 174)], "jpeg")  # ds ≈ 4.0086, 8.0316
    _compare(path)


def test_half_pixel_offset_is_interpolated_not_snapped(tmp_path: Path) -> None:
    """Integer downsample 2, level-0 x = 601 is half a level pixel: interpolated like OpenSlide."""
    path = tmp_path / "synth.tiff"
    make_synthetic_slide(path, width=1500, height=1100, seed=3, tile=128)
    fast, ref = open_slide(path), open_slide(path, backend="openslide")
    a = fast.read_region((601, 401), 1, (64, 64)).astype(np.int16)
    b = ref.read_region((601, 401), 1, (64, 64)).astype(np.int16)
    assert np.abs(a - b).max() <= MAX_ABS
    snapped = fast.read_region((600, 400), 1, (64, 64)).astype(np.int16)
    assert np.abs(a - snapped).max() > MAX_ABS  # the old floor-snapping would not pass the line above


def test_hamamatsu_is_not_claimed_by_the_fast_path(tmp_path: Path) -> None:
    """NDPI levels are JPEG streams with restart markers, not tiled pages: OpenSlide reads them.

    Even a tiled page the probe would accept must not be read directly under the hamamatsu
    vendor (the old code claimed it and would then have decoded without NDPI's ``jpegheader``).
    """
    from pathopeft.wsi.tiff_backend import FAST_VENDORS, probe_tiff_levels

    path = tmp_path / "tiled.tiff"
    tifffile.imwrite(path, np.zeros((256, 256, 3), np.uint8), tile=(128, 128), photometric="rgb")
    assert not isinstance(probe_tiff_levels(path, [(256, 256)], "generic-tiff"), str)
    reason = probe_tiff_levels(path, [(256, 256)], "hamamatsu")
    assert isinstance(reason, str) and "hamamatsu" in reason
    assert "hamamatsu" not in FAST_VENDORS


def test_strip_reads_of_a_non_integer_level_are_exact_level_rows(
    texture: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Low-resolution strips copy level rows (no sub-pixel resampling, no float copy of a strip)."""
    import pathopeft.wsi.lowres as lowres
    from pathopeft.wsi.lowres import _block_mean, read_downsampled

    path = tmp_path / "nonint.tiff"
    _write_pyramid(path, texture, [(299, 249), (149, 125)], "deflate")
    slide = open_slide(path)
    monkeypatch.setattr(lowres, "STRIP_BYTES", 299 * 3 * 20)  # ~20 rows of level 1 per strip
    low = read_downsampled(slide, 1.5 * slide.level_downsamples[1], coarser_tolerance=1.0)
    assert low.level == 1 and low.image.shape == (249, 299, 3)  # level 1 itself, in strips
    np.testing.assert_array_equal(low.image, _block_mean(slide.read_level(1), 1))
