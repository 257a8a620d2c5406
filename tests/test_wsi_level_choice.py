"""Level choice tolerates floor-rounded pyramid downsamples (issue 13 item 6)."""

from types import SimpleNamespace

from pathopeft.wsi.slide import LEVEL_TOLERANCE, Slide


def _best(downsamples: list[float], target: float) -> int:
    fake = SimpleNamespace(level_downsamples=downsamples)
    return Slide.best_level_for_downsample(fake, target)  # type: ignore[arg-type]


def test_floor_rounded_downsample_picks_the_coarser_level() -> None:
    # 0.998 µm/px target on a 0.5 µm/px slide whose level 1 is 2.00034: read level 1, not level 0.
    assert _best([1.0, 2.00034, 8.0014], 0.998 / 0.5) == 1


def test_level_more_than_tolerance_coarser_is_not_used() -> None:
    assert _best([1.0, 2.1], 2.0) == 0
    assert _best([1.0, 2.0 * (1 + LEVEL_TOLERANCE * 0.9)], 2.0) == 1
