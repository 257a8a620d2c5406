"""Image encoders for segmentation: any timm model, by name, with hub, local or no weights.

Two kinds, told apart by timm's own ``feature_info``:

* **plain** — ViTs and SAM image encoders (``samvit_*``): one token grid at one stride; the encoder
  returns the outputs of a few blocks (``forward_intermediates``) for a UNETR or PUP decoder.
* **pyramid** — CNNs (``features_only``): feature maps at strides 2…32 for smp decoders; the
  input image is prepended as the stride-1 "feature", as segmentation-models-pytorch expects.

Local weight files go through the loader every stage shares (:mod:`pathopeft.weights`):
``torch.load(weights_only=True)`` or safetensors, wrappers and prefixes removed (DINO ``teacher``,
``module.``), EfficientNet-PyTorch keys converted to timm's, and the model family's own timm key
filter — for ``samvit_*`` that is timm's SAM conversion,
so the official SAM and MedSAM checkpoints (``image_encoder.*`` keys, ``mlp.lin1``) load as they
are. Positional embeddings are then resized to ``img_size`` (SAM is trained at 1024 px).

Every encoder gets a *fingerprint* (SHA-256 of its weights after loading): checkpoints record it,
and loading a checkpoint onto an encoder with another fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.files import sha256_file
from pathopeft.weights import WeightsError, fit_state_dict, read_weight_file, timm_filter

__all__ = [
    "EncoderError",
    "EncoderRecord",
    "SegEncoder",
    "build_encoder",
    "encoder_kind",
    "fingerprint",
    "load_weight_file",
    "timm_filter",
]

log = logging.getLogger(__name__)


class EncoderError(ValueError):
    """An encoder that cannot be built as configured (unknown name, weights that do not fit)."""


@dataclass
class EncoderRecord:
    """What a checkpoint stores to rebuild (and recognise) the frozen encoder."""

    name: str
    weights: str  # "none" | "hub" | the path as configured
    weights_path: str | None = None  # absolute path of a local file
    weights_sha256: str | None = None
    seed: int = 0  # random init ("none") is rebuilt from this seed
    img_size: int = 224
    kwargs: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class SegEncoder(nn.Module):
    """A timm model that returns a list of NCHW feature maps.

    ``model`` is the timm module adapters are attached to (names like ``blocks.3.attn.qkv``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        channels: list[int],
        reductions: list[int],
        layers: list[int] | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        record: EncoderRecord,
    ) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.channels = channels
        self.reductions = reductions
        self.layers = layers
        self.mean, self.std = mean, std
        self.record = record

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "plain":
            unique = sorted(set(self.layers or []))
            feats = self.model.forward_intermediates(
                x, indices=unique, norm=False, output_fmt="NCHW", intermediates_only=True
            )
            by_layer = dict(zip(unique, feats))
            return [by_layer[i] for i in self.layers or []]
        return [x, *self.model(x)]


def encoder_kind(name: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """ "plain" when every feature of the model has the same stride (ViT, SAM), else "pyramid"."""
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, **dict(kwargs or {}))
    except Exception as exc:
        raise EncoderError(f"model.encoder={name!r}: timm cannot build it ({exc})") from exc
    reductions = {info["reduction"] for info in getattr(probe, "feature_info", [])}
    if len(reductions) == 1 and hasattr(probe, "forward_intermediates"):
        return "plain"
    if len(reductions) > 1:
        return "pyramid"
    raise EncoderError(f"model.encoder={name!r}: timm gives no feature_info; cannot segment with it")


def build_encoder(
    name: str,
    weights: str = "none",
    *,
    img_size: int = 224,
    kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    layers: list[int] | None = None,
    kind: str = "auto",
) -> SegEncoder:
    """Build the encoder; ``weights`` is "none" (seeded random init), "hub", or a local file."""
    kwargs = dict(kwargs or {})
    kind = encoder_kind(name, kwargs) if kind == "auto" else kind
    create_kwargs: dict[str, Any] = dict(kwargs)
    if kind == "plain":
        create_kwargs.setdefault("img_size", img_size)
        create_kwargs.setdefault("num_classes", 0)
    else:
        create_kwargs["features_only"] = True
    record = EncoderRecord(name=name, weights=weights, seed=seed, img_size=img_size, kwargs=kwargs)
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(name, pretrained=False, **create_kwargs)
    elif weights == "hub" and kind == "pyramid":
        model = _create(name, pretrained=True, **create_kwargs)
    elif weights == "hub":
        # built at the checkpoint's own size first: timm's SAM filter does not resize positions
        native = _create(name, pretrained=True, **{k: v for k, v in create_kwargs.items() if k != "img_size"})
        model = _from_state(name, native.state_dict(), create_kwargs, source=f"hub weights of {name}")
        del native
    else:
        path = Path(weights).expanduser().resolve()
        record.weights_path, record.weights_sha256 = str(path), sha256_file(_existing(path))
        model = _from_state(name, load_weight_file(path), create_kwargs, source=str(path))
    if kind == "plain":
        depth = len(model.feature_info)
        layers = _resolve_layers(layers, depth, name)
        model.prune_intermediate_layers(sorted(set(layers)), prune_norm=True, prune_head=True)
        channels = [model.feature_info[i]["num_chs"] for i in layers]
        reductions = [model.feature_info[i]["reduction"] for i in layers]
    else:
        channels = [int(create_kwargs.get("in_chans", 3)), *model.feature_info.channels()]
        reductions = [1, *model.feature_info.reduction()]
    data_cfg = timm.data.resolve_model_data_config(model)
    record.fingerprint = fingerprint(model)
    return SegEncoder(
        model,
        kind=kind,
        channels=channels,
        reductions=reductions,
        layers=layers if kind == "plain" else None,
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
        record=record,
    )


def _from_state(
    name: str, state: dict[str, torch.Tensor], create_kwargs: dict[str, Any], *, source: str
) -> nn.Module:
    """Build ``name`` from a state dict fitted by the shared loader (prefixes, EfficientNet-PyTorch
    conversion, timm's key filter, positional tables resized), every key and shape checked against
    the whole model before timm builds the (possibly features-only) encoder from it."""
    with torch.device("meta"):
        probe = timm.create_model(
            name, pretrained=False, **{**create_kwargs, "features_only": False, "num_classes": 0}
        )
    try:
        state = fit_state_dict(probe, state, source=source, adjust=_fit_positional)
    except WeightsError as exc:
        raise EncoderError(f"{exc} (model.encoder={name!r})") from exc
    try:
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **create_kwargs
        )
    except RuntimeError as exc:
        raise EncoderError(f"{source}: weights do not fit {name}: {_short(exc)}") from exc


# The official image-encoder checkpoints a medical user downloads once, by timm SAM family.
_SAM_FILES = {
    "samvit_base": "sam_vit_b_01ec64.pth (SAM ViT-B) or medsam_vit_b.pth (MedSAM)",
    "samvit_large": "sam_vit_l_0b3195.pth (SAM ViT-L)",
    "samvit_huge": "sam_vit_h_4b8939.pth (SAM ViT-H)",
}


def _create(name: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained:
            raise EncoderError(_hub_failure(name, exc)) from exc
        raise EncoderError(f"model.encoder={name!r}: cannot build the model: {_short(exc)}") from exc


def _hub_failure(name: str, exc: BaseException) -> str:
    """Why ``weights: hub`` failed and what to pass instead (most often: no network)."""
    local = next((f for prefix, f in _SAM_FILES.items() if name.startswith(prefix)), None)
    local = f"a local {local}" if local else f"a local weights file of {name} (.pth/.pt/.bin/.safetensors)"
    return (
        f"model.weights=hub: cannot get timm's pretrained weights of {name!r} ({_short(exc, 240)}). "
        f"Offline? Pass {local} with --set model.weights=/path/to/file, or --set model.weights=none "
        "for a random init (no pretraining; for tests). HF_HUB_OFFLINE=1 uses the local cache only "
        "and skips the download retries."
    )


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise EncoderError(f"{path}: encoder weights file not found (model.weights)")
    return path


def _resolve_layers(layers: list[int] | None, depth: int, name: str) -> list[int]:
    if layers is None:
        return [max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)]
    resolved = [i + depth if i < 0 else i for i in layers]
    if not resolved or any(not 0 <= i < depth for i in resolved):
        raise EncoderError(f"model.feature_layers={layers}: {name} has blocks 0..{depth - 1}")
    return sorted(resolved)


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, by the loader every stage shares (:mod:`pathopeft.weights`)."""
    try:
        return read_weight_file(_existing(Path(path)))
    except WeightsError as exc:
        raise EncoderError(str(exc)) from exc


def _fit_positional(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Resize SAM's absolute (NHWC) and relative positional tables to the model's grid."""
    from timm.layers import resample_abs_pos_embed_nhwc

    out = dict(state)
    for key, value in state.items():
        want = target.get(key)
        if want is None or tuple(want.shape) == tuple(value.shape):
            continue
        if key.endswith("pos_embed") and value.ndim == 4:
            out[key] = resample_abs_pos_embed_nhwc(value.float(), list(want.shape[1:3])).to(value.dtype)
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2:
            # the same linear interpolation SAM applies when its rel-pos table and grid differ
            resized = F.interpolate(value.float().t()[None], size=want.shape[0], mode="linear")
            out[key] = resized[0].t().to(value.dtype).contiguous()
    return out


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of every tensor in ``module.state_dict()``."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."
