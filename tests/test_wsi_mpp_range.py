"""Absurd µm/px metadata is treated as missing so ``--mpp`` applies (issue 13 item 12)."""

import pytest

from pathopeft.wsi.openslide_backend import PLAUSIBLE_MPP, mpp_from_properties


@pytest.mark.parametrize("value", ["352.78", "0.001"])
def test_absurd_mpp_metadata_is_missing(value: str) -> None:
    assert mpp_from_properties({"openslide.mpp-x": value, "openslide.mpp-y": value}) is None


def test_plausible_mpp_metadata_is_kept() -> None:
    assert mpp_from_properties({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527"}) == pytest.approx(
        0.2527
    )
    assert PLAUSIBLE_MPP[0] < 0.1 and PLAUSIBLE_MPP[1] >= 10


def test_absurd_tiff_resolution_is_missing() -> None:
    # 72 dpi ("inch"): 352.78 µm/px, a screen default, not a scan resolution.
    assert mpp_from_properties({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "72"}) is None
