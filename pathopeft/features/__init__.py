"""features stage: tile encoders and the ``pathopeft tile`` processor.

from pathopeft.features import build_backbone, FeatureExtractor, run_tile
backbone = build_backbone("resnet50.tv_in1k", pretrained=False)   # any timm model
extractor = FeatureExtractor(backbone, batch_size=64, num_workers=2)
feats = extractor.extract(slide, grid.coords, grid.level, grid.read_size, grid.tile_px)  # (N, D)

summary = run_tile(["slides/"], TileConfig())   # the whole command: manifest, coords, bags
"""

from pathopeft.features.backbones import (
    Backbone,
    BackboneError,
    OfflineHubError,
    backbone_dirname,
    build_backbone,
    load_weights_file,
)
from pathopeft.features.dataset import Preprocess, TileDataset, TileLoaderPool, make_tile_loader
from pathopeft.features.extract import FeatureExtractor
from pathopeft.features.manifest import SlideRecord, read_manifest, write_manifest
from pathopeft.features.pipeline import TileSummary, run_tile
from pathopeft.features.processor import OutputLayout, SlideProcessor

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
