"""Tile encoders: any timm model, with weights from the hub, a local file, or a seeded random init.

Why timm for everything: one factory (``timm.create_model(name, num_classes=0)``) gives every
ImageNet CNN/ViT and the pathology foundation models published on the Hugging Face hub
(``hf-hub:MahmoodLab/uni`` ...), each with its own preprocessing (``pretrained_cfg`` mean/std,
input size), so the features match what the model was trained on.

Weights are never loaded by unpickling code: safetensors, or ``torch.load(weights_only=True)``.
A :class:`Backbone` carries a ``weights_id`` (``sha256:<hex>`` of a local file, ``hub:<resolved
tag>``, or ``random:<seed>``) and, for hub and random weights, ``tensors_sha256``, a hash of the
loaded tensors. Both end up in every feature bag and in the resume fingerprint, so a later run
knows what made them: a bare hub name (``resnet50``) is recorded as the tag timm resolved it to
(``resnet50.a1_in1k``), and if timm's default tag — or the weights behind it — change, resumed
slides are recomputed instead of mixing two weight sets in one cohort (issue 13 item 9).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathopeft.files import sha256_file

__all__ = [
    "Backbone",
    "BackboneError",
    "OfflineHubError",
    "backbone_dirname",
    "build_backbone",
    "load_weights_file",
    "match_state_dict",
    "resolved_tag",
    "tensors_sha256",
]

log = logging.getLogger(__name__)


class BackboneError(ValueError):
    """The backbone cannot be built as asked (unknown name, bad weights file, key mismatch)."""


class OfflineHubError(BackboneError):
    """Pretrained weights were requested but the hub cannot be reached."""


@dataclass
class Backbone:
    """A feature extractor and what is needed to feed it and to record where it came from."""

    name: str
    model: nn.Module
    weights_id: str  # "sha256:<hex>" | "hub:<resolved tag>" | "random:<seed>"
    input_size: tuple[int, int]  # (H, W) the model expects when ``resize_to="model"``
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    dim: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # sha256 of the loaded tensors (hub and random weights; a local file is its own sha256).
    tensors_sha256: str | None = None

    @property
    def dirname(self) -> str:
        return backbone_dirname(self.name)


def backbone_dirname(name: str) -> str:
    """A folder name for a backbone (``hf-hub:MahmoodLab/uni`` → ``hf-hub_MahmoodLab_uni``)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "backbone"


def build_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
) -> Backbone:
    """Build ``name`` (any timm model) in eval mode with its classifier removed (``num_classes=0``).

    Weight source, in priority order: ``weights`` (a local safetensors / state-dict file; every
    key must match), else ``pretrained`` (the hub; offline → :class:`OfflineHubError` saying what
    to pass instead), else a random init seeded with ``seed`` (identical on every rank).

    ``mean`` / ``std`` / ``interpolation`` replace what timm's config of ``name`` says (its default
    tag's statistics): weights loaded from a file were often trained with other ones (UNI:
    ImageNet statistics, where timm's ``vit_large_patch16_224`` says 0.5 / 0.5).
    """
    if (mean is None) != (std is None):
        raise BackboneError("mean and std go together: give both (or neither)")
    import timm

    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("num_classes", 0)
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=6, cutoff=0.7)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise BackboneError(f"unknown timm model {name!r}{hint}")

    if weights is not None:
        model = _create(name, False, kwargs)
        weights = Path(weights)
        state = load_weights_file(weights)
        match_state_dict(model, state, source=str(weights))
        weights_id = f"sha256:{sha256_file(weights)}"
    elif pretrained:
        model = _create(name, True, kwargs)
        weights_id = f"hub:{resolved_tag(model, name)}"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(name, False, kwargs)
        weights_id = f"random:{seed}"
    model.eval().requires_grad_(False)
    tensors = None if weights is not None else tensors_sha256(model)
    prep = _preprocessing(model, kwargs)
    if mean is not None and std is not None:
        prep["mean"] = tuple(float(v) for v in mean)
        prep["std"] = tuple(float(v) for v in std)
    if interpolation is not None:
        prep["interpolation"] = str(interpolation)
    return Backbone(
        name=name,
        model=model,
        weights_id=weights_id,
        model_kwargs={k: v for k, v in kwargs.items() if k != "num_classes"},
        dim=int(getattr(model, "num_features", 0) or 0),
        tensors_sha256=tensors,
        **prep,
    )


def resolved_tag(model: nn.Module, name: str) -> str:
    """The pretrained tag timm actually loaded for ``name``: ``resnet50`` → ``resnet50.a1_in1k``
    (today's default tag); ``hf-hub:org/repo`` → ``hf-hub:org/repo``. From ``model.pretrained_cfg``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if name.startswith(("hf-hub:", "hf_hub:")) and cfg.get("hf_hub_id"):
        return f"hf-hub:{cfg['hf_hub_id']}"
    arch = str(cfg.get("architecture") or name.split(".")[0])
    tag = cfg.get("tag")
    return f"{arch}.{tag}" if tag else arch


def tensors_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in key order).

    Identifies the weights actually loaded, whatever file or hub revision they came from
    (~0.3 s per 100 MB of weights on one core).
    """
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return digest.hexdigest()


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:  # a model_kwargs key the architecture does not take
        raise BackboneError(f"{name}: invalid model_kwargs {kwargs}: {exc}") from None
    except Exception as exc:
        if not _is_network_error(exc):
            raise BackboneError(f"{name}: cannot build the model: {type(exc).__name__}: {exc}") from exc
        if pretrained:
            raise OfflineHubError(
                f"{name}: pretrained weights could not be downloaded from the hub ({type(exc).__name__}: "
                "offline, unreachable, or a gated model without `hf auth login`). Pass --weights PATH "
                "(a local .safetensors/.pth/.bin file for this architecture) or --no-pretrained "
                "(random init, for testing)."
            ) from None
        raise OfflineHubError(
            f"{name}: the model's config could not be fetched from the hub ({type(exc).__name__}). "
            "Offline, name the timm architecture instead (e.g. vit_large_patch16_224 with "
            "features.model_kwargs) and pass --weights PATH."
        ) from None


def _is_network_error(exc: BaseException) -> bool:
    """Hub/URL failures (offline, DNS, gated repo without token, missing cache) vs real bugs."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    network = {
        "OSError",  # LocalEntryNotFoundError, URLError, ConnectionError, HfHubHTTPError's bases
        "HfHubHTTPError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "TimeoutError",
        "URLError",
        "HTTPError",
    }
    return bool(names & network)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` state dict, by the loader every stage shares (:mod:`pathopeft.weights`)."""
    from pathopeft.weights import WeightsError, read_weight_file

    try:
        return read_weight_file(path)
    except WeightsError as exc:
        raise BackboneError(str(exc)) from None


def match_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model`` strictly by the shared loader: wrapper prefixes stripped,
    EfficientNet-PyTorch keys converted, classifier keys dropped; any missing or unexpected key,
    or a shape mismatch, raises :class:`BackboneError` naming the first offenders."""
    from pathopeft.weights import WeightsError, load_state_into

    try:
        load_state_into(model, state, source=source)
    except WeightsError as exc:
        raise BackboneError(f"{exc} (--backbone, features.model_kwargs)") from None


def _preprocessing(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Mean/std/interpolation from the model's own timm data config; the input size it really takes.

    ``resolve_model_data_config`` reports the pretrained config's input size (224 for most ViTs)
    even when the model was built with another ``img_size``; the built patch embedding wins.
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = tuple(int(v) for v in cfg["input_size"][-2:])
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if "img_size" in kwargs and kwargs["img_size"] is not None:
        value = kwargs["img_size"]
        size = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)[-2:]
    elif img_size is not None:
        size = (int(img_size[0]), int(img_size[1])) if not isinstance(img_size, int) else (img_size, img_size)
    mean = tuple(float(v) for v in cfg["mean"])
    std = tuple(float(v) for v in cfg["std"])
    return {
        "input_size": (int(size[0]), int(size[1])),
        "mean": mean,
        "std": std,
        "interpolation": str(cfg.get("interpolation", "bicubic")),
    }
