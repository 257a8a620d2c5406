"""Local browser viewer for ``pathopeft heatmap`` exports (see notes/HEATMAP_CONTRACT)."""

from pathopeft.viewer.catalog import Catalog, SlideEntry
from pathopeft.viewer.server import create_app

__all__ = ["Catalog", "SlideEntry", "create_app"]
