"""features stage: tile encoders and the ``pathopeft tile`` processor.

from pathopeft.features import build_backbone, FeatureExtractor, run_tile
backbone = build_backbone("resnet50.tv_in1k", pretrained=False)   # any timm model
extractor = FeatureExtractor(backbone, batch_size=64, num_workers=2)
feats = extractor.extract(slide, grid.coords, grid.level, grid.read_size, grid.tile_px)  # (N, D)

summary = run_tile(["slides/"], TileConfig())   # the whole command: manifest, coords, bags
"""

import importlib
from typing import Any

# Exports are imported on first use (PEP 562): ``pathopeft tile --no-features`` reaches
# ``pathopeft.features.pipeline`` through this package and must not pay for torch and timm.
_EXPORTS = {
    "Backbone": "backbones",
    "BackboneError": "backbones",
    "OfflineHubError": "backbones",
    "backbone_dirname": "backbones",
    "build_backbone": "backbones",
    "load_weights_file": "backbones",
    "Preprocess": "dataset",
    "TileDataset": "dataset",
    "TileLoaderPool": "dataset",
    "make_tile_loader": "dataset",
    "FeatureExtractor": "extract",
    "SlideRecord": "manifest",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "TileSummary": "pipeline",
    "run_tile": "pipeline",
    "OutputLayout": "processor",
    "SlideProcessor": "processor",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pathopeft.features' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pathopeft.features.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "Backbone",
    "BackboneError",
    "FeatureExtractor",
    "OfflineHubError",
    "OutputLayout",
    "Preprocess",
    "SlideProcessor",
    "SlideRecord",
    "TileDataset",
    "TileLoaderPool",
    "TileSummary",
    "backbone_dirname",
    "build_backbone",
    "load_weights_file",
    "make_tile_loader",
    "read_manifest",
    "run_tile",
    "write_manifest",
]
