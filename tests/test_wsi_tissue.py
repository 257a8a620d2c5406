"""Tissue masks: area matches the synthetic truth, physical units, modalities, empty reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pathopeft.config.wsi import TissueConfig
from pathopeft.wsi import MissingMppError, detect_tissue, open_slide
from pathopeft.wsi.synth import SyntheticSlideInfo, make_synthetic_slide
from pathopeft.wsi.tissue import segment_tissue


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticSlideInfo]:
    root = tmp_path_factory.mktemp("tissue")
    specs = {
        "bf": {"seed": 11},
        "bf_025": {"seed": 12, "mpp": 0.25},
        "fluo": {"seed": 13, "modality": "fluorescence"},
        "blank": {"seed": 14, "modality": "blank"},
    }
    return {
        name: make_synthetic_slide(root / f"{name}.tiff", width=4096, height=4096, **kw)  # type: ignore[arg-type]
        for name, kw in specs.items()
    }


@pytest.mark.parametrize("name", ["bf", "bf_025", "fluo"])
def test_area_matches_true_tissue_area(slides: dict[str, SyntheticSlideInfo], name: str) -> None:
    info = slides[name]
    mask = detect_tissue(open_slide(info.path), TissueConfig())
    true = info.tissue_area_um2()
    # Within 5 %: the mask is 8 µm/px, so edge pixels of ~16-mm perimeters cost ~1-2 %; the median
    # blur and closing round corners a little more.
    assert mask.area_um2 == pytest.approx(true, rel=0.05)
    assert mask.reason is None and not mask.is_empty
    assert mask.mpp == pytest.approx(8.0, rel=0.01)  # mask_mpp honoured via the pyramid
    assert mask.modality == ("fluorescence" if name == "fluo" else "brightfield")
    # Pixel-level agreement with the true shapes, not only the total.
    truth = info.mask(mask.downsample)[: mask.mask.shape[0], : mask.mask.shape[1]]
    iou = (truth & mask.mask).sum() / (truth | mask.mask).sum()
    assert iou > 0.93
    # Contours are level-0 coordinates inside the slide.
    assert mask.contours and all(
        (c >= 0).all() and (c[:, 0] <= info.width).all() and (c[:, 1] <= info.height).all()
        for c in mask.contours
    )


def test_blank_slide_is_empty_with_reason(slides: dict[str, SyntheticSlideInfo]) -> None:
    mask = detect_tissue(open_slide(slides["blank"].path), TissueConfig())
    assert mask.is_empty and mask.area_um2 == 0
    assert mask.reason and "no tissue" in mask.reason and "uniform" in mask.reason


def test_fluorescence_is_not_all_tissue(slides: dict[str, SyntheticSlideInfo]) -> None:
    info = slides["fluo"]
    slide = open_slide(info.path)
    auto = detect_tissue(slide, TissueConfig())
    assert auto.modality == "fluorescence"
    assert 0.05 < auto.mask.mean() < 0.6
    # Forcing brightfield on a dark slide shows why detection matters: the saturated dark glass
    # and tissue are no longer separated the same way, the area is wrong.
    forced = detect_tissue(slide, TissueConfig(modality="brightfield"))
    assert abs(forced.area_um2 - info.tissue_area_um2()) > abs(auto.area_um2 - info.tissue_area_um2())


def test_min_region_area_is_physical() -> None:
    """The same 64 µm × 64 µm speck (4,096 µm²) is kept or dropped by µm², whatever the µm/px."""
    for mpp in (2.0, 4.0, 8.0):

        def px(um: float, mpp: float = mpp) -> int:
            return round(um / mpp)

        image = np.full((px(1600), px(1600), 3), 255, np.uint8)
        image[px(96) : px(160), px(96) : px(160)] = (200, 80, 160)  # the speck
        image[px(800) : px(1200), px(800) : px(1200)] = (200, 80, 160)  # a 400 µm square of tissue
        cfg_keep = TissueConfig(min_region_um2=3000, median_um=0, closing_um=0)
        cfg_drop = TissueConfig(min_region_um2=5000, median_um=0, closing_um=0)
        assert segment_tissue(image, mpp, cfg_keep).area_um2 == pytest.approx(4096 + 160_000), mpp
        assert segment_tissue(image, mpp, cfg_drop).area_um2 == pytest.approx(160_000), mpp
        only_speck = image.copy()
        only_speck[px(800) :, px(800) :] = 255
        empty = segment_tissue(only_speck, mpp, cfg_drop)
        assert empty.is_empty and "min_region_um2=5000" in (empty.reason or ""), mpp


def test_hole_filling_by_area() -> None:
    image = np.full((400, 400, 3), 255, np.uint8)
    image[50:350, 50:350] = (200, 80, 160)
    image[100:110, 100:110] = 255  # small hole: 10×10 px at 8 µm/px = 6,400 µm²
    image[200:300, 200:300] = 255  # big hole (lumen): 640,000 µm²
    cfg = TissueConfig(median_um=0, closing_um=0, min_hole_um2=50_000)
    mask = segment_tissue(image, 8.0, cfg)
    assert mask.mask[105, 105] == 1 and mask.mask[250, 250] == 0
    assert len(mask.holes) == 1
    assert segment_tissue(image, 8.0, cfg.model_copy(update={"min_hole_um2": None})).mask[250, 250] == 1
    assert segment_tissue(image, 8.0, cfg.model_copy(update={"fill_holes": False})).mask[105, 105] == 0


def test_fixed_threshold_and_real_slide(shared_data: Path) -> None:
    slide = open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    otsu = detect_tissue(slide, TissueConfig())
    assert otsu.modality == "brightfield" and otsu.level == 0
    # Single level, 2220×2967 at 0.499 µm/px → read whole and averaged 16× to ~8 µm/px.
    assert otsu.downsample == 16 and otsu.mask.shape == (186, 139)
    assert 0.2 < otsu.mask.mean() < 0.5
    low = detect_tissue(slide, TissueConfig(threshold=5))
    high = detect_tissue(slide, TissueConfig(threshold=120))
    assert low.mask.sum() > otsu.mask.sum() > high.mask.sum()


def test_missing_mpp_raises(tmp_path: Path) -> None:
    path = tmp_path / "nompp.tiff"
    make_synthetic_slide(path, width=512, height=512, mpp=None, tile=128)
    with pytest.raises(MissingMppError):
        detect_tissue(open_slide(path), TissueConfig())
    # 512 px at 2 µm/px = 1 mm: the pieces are well above min_region_um2.
    assert not detect_tissue(open_slide(path, mpp=2.0), TissueConfig()).is_empty


def test_single_level_large_slide_is_read_in_strips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single-level slide is read in bounded strips and averaged, giving the same mask."""
    import pathopeft.wsi.lowres as lowres

    path = tmp_path / "flat.tiff"
    info = make_synthetic_slide(path, width=3000, height=2600, levels=1, seed=5, tile=256)
    slide = open_slide(path)
    whole = detect_tissue(slide, TissueConfig())
    calls: list[tuple[int, int]] = []
    original = slide.read_region

    def spy(location, level, size):  # type: ignore[no-untyped-def]
        calls.append(size)
        return original(location, level, size)

    monkeypatch.setattr(lowres, "STRIP_BYTES", 3000 * 3 * 100)  # ~100 rows per strip
    monkeypatch.setattr(slide, "read_region", spy)
    strips = detect_tissue(slide, TissueConfig())
    assert len(calls) > 10 and max(h for _, h in calls) <= 112
    np.testing.assert_array_equal(strips.mask, whole.mask)
    assert strips.area_um2 == pytest.approx(info.tissue_area_um2(), rel=0.05)


def test_min_region_compares_pixel_counts_not_contour_area() -> None:
    """A 9 × 9 px fragment at 8 µm/px is 81 px = 5,184 µm²; its outline polygon (through the
    boundary pixels' centres) encloses only 8 × 8 = 64 px = 4,096 µm² (issue 13 item 11)."""
    image = np.full((200, 200, 3), 255, np.uint8)
    image[40:49, 40:49] = (200, 80, 160)
    cfg = TissueConfig(min_region_um2=5000, median_um=0, closing_um=0)
    mask = segment_tissue(image, 8.0, cfg)
    assert not mask.is_empty and mask.area_um2 == pytest.approx(81 * 64)
    # The empty-mask reason reports the largest region by the same pixel count.
    dropped = segment_tissue(image, 8.0, cfg.model_copy(update={"min_region_um2": 6000}))
    assert dropped.is_empty and "largest 5184 µm²" in (dropped.reason or "")


def test_hole_area_is_its_pixel_count() -> None:
    """A 6 × 6 px hole (2,304 µm² at 8 µm/px) is kept open by min_hole_um2 = 2,000 (its outline
    polygon through the surrounding tissue pixels would measure 7 × 7 = 3,136 µm²) and filled by
    min_hole_um2 = 2,400."""
    image = np.full((200, 200, 3), 255, np.uint8)
    image[20:180, 20:180] = (200, 80, 160)
    image[100:106, 100:106] = 255
    cfg = TissueConfig(median_um=0, closing_um=0, min_region_um2=0)
    assert segment_tissue(image, 8.0, cfg.model_copy(update={"min_hole_um2": 2000})).mask[102, 102] == 0
    assert segment_tissue(image, 8.0, cfg.model_copy(update={"min_hole_um2": 2400})).mask[102, 102] == 1


def test_flat_slide_is_decoded_once_for_mask_and_thumbnail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a single-level slide too large to read whole, the tissue mask and the thumbnail share
    one strip-wise decode of level 0 (issue 13 item 15): every level-0 row is read once."""
    import pathopeft.wsi.lowres as lowres
    from pathopeft.wsi import render_thumbnail

    path = tmp_path / "flat.tiff"
    make_synthetic_slide(path, width=3000, height=2600, levels=1, seed=5, tile=256)
    slide = open_slide(path)
    rows: list[int] = []
    original = slide.read_region

    def spy(location, level, size):  # type: ignore[no-untyped-def]
        rows.append(size[1])
        return original(location, level, size)

    monkeypatch.setattr(lowres, "STRIP_BYTES", 3000 * 3 * 100)  # level 0 counts as large
    monkeypatch.setattr(slide, "read_region", spy)
    mask = detect_tissue(slide, TissueConfig())
    assert sum(rows) == 2600
    drawn = render_thumbnail(slide, mask, None, tmp_path / "thumb.png", max_px=128)
    assert sum(rows) == 2600, "the thumbnail decoded level 0 again"
    assert max(drawn.shape[:2]) == 128 and (tmp_path / "thumb.png").is_file()
    # A small slide (level 0 within one strip) keeps its full-size thumbnail read.
    monkeypatch.setattr(lowres, "STRIP_BYTES", 64 * 1024 * 1024)
    small = detect_tissue(slide, TissueConfig())
    assert small.source is None
    assert max(render_thumbnail(slide, small, None, tmp_path / "t2.png", max_px=1024).shape[:2]) == 1024
