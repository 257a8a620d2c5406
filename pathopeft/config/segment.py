"""Config schemas of ``pathopeft segment train`` and ``pathopeft segment compare``.

One YAML file describes a whole run: where the images are (``data``), which encoder and decoder
(``model``), how the encoder is tuned (``adapter``: a PEFT method with explicit rank settings, a
frozen encoder, or full fine-tuning), the loss, the optimizer, the ``trainer`` section passed to
``lightning.Trainer`` unchanged, and the run folder. ``compare`` adds a list of settings and a
learning-rate sweep on top of the same sections, so a comparison shares data, split and seed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pathopeft.config.base import ConfigError, StrictModel, parse_override

__all__ = [
    "SegAdapterConfig",
    "SegAugmentConfig",
    "SegCompareSection",
    "SegCompareSetting",
    "SegDataConfig",
    "SegLossConfig",
    "SegModelConfig",
    "SegOptimizerConfig",
    "SegRunConfig",
    "SegmentCompareConfig",
    "SegmentTrainConfig",
]

# Adapter options that set a method's size. SALT's repository defaults give a larger trainable share
# than its paper reports, so a config must state these (``adapter.options``) rather than inherit them.
# Option names are pathopeft.adapters' own (LoraConfig, SaltConfig, SvfitConfig, WaraConfig).
RANK_OPTIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    # each inner tuple: "at least one of these keys"
    "lora": (("rank",),),
    "salt": (("rank", "ratio"), ("lora_rank",)),
    "svfit": (("energy", "max_rank"),),
    "wara": (("rank",),),
    "owlora": (("rank",),),
}


class SegAugmentConfig(StrictModel):
    """Train-time augmentation (albumentations); evaluation never augments."""

    flip: bool = True  # horizontal + vertical flips: tissue has no canonical orientation
    rotate90: bool = True  # random multiples of 90°, lossless on the pixel grid
    # Brightness/contrast/saturation jitter strength (0 = off); hue jitter is a quarter of it.
    color_jitter: float = Field(0.1, ge=0, le=1)
    # Probability of H&E stain augmentation (albumentations HEStain: perturbs the stain matrix, the
    # main source of colour shift between labs and scanners). 0 = off; set 0 for non-H&E images.
    stain_jitter: float = Field(0.3, ge=0, le=1)
    # Random rescale range applied before cropping, e.g. [0.8, 1.25]; [1, 1] = off.
    scale: tuple[float, float] = (0.8, 1.25)

    @field_validator("scale")
    @classmethod
    def _scale_order(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError("scale must be [low, high] with 0 < low <= high")
        return value


class SegDataConfig(StrictModel):
    """Images and masks, how they are split, and how large images meet the model input."""

    # A folder holding ``images_dir`` and ``masks_dir`` (files matched by stem: PNG, TIFF, JPEG).
    # Set it on the command line: --set data.root=../shared/data/segmentation/monuseg_train_sample
    root: str | None = None
    # Or a CSV with columns image, mask[, split] (paths relative to the CSV); overrides ``root``.
    csv: str | None = None
    # Subfolder of root holding the images.
    images_dir: str = "images"
    # Subfolder of root holding the masks (same file stems as the images).
    masks_dir: str = "masks"
    # Mask file stem = image stem + this suffix (e.g. "_mask" for a.png ↔ a_mask.png).
    mask_suffix: str = ""
    # Classes including background. 2 = binary: masks may hold 0/1 or 0/255.
    num_classes: int = Field(2, ge=2, le=65535)
    # Optional pixel value of each class in the mask files, in class order (e.g. [0, 128, 255]);
    # default: binary 0/1 or 0/255, multi-class the values 0..num_classes-1. Predicted masks are
    # written back in the same values (binary: 0/255).
    label_values: list[int] | None = None
    # Seeded split used when no split column is given. Val picks the checkpoint and the learning
    # rate; test is never used for a choice.
    val_fraction: float = Field(0.2, gt=0, lt=1)
    # Share of images held out for the final test (seeded split, by group when given).
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int | None = None  # None: the run's seed
    # tile: train on random crops of model.img_size, evaluate/predict by sliding window (full
    # resolution, nothing lost on 1000-px tiles); resize: squash each image to img_size.
    mode: Literal["tile", "resize"] = "tile"
    overlap: float = Field(0.25, ge=0, lt=1)  # sliding-window overlap at evaluation/prediction
    sw_batch_size: int = Field(8, ge=1)  # windows per forward pass in sliding-window inference
    # Resample every image and mask by this factor when read (0.5: 40× → 20×). Metrics are computed
    # at that scale; predicted masks are resized back to the input's size.
    rescale: float = Field(1.0, gt=0, le=4)
    # Random crops drawn from each training image per epoch (tile mode): small sets of large
    # images would otherwise give a handful of steps per epoch.
    samples_per_image: int = Field(4, ge=1)
    # Crops (tile mode) or images (resize mode) per training step.
    batch_size: int = Field(4, ge=1)
    # DataLoader worker processes.
    num_workers: int = Field(2, ge=0)
    augment: SegAugmentConfig = SegAugmentConfig()

    @model_validator(mode="after")
    def _check(self) -> SegDataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave images for training (< 1)")
        if self.label_values is not None:
            if len(self.label_values) != self.num_classes:
                raise ValueError(
                    f"label_values lists {len(self.label_values)} values for num_classes={self.num_classes}"
                )
            if len(set(self.label_values)) != len(self.label_values):
                raise ValueError("label_values must be distinct")
        return self


class SegModelConfig(StrictModel):
    """Encoder (any timm model) and decoder."""

    # timm name: a ViT (vit_small_patch16_224, ...), a SAM image encoder (samvit_base_patch16,
    # samvit_large_patch16, samvit_huge_patch16) or a CNN (resnet50, convnext_tiny, ...). A hub
    # tag may be added (vit_small_patch16_224.augreg_in21k) for weights: hub.
    encoder: str = "samvit_base_patch16"
    # "hub": timm's pretrained weights (downloaded/cached by timm); "none": random init from the
    # run's seed (for tests and ablations); otherwise a local file (.pth/.pt/.bin/.safetensors),
    # e.g. SAM's sam_vit_b_01ec64.pth or MedSAM's medsam_vit_b.pth ("image_encoder." keys are
    # converted by timm's own SAM filter; positional embeddings are resized to img_size).
    weights: str = "none"
    # Model input side in pixels. ViTs/SAM are built at this size (SAM's 1024 is expensive and
    # unnecessary for 256-px pathology crops; positional embeddings are resampled).
    img_size: int = Field(256, ge=16)
    # Extra timm.create_model keyword arguments (e.g. {drop_path_rate: 0.1}).
    encoder_kwargs: dict[str, Any] = Field(default_factory=dict)
    # auto: unetr for ViT/SAM (plain, single-stride token grids), unet for CNNs (feature pyramids).
    # unetr: MONAI UNETR blocks over 4 intermediate blocks + an image skip; pup: progressive
    # upsampling of the last block (SETR-PUP); unet / fpn: segmentation-models-pytorch decoders.
    decoder: Literal["auto", "unetr", "pup", "unet", "fpn"] = "auto"
    # Decoder width: UNETR feature_size (MONAI default 16); PUP uses 16×, smp unet widths 16×…1×
    # (256…16, smp default), fpn 16×/8× (256/128).
    decoder_channels: int = Field(16, ge=1)
    # ViT blocks feeding the UNETR skips (4 indices, negative counts from the end);
    # default: evenly spaced, ending with the last block (3, 6, 9, 12 of 12 as in UNETR).
    feature_layers: list[int] | None = None


class SegAdapterConfig(StrictModel):
    """How the encoder is tuned: a PEFT adapter, frozen (decoder only), or full fine-tuning."""

    # adapter: train a PEFT adapter (method, targets, options); frozen: decoder only; full: fine-tune the
    # whole encoder.
    mode: Literal["adapter", "frozen", "full"] = "adapter"
    # pathopeft.adapters method: lora, salt, svfit, wara (used when mode = adapter). Their options:
    # lora {rank, alpha, dropout}; salt {rank | ratio, lora_rank, reg}; svfit {energy, max_rank};
    # wara {rank, alpha, levels, wavelet, shared_factors, dropout} (see pathopeft.adapters).
    method: str = "salt"
    # Full-match regex on the encoder's module names (timm ViT/SAM: blocks.N.attn.qkv, .attn.proj,
    # .mlp.fc1, .mlp.fc2). The default is SALT's official setting: every block's attention and MLP.
    targets: str = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
    # Method options passed to pathopeft.adapters.attach, e.g. SALT {rank: 16, lora_rank: 4}.
    # Rank settings must be explicit (the trainable share is logged at the start of training).
    options: dict[str, Any] = Field(default_factory=dict)
    # Also train every normalisation layer of the encoder (LayerNorm/BatchNorm/GroupNorm).
    train_norms: bool = False
    # Full-match regexes on encoder parameter names to train as well, e.g. ["pos_embed", ".*rel_pos_[hw]"].
    extra_trainable: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _explicit_ranks(self) -> SegAdapterConfig:
        if self.mode != "adapter":
            return self
        from pathopeft.adapters import make_config

        make_config(self.method, **self.options)  # unknown method/option → error naming it
        for group in RANK_OPTIONS.get(self.method, ()):
            if not any(key in self.options for key in group):
                raise ValueError(
                    f"adapter.options must set {' or '.join(group)} for method {self.method!r} "
                    "(rank settings are explicit so the trainable share is a choice, not a default)"
                )
        return self


class SegLossConfig(StrictModel):
    """MONAI DiceCELoss or DiceFocalLoss on softmax outputs."""

    # dice_ce (Dice + cross-entropy) or dice_focal (Dice + focal).
    name: Literal["dice_ce", "dice_focal"] = "dice_ce"
    # Weight of the Dice term.
    lambda_dice: float = Field(1.0, ge=0)
    lambda_other: float = Field(1.0, ge=0)  # weight of the CE (dice_ce) or focal (dice_focal) term
    # Focusing parameter of the focal term (dice_focal only).
    focal_gamma: float = Field(2.0, ge=0)
    # Include the background channel in the Dice term (MONAI default); false focuses on foreground.
    include_background: bool = True


class SegOptimizerConfig(StrictModel):
    """AdamW over the trainable parameters, with warm-up + cosine decay per step."""

    # Learning rate of the adapter (or encoder) parameters.
    lr: float = Field(1e-4, gt=0)
    # Learning rate of the decoder; null = same as lr. A fresh decoder often wants more than an adapter.
    decoder_lr: float | None = Field(None, gt=0)
    # AdamW decoupled weight decay.
    weight_decay: float = Field(1e-2, ge=0)
    # AdamW betas.
    betas: tuple[float, float] = (0.9, 0.999)
    # cosine: warm-up then cosine decay per step; constant: warm-up then flat.
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.05, ge=0, lt=1)  # of all optimizer steps


class SegRunConfig(StrictModel):
    """Where the run folder goes: ``<root>/<name>/``."""

    # Folder holding the run folders.
    root: str = "runs"
    # Run folder name: <root>/<name>/.
    name: str = "segment"
    overwrite: bool = False  # replace an existing run folder of the same name


def _default_trainer() -> dict[str, Any]:
    return {"max_epochs": 50, "accelerator": "auto", "devices": 1, "log_every_n_steps": 10}


class SegmentTrainConfig(StrictModel):
    """``pathopeft segment train CONFIG``."""

    data: SegDataConfig = SegDataConfig()
    model: SegModelConfig = SegModelConfig()
    adapter: SegAdapterConfig = SegAdapterConfig(options={"ratio": 0.1, "lora_rank": 8})
    loss: SegLossConfig = SegLossConfig()
    optimizer: SegOptimizerConfig = SegOptimizerConfig()
    # Passed to lightning.Trainer unchanged (devices, strategy, precision e.g. bf16-mixed,
    # max_epochs, accumulate_grad_batches, ...); checked against its signature.
    trainer: dict[str, Any] = Field(default_factory=_default_trainer)
    run: SegRunConfig = SegRunConfig()
    seed: int = 0  # split, augmentation order, random-init encoder and decoder init

    @field_validator("trainer")
    @classmethod
    def _trainer_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pathopeft.runs import validate_trainer_kwargs

        for key in ("max_epochs", "max_steps"):
            if value.get(key) == 0:
                raise ValueError(f"trainer.{key}=0 trains nothing (no checkpoint to test or predict with)")
        return validate_trainer_kwargs(value)


# What every ``compare`` setting shares, so the table compares tuning methods and nothing else:
# the images, their split, how they are evaluated, the seed; ``optimizer.lr`` belongs to the sweep
# and ``run`` to compare itself. A setting's ``overrides`` may not touch these.
COMPARE_SHARED_KEYS = (
    "seed",
    "data.root",
    "data.csv",
    "data.images_dir",
    "data.masks_dir",
    "data.mask_suffix",
    "data.num_classes",
    "data.label_values",
    "data.val_fraction",
    "data.test_fraction",
    "data.split_seed",
    "data.mode",
    "data.rescale",
    "data.overlap",
    "optimizer.lr",
    "run",
)


class SegCompareSetting(StrictModel):
    """One contender of ``segment compare``: an adapter section (replacing the base one)."""

    # Label of the setting in the table (letters, digits, - _ .).
    name: str
    # The adapter section of this setting (replaces the base adapter section).
    adapter: SegAdapterConfig
    lrs: list[float] | None = None  # its learning-rate sweep; null = compare.lrs
    # Further KEY=VALUE overrides of the base config for this setting only (e.g. optimizer.decoder_lr=1e-3).
    overrides: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
            raise ValueError("setting names may hold letters, digits, '-', '_' and '.' only")
        return value

    @field_validator("overrides")
    @classmethod
    def _fair_overrides(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                key = ".".join(parse_override(text)[0])
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            for shared in COMPARE_SHARED_KEYS:
                if key == shared or key.startswith(shared + ".") or shared.startswith(key + "."):
                    hint = (
                        "list its learning rates in lrs"
                        if shared == "optimizer.lr"
                        else "set it in the base sections"
                    )
                    raise ValueError(
                        f"override {text!r} changes {shared}, which every setting shares for a fair "
                        f"comparison (same data, split, evaluation and seed); {hint}"
                    )
        return value


class SegCompareSection(StrictModel):
    """The contenders and the default learning-rate sweep."""

    # Every setting is trained at each learning rate and reported at its best validation Dice.
    lrs: list[float] = Field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    # The contenders: each a name, an adapter section and optionally its own lrs and overrides.
    settings: list[SegCompareSetting] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> SegCompareSection:
        if not self.settings:
            raise ValueError("compare.settings is empty")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"compare.settings names repeat: {names}")
        for lrs in [self.lrs] + [s.lrs for s in self.settings if s.lrs is not None]:
            if not lrs or any(lr <= 0 for lr in lrs):
                raise ValueError("learning-rate sweeps must be non-empty lists of positive numbers")
        return self


class SegmentCompareConfig(SegmentTrainConfig):
    """``pathopeft segment compare CONFIG``: the train sections are the shared base."""

    compare: SegCompareSection
