"""Schema of ``pathopeft tile``: reader + tissue + grid (the WSI stage's), features, output, devices.

Every default works out of the box; ``configs/tile_default.yaml`` lists every key with comments.
Command-line flags override these keys (``--backbone`` → ``features.backbone`` ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pathopeft.config.base import StrictModel
from pathopeft.config.wsi import GridConfig, ReaderConfig, TissueConfig

__all__ = ["FeatureConfig", "OutputConfig", "RunConfig", "SlidesConfig", "TileConfig"]


class SlidesConfig(StrictModel):
    """Where the µm/px comes from for slides whose files do not say."""

    # µm/px of level 0 for slides without metadata (--mpp). Never guessed: without it (or a CSV
    # 'mpp' column) such a slide fails with a clear manifest row.
    mpp: float | None = Field(None, gt=0)
    # Apply `mpp` to every slide, even those whose metadata gives one (a mis-calibrated scanner).
    # Default false: real metadata wins, `mpp` only fills gaps.
    mpp_override: bool = False


class FeatureConfig(StrictModel):
    """The tile encoder and how tiles are fed to it."""

    # false = coords + thumbnails only (--no-features); a later run with features reuses the coords.
    enabled: bool = True
    # Any timm model name (resnet50.tv_in1k, vit_base_patch16_224, hf-hub:MahmoodLab/uni, ...).
    # ImageNet ResNet-50 is the public, ungated baseline (CLAM's default encoder family).
    backbone: str = "resnet50.tv_in1k"
    # Download pretrained weights from the hub (needs network; offline → pass weights or set false).
    pretrained: bool = True
    # Local weights file (.safetensors, or a .pth/.bin/.pt state dict): wins over `pretrained`.
    weights: Path | None = None
    # Seed of the random init when pretrained is false and no weights are given (tests, smoke runs).
    seed: int = 0
    # Extra timm.create_model kwargs, e.g. {init_values: 1.0e-5, dynamic_img_size: true} for UNI.
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    # Input normalisation, RGB in [0, 1]. null = the statistics of timm's config for `backbone`
    # (its default pretrained tag), which is wrong when the weights come from elsewhere: UNI wants
    # ImageNet's [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225], CONCH-style (OpenAI CLIP) encoders
    # [0.48145466, 0.4578275, 0.40821073] / [0.26862954, 0.26130258, 0.27577711], while timm's
    # vit_large_patch16_224 says 0.5 / 0.5. Set both or neither. Part of the resume fingerprint.
    # Per-channel mean of [0, 1] RGB pixels the encoder was trained with; null = timm's config for
    # `backbone` (its default tag). Set it for weights from elsewhere (UNI: ImageNet's).
    mean: tuple[float, float, float] | None = None
    # Per-channel std, set together with `mean`; null = timm's config for `backbone`.
    std: tuple[float, float, float] | None = None
    # Resize interpolation to the model's input size; null = timm's config for `backbone`.
    interpolation: Literal["bilinear", "bicubic"] | None = None
    # Size fed to the model: "model" = the model's own input size from its timm data config
    # (as CLAM/TRIDENT/UNI do: a 256-px tile → 224 px), "tile" = grid.tile_px unchanged,
    # or an int. The resize is one step from the region read off the pyramid.
    resize_to: Literal["model", "tile"] | int = "model"
    # Tiles per forward pass (per device).
    batch_size: int = Field(64, ge=1)
    # DataLoader worker processes reading tiles (per device); 0 reads in the main process.
    # null (default) = what the machine has: the CPU cores this process may use divided by the
    # devices per node, at most 8 (pathopeft.features.runtime.auto_workers).
    num_workers: int | None = Field(None, ge=0)
    # Folder name under OUT/features/; null = the backbone name made filesystem-safe.
    name: str | None = None
    # Storage dtype of the feature matrix in the h5 bag.
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("resize_to")
    @classmethod
    def _positive_size(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 8:
            raise ValueError("resize_to must be 'model', 'tile' or a size in pixels >= 8")
        return value

    @field_validator("mean")
    @classmethod
    def _mean_range(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and not all(0.0 <= v <= 1.0 for v in value):
            raise ValueError("mean is per RGB channel of [0, 1] pixels: three numbers in 0-1")
        return value

    @field_validator("std")
    @classmethod
    def _std_range(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and not all(0.0 < v <= 1.0 for v in value):
            raise ValueError("std is per RGB channel of [0, 1] pixels: three numbers in (0, 1]")
        return value

    @model_validator(mode="after")
    def _mean_with_std(self) -> FeatureConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("features.mean and features.std go together: set both (or neither)")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "/" in value or "\\" in value or value in {".", ".."}):
            raise ValueError("name must be a plain folder name (no path separators)")
        return value


class RunConfig(StrictModel):
    """Devices and precision (Lightning Fabric): the same outputs on 1 CPU or many GPUs / nodes."""

    # auto | cpu | cuda | gpu | mps
    accelerator: str = "auto"
    # Processes per node; slides are sharded across all ranks (rank r takes slides r::world).
    devices: int = Field(1, ge=1)
    # Nodes of a multi-node run (torchrun / SLURM set the ranks); slides are sharded across all of them.
    num_nodes: int = Field(1, ge=1)
    # auto (ddp when devices > 1), ddp, ...
    strategy: str = "auto"
    # auto = bf16-mixed on CUDA (when supported), 32-true elsewhere; or 32-true, bf16-mixed, 16-mixed.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "64-true"] = "auto"


class OutputConfig(StrictModel):
    """Where results go and what a rerun does."""

    # Output folder (manifest.csv, coords/, features/<backbone>/, thumbnails/).
    dir: Path = Path("tiles")
    # Recompute every slide even when complete outputs with the same parameters exist.
    overwrite: bool = False
    # Exit 1 when any slide fails (default: only when every slide fails).
    strict: bool = False
    # Write thumbnails/<slide_id>.png (tissue contours + kept tiles) for QC.
    thumbnails: bool = True
    # Longest side of the thumbnail in pixels.
    thumbnail_px: int = Field(1024, ge=64)
    # Show a progress bar over slides (tiles/s in the postfix).
    progress: bool = True


class TileConfig(StrictModel):
    """Everything ``pathopeft tile`` needs besides the slide list."""

    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    reader: ReaderConfig = Field(default_factory=ReaderConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
