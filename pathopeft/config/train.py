"""Schema of ``pathopeft train CONFIG``: multiple-instance learning on feature bags.

Sections: ``data`` (manifest, bags, classes, tile labels), ``model`` (``model.name`` picks the
model; each model reads its own options section, e.g. ``model.comel``), ``optimizer``, ``schedule``, ``bppl``
(CoMEL's instance loss), ``evaluation``, ``trainer`` (passed to ``lightning.Trainer``), ``run``
(output folder) and ``seed``. Defaults follow the published CoMEL setup (METHODS.md): Adam lr 1e-4,
weight decay 1e-5, cosine schedule, 100 epochs, one bag per step. Relative paths are relative to
the current directory (where ``pathopeft tile`` wrote ``tiles/``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pathopeft.config.base import StrictModel

__all__ = [
    "MODEL_SECTIONS",
    "ABMILOptions",
    "BPPLConfig",
    "CoMELOptions",
    "ContinualConfig",
    "DataConfig",
    "EvaluationConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TransMILOptions",
]

DEFAULT_TRAINER: dict[str, Any] = {
    "max_epochs": 100,  # published CoMEL setup
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "log_every_n_steps": 10,
}


class DataConfig(StrictModel):
    """Which slides, with which labels and splits, and where their feature bags are."""

    manifest: list[str] = Field(
        default_factory=lambda: ["data_manifests/camelyon16_train.csv"],
        description="CSV(s) with slide_id,label[,split|fold]; several are concatenated",
    )
    features_dir: str = Field(
        "tiles/features",
        description="folder of bags (<slide_id>.h5/.pt, CLAM h5_files/ pt_files/), or its parent "
        "holding one <backbone>/ subfolder (the default `pathopeft tile` layout)",
    )
    backbone: str | None = Field(None, description="subfolder of features_dir; null = the only one there")
    coords_dir: str | None = Field(
        "tiles/coords", description="tile coordinates/attrs (<slide_id>.h5) for bags without them; optional"
    )
    # Class names in label order; index 0 is the negative class by default. Manifest labels are these
    # names (any case) or their indices.
    classes: list[str] = Field(default_factory=lambda: ["normal", "tumor"], min_length=2)
    task: str = Field("camelyon16", description="task name: the classifier head's key in the checkpoint")
    negative_class: int | str | None = Field(
        0,
        description="class (index or name) of negative bags: no BPPL loss, all-zero tile labels; "
        "null = no negative class (every class holds tumour)",
    )
    annotations: str | None = Field(
        None, description="folder of <slide_id>.xml|.geojson tumour annotations → tile labels"
    )
    tile_label_threshold: float = Field(0.5, ge=0.0, le=1.0, description="tumour share of a tile's area")
    fold: int | None = Field(None, description="with a fold column: this fold is validation, others train")
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="stratified share of train carved out when no val rows exist"
    )
    allow_missing: bool = Field(False, description="skip slides without a readable bag (with a warning)")
    max_instances_train: int | None = Field(
        None, ge=1, description="random subset of tiles per training step for huge bags; null = all"
    )
    batch_size: int = Field(1, ge=1, description="bags per step (padded + masked when > 1)")
    # DataLoader worker processes reading bags (0 = in the training process).
    num_workers: int = Field(0, ge=0)

    @field_validator("manifest", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        lowered = [c.lower() for c in value]
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"class names must differ (case-insensitively): {value}")
        return value

    @field_validator("negative_class")
    @classmethod
    def _negative_in_classes(cls, value: int | str | None, info: ValidationInfo) -> int | str | None:
        """Checked here (not on the whole section) so an error names data.negative_class and its value."""
        classes = info.data.get("classes")
        if value is not None and classes:
            _negative_index(value, classes)
        return value

    def negative_index(self) -> int | None:
        """The negative class as an index into ``classes`` (None when there is none)."""
        return None if self.negative_class is None else _negative_index(self.negative_class, self.classes)


def _negative_index(neg: int | str, classes: list[str]) -> int:
    if isinstance(neg, int):
        if not 0 <= neg < len(classes):
            raise ValueError(f"negative_class {neg} is not an index into classes {classes}")
        return neg
    lowered = [c.lower() for c in classes]
    if neg.lower() not in lowered:
        raise ValueError(f"negative_class {neg!r} is not one of classes {classes}")
    return lowered.index(neg.lower())


class CoMELOptions(StrictModel):
    """CoMEL: GDAT encoder + ABMIL pooling (METHODS.md)."""

    # Width d of the tile embeddings after the input Linear.
    embed_dim: int = 512
    # Number of GDAT transformer blocks.
    depth: int = Field(2, ge=1)
    # Attention heads per block.
    heads: int = Field(8, ge=1)
    # Hidden width of each block's MLP as a multiple of embed_dim.
    mlp_ratio: float = 4.0
    dropout: float = Field(0.25, ge=0.0, lt=1.0, description="after the input Linear+ReLU")
    block_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="inside the transformer blocks")
    groups: int = Field(256, ge=1, description="G agent tokens")
    grouping: Literal["order", "coords"] = Field("order", description="file order (published) or spatial")
    # Hidden width of the ABMIL pooling's attention network.
    attn_hidden: int = 256
    grad_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute blocks in backward (less memory); auto = for bags ≥ 16384 tiles"
    )


class ABMILOptions(StrictModel):
    """ABMIL baseline options (shared by ``abmil`` and ``abmil_gated``)."""

    # Width of the tile embeddings after the input Linear.
    embed_dim: int = 512
    # Dropout after the input Linear+ReLU.
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    # Hidden width of the attention network.
    attn_hidden: int = 256
    # Dropout inside the attention network.
    attn_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TransMILOptions(StrictModel):
    """TransMIL baseline options (Nyström attention + PPEG)."""

    # Width of the tile embeddings.
    embed_dim: int = 512
    # Attention heads of the Nyström attention layers.
    heads: int = Field(8, ge=1)
    # Nyström landmarks (cost grows with landmarks, not with tiles squared).
    landmarks: int = Field(256, ge=1)
    # Dropout in the attention layers.
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


# model name -> the options section it reads (abmil and abmil_gated differ only in the gate)
MODEL_SECTIONS: dict[str, str] = {
    "comel": "comel",
    "abmil": "abmil",
    "abmil_gated": "abmil",
    "transmil": "transmil",
}


class ModelConfig(StrictModel):
    """The MIL model: ``name`` picks one; each model reads its own options section.

    Every section keeps its defaults, so ``--set model.name=transmil`` switches models cleanly and
    ``--set model.comel.grouping=coords`` tunes CoMEL without touching the others.
    """

    # MIL model: comel (GDAT + ABMIL pooling + BPPL), abmil, abmil_gated or transmil.
    name: Literal["comel", "abmil", "abmil_gated", "transmil"] = "comel"
    in_dim: int | None = Field(None, ge=1, description="feature size; null = read from the bags")
    comel: CoMELOptions = Field(default_factory=CoMELOptions)
    abmil: ABMILOptions = Field(default_factory=ABMILOptions)
    transmil: TransMILOptions = Field(default_factory=TransMILOptions)

    def options(self) -> dict[str, Any]:
        """The selected model's options as plain keyword arguments."""
        return getattr(self, MODEL_SECTIONS[self.name]).model_dump()


class OptimizerConfig(StrictModel):
    # adam or adamw.
    name: Literal["adam", "adamw"] = "adam"
    # Learning rate.
    lr: float = Field(1e-4, gt=0)
    # Weight decay (L2 for adam, decoupled for adamw).
    weight_decay: float = Field(1e-5, ge=0)


class ScheduleConfig(StrictModel):
    """Learning-rate schedule, stepped once per epoch."""

    # cosine decay to min_lr over trainer.max_epochs, or constant.
    name: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, description="linear warm-up before the cosine decay")
    # Learning rate at the end of the cosine decay.
    min_lr: float = Field(0.0, ge=0)


class BPPLConfig(StrictModel):
    """Bag-prototype pseudo-labelling (METHODS.md, CoMEL); used by every model when enabled.

    ``preset: published`` is the authors' continual-code setting exactly (T = 1, raw cosines, both
    labels kept, τ₁ = 0.95); it refuses other values for those keys. Unset keys take the shipped
    defaults, chosen by ``benchmarks/bench_bppl.py`` (``benchmarks/RESULTS.md``) for a 128-wide
    CoMEL: T = 0.1, no centring, both labels (the published T = 1 keeps almost no pseudo-label).
    The best setting depends on the encoder width: the 512-wide ``configs/camelyon_comel.yaml``
    sets its own (centred, weight 0.1), measured the same way.
    """

    # Add the BPPL pseudo-label loss on tile scores (false: bag loss only).
    enabled: bool = True
    weight: float = Field(1.0, ge=0, description="total loss = CE_bag + weight · L_BPPL")
    tau1: float = Field(0.95, ge=0, le=1, description="bag confidence needed for pseudo-labels")
    temperature: float | None = Field(
        None,
        gt=0,
        description="softmax temperature over the two prototype cosines; null = 0.1 (published: 1.0)",
    )
    center: bool | None = Field(
        None,
        description="subtract the prototypes' midpoint before the cosines; null = false",
    )
    keep: Literal["both", "positive"] | None = Field(
        None,
        description="pseudo-labels that train the scores: both (tumour and normal) or positive; null = both",
    )
    preset: Literal["published"] | None = Field(
        None, description="published = T 1.0, center false, keep both, tau1 0.95 (the authors' code)"
    )

    @model_validator(mode="after")
    def _apply_preset(self) -> BPPLConfig:
        """Refuse settings that contradict the preset (unset keys are filled by :meth:`effective`)."""
        from pathopeft.mil.bppl import PUBLISHED

        if self.preset == "published":
            clash = [
                f"bppl.{key}={getattr(self, key)!r}"
                for key in PUBLISHED
                if key != "tau1" and getattr(self, key) is not None and getattr(self, key) != PUBLISHED[key]
            ]
            if self.tau1 != PUBLISHED["tau1"]:
                clash.append(f"bppl.tau1={self.tau1!r}")
            if clash:
                raise ValueError(
                    f"bppl.preset=published fixes {', '.join(PUBLISHED)}; remove {', '.join(clash)}"
                )
        return self

    def effective(self) -> dict[str, Any]:
        """Every BPPL setting with the unset ones filled from the preset or the shipped defaults."""
        from pathopeft.mil.bppl import PUBLISHED, SHIPPED

        chosen = PUBLISHED if self.preset == "published" else SHIPPED
        out = self.model_dump()
        for key, value in chosen.items():
            if key != "tau1" and out[key] is None:
                out[key] = value
        return out


class ContinualConfig(StrictModel):
    """How ``pathopeft add-task`` (and a pipeline) adds this task to a trained model (METHODS.md, OWLoRA).

    Ignored by a plain ``pathopeft train`` of a first task, except that a pipeline trains every
    task with the same ``method``.
    """

    method: Literal["owlora", "lora", "finetune", "ewc", "replay", "joint"] = Field(
        "owlora", description="owlora | lora (per-task LoRA) | finetune | ewc (online) | replay | joint"
    )
    rank: int = Field(16, ge=1, description="adapter rank per added task (owlora, lora)")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="layer-name regex or suffix → rank, e.g. {qkv: 48}"
    )
    protect_base: bool = Field(
        True, description="owlora, 1st added task: project off the base weight's top singular subspace"
    )
    base_energy: float = Field(0.99, gt=0, le=1, description="energy of that protected subspace")
    ortho_lambda: float = Field(1.0, ge=0, description="λ of the orthogonality penalty (owlora)")
    projection: bool = Field(True, description="owlora: gradient projection off earlier tasks' subspaces")
    project_updates: bool = Field(True, description="owlora: also project each optimizer step's update")
    alpha: float | None = Field(None, gt=0, description="lora: α (default: the rank, i.e. scale 1)")
    adapter_lr: float | None = Field(
        None,
        gt=0,
        description="owlora, lora: learning rate of an added task's adapter and head "
        "(default: optimizer.lr); adapters starting at B = 0 usually want a larger one",
    )
    ewc_lambda: float = Field(100.0, ge=0, description="ewc: penalty weight λ")
    ewc_gamma: float = Field(1.0, ge=0, le=1, description="ewc: decay of the earlier Fisher (online EWC)")
    buffer_size: int = Field(30, ge=1, description="replay: reservoir buffer of earlier-task bags")
    evaluate_earlier: bool = Field(
        True, description="after training, evaluate every earlier task whose bags are still readable"
    )

    def strategy(self, seed: int = 0) -> dict[str, Any]:
        """The strategy options the Lightning module records (plain types)."""
        out = self.model_dump(exclude={"evaluate_earlier"})
        out["name"] = out.pop("method")
        for optional in ("alpha", "adapter_lr"):
            if out[optional] is None:
                out.pop(optional)
        out["seed"] = seed
        return out


class EvaluationConfig(StrictModel):
    instance_threshold: float = Field(0.5, ge=0, le=1, description="min–max score ≥ this = tumour tile")
    write_predictions: bool = Field(True, description="per-tile test predictions in predictions/")


class RunConfig(StrictModel):
    # Run folder name: the run is written to <root>/<name>/.
    name: str = "comel_camelyon16"
    # Folder holding the run folders.
    root: str = "runs"
    # Replace a run folder that already holds a run (otherwise that is an error).
    overwrite: bool = False
    monitor: str = Field("val/loss", description="metric that picks best.ckpt")
    # Whether a lower (min) or higher (max) monitor value is better.
    monitor_mode: Literal["min", "max"] = "min"


class TrainConfig(StrictModel):
    """Everything ``pathopeft train`` needs."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    bppl: BPPLConfig = Field(default_factory=BPPLConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    # Passed to lightning.Trainer unchanged (devices, strategy, num_nodes, precision, max_epochs, ...);
    # keys given replace the defaults one by one and are checked against its signature.
    trainer: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_TRAINER))
    run: RunConfig = Field(default_factory=RunConfig)
    # Seed of the split carve-out, model init, bag order and subsampling.
    seed: int = 0

    @field_validator("trainer", mode="before")
    @classmethod
    def _merge_trainer_defaults(cls, value: Any) -> Any:
        """Keys given by the user replace the defaults one by one (``--set trainer.devices=2``)."""
        if value is None:
            return dict(DEFAULT_TRAINER)
        if not isinstance(value, dict):
            raise ValueError("trainer must be a mapping of lightning.Trainer arguments")
        return {**DEFAULT_TRAINER, **value}

    @field_validator("trainer")
    @classmethod
    def _valid_trainer(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pathopeft.runs import validate_trainer_kwargs

        try:
            return validate_trainer_kwargs(value)
        except Exception as exc:  # ConfigError → a pydantic error with the key's path
            raise ValueError(str(exc)) from None
