"""Localisation exports of a trained MIL checkpoint: QuPath GeoJSON, overlays, pyramidal TIFF, FROC.

Modules: :mod:`~pathopeft.heatmaps.scoring` (the one place the model runs, and the shown scale),
:mod:`~pathopeft.heatmaps.raster` (scores on a coarse level-0 grid, regions),
:mod:`~pathopeft.heatmaps.geojson`, :mod:`~pathopeft.heatmaps.overlay`,
:mod:`~pathopeft.heatmaps.pyramid`, :mod:`~pathopeft.heatmaps.ome`,
:mod:`~pathopeft.heatmaps.froc` (CAMELYON16 FROC via MONAI), :mod:`~pathopeft.heatmaps.processor`
(the per-slide export behind ``pathopeft heatmap``). The output layout is HEATMAP_CONTRACT.md.
"""

from pathopeft.heatmaps.processor import MANIFEST_COLUMNS, HeatmapResult, run_heatmaps
from pathopeft.heatmaps.scoring import BagScores, display_scores, score_bag

__all__ = ["MANIFEST_COLUMNS", "BagScores", "HeatmapResult", "display_scores", "run_heatmaps", "score_bag"]
