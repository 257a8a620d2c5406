"""Parameter fingerprints: how a rerun knows an output was made with the same settings.

A fingerprint is a short hash of the settings that change an output's content, stored in the
output's h5 attributes. Resume compares it with the current run's; any difference recomputes (and
is logged) — outputs made with other parameters are never silently reused.

Tiling depends on the tissue and grid parameters, the level-0 µm/px actually used, and the source
file (its size, which changes when a slide is replaced). It does not depend on the reader backend
(the fast TIFF reader and OpenSlide read the same pixels at whole level pixels, and within 3/255
where both resample a sub-pixel position, see ``pathopeft.wsi.tiff_backend``) or on batch size /
devices. Features add the encoder (name, kwargs, weights id — for hub weights the resolved tag —
and the sha256 of the loaded tensors), preprocessing (mean, std, interpolation, input size) and
numeric precision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["TILING_VERSION", "features_fingerprint", "source_size", "tiling_fingerprint"]

# Bump when the tissue/grid algorithm changes what it produces for the same parameters.
# 2: region/hole sizes are pixel counts, not contour areas (issue 13 item 11).
TILING_VERSION = 2


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def source_size(path: str | Path) -> int:
    """Bytes of a slide file, or of all files of a slide folder (DICOM)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else -1


def tiling_fingerprint(tissue: dict[str, Any], grid: dict[str, Any], mpp: float, size: int) -> str:
    return _digest(
        {
            "version": TILING_VERSION,
            "tissue": tissue,
            "grid": grid,
            "mpp": round(float(mpp), 6),
            "source_bytes": int(size),
        }
    )


def features_fingerprint(tiling: str, encoder: dict[str, Any]) -> str:
    return _digest({"tiling": tiling, "encoder": encoder})
