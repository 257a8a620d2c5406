"""What the encoder is, honestly: normalisation from the config (item 8) and the resolved hub tag
plus a hash of the loaded tensors (item 9) — all in the resume fingerprint (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathopeft.config import ConfigError, load_config
from pathopeft.config.tile import TileConfig
from pathopeft.features.backbones import build_backbone
from pathopeft.features.extract import FeatureExtractor
from pathopeft.features.fingerprint import features_fingerprint
from pathopeft.features.pipeline import _build_backbone

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def _fp(backbone) -> str:  # type: ignore[no-untyped-def]
    return features_fingerprint("tiling", FeatureExtractor(backbone, num_workers=0).fingerprint(256))


# --- item 8: mean / std / interpolation ------------------------------------------------------
def test_config_normalisation_replaces_timms_default_tag_statistics() -> None:
    """The offline UNI recipe: vit_large's timm config says 0.5/0.5; UNI was trained on ImageNet's."""
    sets = ["features.backbone=vit_tiny_patch16_224", "features.pretrained=false",
            f"features.mean={IMAGENET[0]}", f"features.std={IMAGENET[1]}",
            "features.interpolation=bilinear"]  # fmt: skip
    cfg = load_config(TileConfig, None, sets)
    bb = _build_backbone(cfg)
    assert bb.mean == pytest.approx(tuple(IMAGENET[0])) and bb.std == pytest.approx(tuple(IMAGENET[1]))
    assert bb.interpolation == "bilinear"
    default = _build_backbone(load_config(TileConfig, None, sets[:2]))
    assert default.mean == pytest.approx((0.5, 0.5, 0.5)) and default.interpolation == "bicubic"
    # the extractor normalises with them, and they are in the resume fingerprint
    ex = FeatureExtractor(bb, num_workers=0)
    x = ex.preprocess(torch.full((1, 8, 8, 3), 255, dtype=torch.uint8))
    assert x[0, :, 0, 0].tolist() == pytest.approx([(1 - m) / s for m, s in zip(*IMAGENET)], rel=1e-5)
    assert _fp(bb) != _fp(default)
    clip = _build_backbone(load_config(TileConfig, None, [*sets[:2], f"features.mean={CLIP[0]}",
                                                          f"features.std={CLIP[1]}"]))  # fmt: skip
    assert clip.std == pytest.approx(tuple(CLIP[1])) and _fp(clip) not in {_fp(bb), _fp(default)}


def test_normalisation_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="together"):
        load_config(TileConfig, None, [f"features.mean={IMAGENET[0]}"])
    with pytest.raises(ConfigError, match="std"):
        load_config(TileConfig, None, [f"features.mean={IMAGENET[0]}", "features.std=[0.2, 0, 0.2]"])
    with pytest.raises(ConfigError, match="mean"):
        load_config(TileConfig, None, ["features.mean=[124, 116, 104]", f"features.std={IMAGENET[1]}"])
    with pytest.raises(ConfigError, match="interpolation"):
        load_config(TileConfig, None, ["features.interpolation=lanczos"])


# --- item 9: resolved hub tag + tensor hash ----------------------------------------------------
@pytest.fixture
def local_hub(tmp_path: Path) -> dict:
    """timm's pretrained loading, offline: the registry's cfg with its weights file overridden."""
    path = tmp_path / "r18.pth"
    torch.save(build_backbone("resnet18", pretrained=False, seed=1).model.state_dict(), path)
    return {"pretrained_cfg_overlay": {"file": str(path)}}


def test_hub_weights_record_the_resolved_tag_and_tensor_hash(local_hub: dict, monkeypatch) -> None:
    from timm.models import _registry

    before = build_backbone("resnet18", pretrained=True, model_kwargs=local_hub)
    assert before.weights_id == "hub:resnet18.a1_in1k"  # not "hub:resnet18"
    assert before.tensors_sha256 and len(before.tensors_sha256) == 64
    # timm changes the bare name's default tag (same file here, so only the tag differs)
    monkeypatch.setitem(_registry._model_pretrained_cfgs, "resnet18",
                        _registry._model_pretrained_cfgs["resnet18.tv_in1k"])  # fmt: skip
    after = build_backbone("resnet18", pretrained=True, model_kwargs=local_hub)
    assert after.weights_id == "hub:resnet18.tv_in1k"
    assert _fp(after) != _fp(before)  # a resumed cohort recomputes instead of mixing weights


def test_tensor_hash_tells_weight_sets_apart(local_hub: dict, tmp_path: Path) -> None:
    a = build_backbone("resnet18", pretrained=True, model_kwargs=local_hub)
    assert (
        build_backbone("resnet18", pretrained=True, model_kwargs=local_hub).tensors_sha256 == a.tensors_sha256
    )
    other = tmp_path / "other.pth"
    torch.save(build_backbone("resnet18", pretrained=False, seed=2).model.state_dict(), other)
    b = build_backbone(
        "resnet18", pretrained=True, model_kwargs={"pretrained_cfg_overlay": {"file": str(other)}}
    )
    assert b.weights_id == a.weights_id and b.tensors_sha256 != a.tensors_sha256
    ex_a, ex_b = FeatureExtractor(a, num_workers=0), FeatureExtractor(b, num_workers=0)
    assert ex_a.fingerprint(256)["weights_tensors"] != ex_b.fingerprint(256)["weights_tensors"]
    assert build_backbone("resnet18", pretrained=False, seed=1).tensors_sha256 == a.tensors_sha256
