"""Decoders that turn encoder features into per-pixel class logits at the input's size.

* ``unetr`` — UNETR (Hatamizadeh et al. 2022) built from MONAI's own UNETR blocks: four
  intermediate ViT block outputs are progressively upsampled into skips at strides 8/4/2 plus a
  convolutional skip from the image itself. Works for ViT and SAM token grids.
* ``pup`` — progressive upsampling of the last block (SETR-PUP): conv + ×2 upsampling steps.
* ``unet`` / ``fpn`` — segmentation-models-pytorch decoders over a CNN feature pyramid.

Each decoder is registered with the encoder kind it serves; :func:`build_decoder` picks ``auto``.
Every decoder's ``forward(image, features)`` returns ``(B, num_classes, H, W)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.seg.encoders import SegEncoder

__all__ = ["DECODERS", "PUPDecoder", "SMPDecoder", "UNETRDecoder", "build_decoder"]

_TOKEN_STRIDE = 16  # UNETR's geometry: tokens at 1/16, skips at 1/8, 1/4, 1/2 and 1/1


def _to_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class UNETRDecoder(nn.Module):
    """UNETR decoder over four token grids (shallow → deep) and the input image."""

    def __init__(
        self, token_channels: list[int], num_classes: int, *, feature_size: int = 16, in_chans: int = 3
    ) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        if len(token_channels) != 4:
            raise ValueError(f"UNETR needs 4 feature layers, got {len(token_channels)}")
        c1, c2, c3, c4 = token_channels
        fs, norm = feature_size, "instance"
        self.enc1 = UnetrBasicBlock(2, in_chans, fs, kernel_size=3, stride=1, norm_name=norm, res_block=True)

        def pr_up(channels: int, out: int, layers: int) -> UnetrPrUpBlock:
            return UnetrPrUpBlock(
                2,
                channels,
                out,
                num_layer=layers,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm,
                conv_block=True,
                res_block=True,
            )

        def up(channels: int, out: int) -> UnetrUpBlock:
            return UnetrUpBlock(
                2, channels, out, kernel_size=3, upsample_kernel_size=2, norm_name=norm, res_block=True
            )

        self.enc2, self.enc3, self.enc4 = pr_up(c1, fs * 2, 2), pr_up(c2, fs * 4, 1), pr_up(c3, fs * 8, 0)
        self.dec5, self.dec4 = up(c4, fs * 8), up(fs * 8, fs * 4)
        self.dec3, self.dec2 = up(fs * 4, fs * 2), up(fs * 2, fs)
        self.out = UnetOutBlock(2, fs, num_classes)

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        height, width = image.shape[-2:]
        grid = (math.ceil(height / _TOKEN_STRIDE), math.ceil(width / _TOKEN_STRIDE))
        # token grids of another stride (patch 14, 8) are resampled to UNETR's 1/16 geometry
        z1, z2, z3, z4 = (f if f.shape[-2:] == grid else _to_size(f, grid) for f in features)
        padded = _to_size(image, (grid[0] * _TOKEN_STRIDE, grid[1] * _TOKEN_STRIDE))
        x = self.dec5(z4, self.enc4(z3))
        x = self.dec4(x, self.enc3(z2))
        x = self.dec3(x, self.enc2(z1))
        x = self.dec2(x, self.enc1(padded))
        return _to_size(self.out(x), (height, width))


class PUPDecoder(nn.Module):
    """SETR-PUP: the last token grid, upsampled ×2 per conv stage back to the input stride."""

    def __init__(self, token_channels: list[int], num_classes: int, *, channels: int, reduction: int) -> None:
        super().__init__()
        stages = max(1, round(math.log2(reduction)))
        layers: list[nn.Module] = []
        width = token_channels[-1]
        for _ in range(stages):
            layers += [
                nn.Conv2d(width, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
            width = channels
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, num_classes, 1)

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        return _to_size(self.out(self.body(features[-1])), tuple(image.shape[-2:]))


class SMPDecoder(nn.Module):
    """A segmentation-models-pytorch decoder + segmentation head over ``[image, *pyramid]``."""

    def __init__(self, name: str, channels: list[int], num_classes: int, *, base: int) -> None:
        super().__init__()
        from segmentation_models_pytorch.base import SegmentationHead

        depth = len(channels) - 1
        if name == "unet":
            from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

            widths = [base * 2**i for i in range(depth - 1, -1, -1)]
            self.decoder = _construct(
                UnetDecoder,
                encoder_channels=channels,
                decoder_channels=widths,
                n_blocks=depth,
                use_norm="batchnorm",
            )
            head_in, upsampling, kernel = widths[-1], 1, 3
        elif name == "fpn":
            from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

            if depth < 4:
                raise ValueError(f"the FPN decoder needs 4 pyramid levels, the encoder gives {depth}")
            self.decoder = _construct(
                FPNDecoder,
                encoder_channels=channels,
                encoder_depth=depth,
                pyramid_channels=base * 16,
                segmentation_channels=base * 8,
                dropout=0.2,
                merge_policy="add",
            )
            head_in, upsampling, kernel = base * 8, 1, 1
        else:
            raise ValueError(f"unknown smp decoder {name!r}")
        self.head = SegmentationHead(head_in, num_classes, kernel_size=kernel, upsampling=upsampling)
        params = list(inspect.signature(self.decoder.forward).parameters.values())
        self._varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)

    def forward(self, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.decoder(*features) if self._varargs else self.decoder(features)
        return _to_size(self.head(out), tuple(image.shape[-2:]))


def _construct(cls: type, **kwargs: Any) -> nn.Module:
    """Build an smp decoder across smp versions (``use_norm`` was ``use_batchnorm`` before 0.5)."""
    accepted = inspect.signature(cls).parameters
    if "use_norm" in kwargs and "use_norm" not in accepted and "use_batchnorm" in accepted:
        kwargs["use_batchnorm"] = kwargs.pop("use_norm") == "batchnorm"
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def _unetr(encoder: SegEncoder, num_classes: int, width: int) -> nn.Module:
    return UNETRDecoder(encoder.channels, num_classes, feature_size=width, in_chans=3)


def _pup(encoder: SegEncoder, num_classes: int, width: int) -> nn.Module:
    return PUPDecoder(encoder.channels, num_classes, channels=width * 16, reduction=encoder.reductions[-1])


# name -> (encoder kind it serves, builder(encoder, num_classes, decoder_channels))
DECODERS: dict[str, tuple[str, Callable[[SegEncoder, int, int], nn.Module]]] = {
    "unetr": ("plain", _unetr),
    "pup": ("plain", _pup),
    "unet": ("pyramid", lambda enc, n, w: SMPDecoder("unet", enc.channels, n, base=w)),
    "fpn": ("pyramid", lambda enc, n, w: SMPDecoder("fpn", enc.channels, n, base=w)),
}
_AUTO = {"plain": "unetr", "pyramid": "unet"}


def build_decoder(name: str, encoder: SegEncoder, num_classes: int, width: int) -> tuple[str, nn.Module]:
    """(resolved name, decoder) for ``encoder``; a decoder for the other encoder kind is refused."""
    name = _AUTO[encoder.kind] if name == "auto" else name
    kind, builder = DECODERS[name]
    if kind != encoder.kind:
        fits = ", ".join(n for n, (k, _) in DECODERS.items() if k == encoder.kind)
        raise ValueError(
            f"model.decoder={name!r} needs a {kind} encoder; {encoder.record.name} is {encoder.kind} "
            f"(use one of: {fits})"
        )
    return name, builder(encoder, num_classes, width)
