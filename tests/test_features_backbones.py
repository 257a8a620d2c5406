"""Backbone factory: seeded random init, local weights (safetensors / state dicts), offline hub error."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from pathopeft.features.backbones import (
    BackboneError,
    OfflineHubError,
    backbone_dirname,
    build_backbone,
    load_weights_file,
)

NAME = "resnet18"


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_init_is_seeded_and_eval_mode() -> None:
    a = build_backbone(NAME, pretrained=False, seed=3)
    b = build_backbone(NAME, pretrained=False, seed=3)
    c = build_backbone(NAME, pretrained=False, seed=4)
    assert _same_params(a.model, b.model)
    assert not _same_params(a.model, c.model)
    assert a.weights_id == "random:3"
    assert not a.model.training
    assert not any(p.requires_grad for p in a.model.parameters())
    assert a.dim == 512
    # preprocessing comes from the model's timm data config
    assert a.mean == pytest.approx((0.485, 0.456, 0.406))
    assert a.input_size == (224, 224)


def test_random_init_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_backbone(NAME, pretrained=False, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_vit_input_size_follows_img_size_kwarg() -> None:
    bb = build_backbone("vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 64})
    assert bb.input_size == (64, 64)
    assert bb.mean == pytest.approx((0.5, 0.5, 0.5))
    assert bb.model(torch.zeros(1, 3, 64, 64)).shape == (1, bb.dim)


def test_weights_from_safetensors_with_prefix_and_head(tmp_path) -> None:
    ref = build_backbone(NAME, pretrained=False, seed=11)
    state = {f"module.{k}": v.clone() for k, v in ref.model.state_dict().items()}
    state["module.fc.weight"] = torch.randn(10, 512)  # a classifier head the encoder drops
    state["module.fc.bias"] = torch.randn(10)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    bb = build_backbone(NAME, pretrained=False, weights=path, seed=99)
    assert _same_params(bb.model, ref.model)
    assert bb.weights_id.startswith("sha256:") and len(bb.weights_id) == len("sha256:") + 64
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(bb.model(x), ref.model(x))


def test_weights_from_wrapped_pth_state_dict(tmp_path) -> None:
    ref = build_backbone(NAME, pretrained=False, seed=5)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref.model.state_dict().items()}, "epoch": 3}, path)
    bb = build_backbone(NAME, pretrained=True, weights=path)  # weights win over pretrained
    assert _same_params(bb.model, ref.model)


def test_mismatched_weights_are_refused(tmp_path) -> None:
    other = build_backbone("resnet34", pretrained=False)
    path = tmp_path / "r34.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="unexpected key"):
        build_backbone(NAME, pretrained=False, weights=path)

    partial = {k: v for k, v in build_backbone(NAME, pretrained=False).model.state_dict().items()}
    partial.pop("conv1.weight")
    partial["layer1.0.bn1.weight"] = torch.ones(3)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(BackboneError, match=r"missing key.*conv1\.weight.*shape mismatch"):
        build_backbone(NAME, pretrained=False, weights=tmp_path / "partial.pt")


class _Evil:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("unpickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_file_never_unpickles_code(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": _Evil()}, fh)
    with pytest.raises(BackboneError, match="weights_only=True"):
        load_weights_file(path)
    with pytest.raises(BackboneError, match="not found"):
        load_weights_file(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="cannot read weights"):
        load_weights_file(tmp_path / "junk.safetensors")


def test_unknown_model_name() -> None:
    with pytest.raises(BackboneError, match="unknown timm model 'resnet18x'.*similar"):
        build_backbone("resnet18x", pretrained=False)


def test_offline_pretrained_says_what_to_pass(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineHubError) as info:
        build_backbone(NAME, pretrained=True)
    message = str(info.value)
    assert "--weights PATH" in message and "--no-pretrained" in message and NAME in message


def test_backbone_dirname_is_filesystem_safe() -> None:
    assert backbone_dirname("hf-hub:MahmoodLab/uni") == "hf-hub_MahmoodLab_uni"
    assert backbone_dirname("resnet50.tv_in1k") == "resnet50.tv_in1k"
