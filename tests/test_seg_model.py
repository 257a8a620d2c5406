"""Encoders (timm, SAM-format checkpoints), decoders, tuning modes and checkpoint contents."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from pathopeft.config.segment import SegmentTrainConfig
from pathopeft.seg.decoders import build_decoder
from pathopeft.seg.encoders import EncoderError, build_encoder, load_weight_file
from pathopeft.seg.model import build_model, persistent_keys, trainable_summary

# a small SAM-architecture ViT: 2 blocks (block 1 global attention), windowed block 0
SAM_KW = {
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": [1],
    "window_size": 4,
    "neck_chans": 32,
}
TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2}


def _fake_sam_checkpoint(path: Path) -> nn.Module:
    """Write an official-SAM-format file (``image_encoder.`` keys, ``mlp.lin1``) from a random
    timm samvit built at SAM's native geometry relative to its patch grid (1024 px → 64×64 tokens
    there; 128 px → 8×8 here), plus prompt-encoder/mask-decoder keys that must be dropped."""
    torch.manual_seed(0)
    source = timm.create_model("samvit_base_patch16", img_size=128, num_classes=0, **SAM_KW).eval()
    state = {}
    for key, value in source.state_dict().items():
        state["image_encoder." + key.replace("mlp.fc", "mlp.lin")] = value
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 8)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 8)
    torch.save(state, path)
    return source


def test_sam_format_checkpoint_loads_onto_timm_samvit(tmp_path: Path) -> None:
    ckpt = tmp_path / "sam_vit_tiny.pth"
    source = _fake_sam_checkpoint(ckpt)
    x = torch.randn(1, 3, 128, 128)

    # at the checkpoint's own size the converted encoder computes exactly what the source computes
    same = build_encoder("samvit_base_patch16", str(ckpt), img_size=128, kwargs=SAM_KW, layers=[0, 1]).eval()
    expected = source.forward_intermediates(x, indices=[0, 1], norm=False, intermediates_only=True)
    for got, want in zip(same(x), expected):
        torch.testing.assert_close(got, want)
    assert same.record.weights_sha256 and same.record.weights_path == str(ckpt.resolve())

    # at a smaller size: positional tables resized as SAM does, everything else copied
    small = build_encoder("samvit_base_patch16", str(ckpt), img_size=64, kwargs=SAM_KW)
    torch.testing.assert_close(small.model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert small.model.pos_embed.shape == (1, 4, 4, 64)
    assert small.model.blocks[1].attn.rel_pos_h.shape == (7, 32)  # global block: 2·4−1
    assert small.model.blocks[0].attn.rel_pos_h.shape == source.blocks[0].attn.rel_pos_h.shape
    feats = small(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in feats] == [(2, 64, 4, 4)] * 4
    assert small.record.fingerprint != same.record.fingerprint


def test_weight_files_are_read_without_unpickling(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "code": Path("x")}, bad)
    with pytest.raises(EncoderError, match=r"bad\.pth: cannot read weights"):
        load_weight_file(bad)
    with pytest.raises(EncoderError, match="not found"):
        build_encoder("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), img_size=32)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, wrong)  # unwrapped from "model"
    with pytest.raises(EncoderError, match=r"wrong\.pth: the weights do not fit vit_tiny_patch16_224"):
        build_encoder("vit_tiny_patch16_224", str(wrong), img_size=32, kwargs=TINY_VIT)


def test_random_init_is_reproducible_from_the_seed() -> None:
    one = build_encoder("vit_tiny_patch16_224", "none", img_size=32, kwargs=TINY_VIT, seed=5)
    two = build_encoder("vit_tiny_patch16_224", "none", img_size=32, kwargs=TINY_VIT, seed=5)
    three = build_encoder("vit_tiny_patch16_224", "none", img_size=32, kwargs=TINY_VIT, seed=6)
    assert one.record.fingerprint == two.record.fingerprint != three.record.fingerprint


@pytest.mark.parametrize(
    ("encoder", "kwargs", "decoder"),
    [
        ("vit_tiny_patch16_224", TINY_VIT, "unetr"),
        ("vit_tiny_patch16_224", {**TINY_VIT, "patch_size": 8}, "pup"),
        ("samvit_base_patch16", SAM_KW, "auto"),
        ("resnet18", {}, "unet"),
        ("resnet18", {}, "fpn"),
    ],
)
def test_decoders_return_logits_at_input_size(encoder: str, kwargs: dict, decoder: str) -> None:
    enc = build_encoder(encoder, "none", img_size=64, kwargs=kwargs)
    name, dec = build_decoder(decoder, enc, num_classes=3, width=4)
    image = torch.randn(2, 3, 64, 64)
    assert dec(image, enc(image)).shape == (2, 3, 64, 64)
    assert name == ({"plain": "unetr", "pyramid": "unet"}[enc.kind] if decoder == "auto" else decoder)


def test_decoder_must_suit_the_encoder() -> None:
    enc = build_encoder("resnet18", "none", img_size=64)
    with pytest.raises(ValueError, match="needs a plain encoder.*use one of: unet, fpn"):
        build_decoder("unetr", enc, 2, 4)


def _cfg(**adapter: object) -> SegmentTrainConfig:
    return SegmentTrainConfig.model_validate(
        {
            "model": {
                "encoder": "vit_tiny_patch16_224",
                "img_size": 32,
                "encoder_kwargs": TINY_VIT,
                "decoder": "pup",
                "decoder_channels": 1,
            },
            "adapter": adapter,
        }
    )


def test_tuning_modes_and_trainable_counts() -> None:
    frozen = build_model(_cfg(mode="frozen"))
    assert trainable_summary(frozen)["encoder_trainable"] == 0
    full = build_model(_cfg(mode="full"))
    summary = trainable_summary(full)
    assert summary["trainable"] == summary["total"]

    lora = build_model(_cfg(method="lora", options={"rank": 2}, targets=r".*blocks\.\d+\.attn\.qkv"))
    expected = 2 * 2 * (48 + 3 * 48)  # 2 blocks × r·(m + n)
    assert trainable_summary(lora)["encoder_trainable"] == expected
    norms = build_model(
        _cfg(
            method="lora",
            options={"rank": 2},
            targets=r".*attn\.qkv",
            train_norms=True,
            extra_trainable=["pos_embed"],
        )
    )
    extra = sum(
        p.numel() for n, p in norms.encoder.model.named_parameters() if "norm" in n or n == "pos_embed"
    )
    assert trainable_summary(norms)["encoder_trainable"] == expected + extra
    with pytest.raises(ValueError, match=r"match no parameter of .*names like .*pos_embed"):
        build_model(_cfg(mode="frozen", extra_trainable=["nothing_here"]))


def test_extra_trainable_alternatives_for_other_encoders_are_ignored_with_a_warning(caplog) -> None:
    """Shipped configs name SAM's rel_pos next to pos_embed: a plain ViT trains pos_embed, says so."""
    with caplog.at_level("WARNING", logger="pathopeft.seg.model"):
        model = build_model(_cfg(mode="frozen", extra_trainable=["pos_embed", r".*rel_pos_[hw]"]))
    trainable = [n for n, p in model.encoder.model.named_parameters() if p.requires_grad]
    assert trainable == ["pos_embed"]
    assert "rel_pos" in caplog.text and "ignored" in caplog.text


def test_adapter_attach_errors_name_the_config_keys() -> None:
    with pytest.raises(ValueError, match=r"adapter\.method='lora' \(adapter\.targets\).*selected no module"):
        build_model(_cfg(method="lora", options={"rank": 2}, targets=r"no_such_layer"))


def test_checkpoint_keys_leave_out_the_frozen_encoder() -> None:
    model = build_model(
        _cfg(method="salt", options={"rank": 4, "lora_rank": 2}, targets=r".*attn\.qkv", train_norms=True)
    )
    keys = persistent_keys(model)
    assert all(k.startswith("decoder.") for k in keys if "encoder" not in k)
    assert not any(k.endswith("qkv.base_layer.weight") or k.endswith("mlp.fc1.weight") for k in keys)
    assert any(k.endswith("adapters.default.U") for k in keys)  # SVD factors are saved, not recomputed
    assert any(k.endswith("norm1.weight") for k in keys)  # trained norms are saved
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= keys


def test_frozen_batchnorm_keeps_its_statistics() -> None:
    cfg = SegmentTrainConfig.model_validate(
        {
            "model": {"encoder": "resnet18", "img_size": 32, "decoder_channels": 1},
            "adapter": {"mode": "frozen"},
        }
    )
    model = build_model(cfg).train()
    bn = model.encoder.model.bn1
    assert not bn.training
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bn.running_mean)


def test_hub_sam_weights_are_resized_to_img_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """``weights: hub`` for samvit: timm loads SAM at 1024 px; positions must be fitted to img_size.

    No network here, so timm's own hub download is replaced by a model built at the native grid.
    """
    import pathopeft.seg.encoders as encoders

    torch.manual_seed(1)
    native = timm.create_model("samvit_base_patch16", img_size=128, num_classes=0, **SAM_KW)
    real_create = encoders._create

    def fake_create(name: str, *, pretrained: bool, **kwargs: object) -> nn.Module:
        if pretrained:
            assert "img_size" not in kwargs  # the native size is asked for
            return native
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(encoders, "_create", fake_create)
    enc = build_encoder("samvit_base_patch16", "hub", img_size=64, kwargs=SAM_KW)
    assert enc.model.pos_embed.shape == (1, 4, 4, 64)
    torch.testing.assert_close(enc.model.blocks[1].attn.qkv.weight, native.blocks[1].attn.qkv.weight)
    assert enc.record.weights == "hub" and enc.record.weights_sha256 is None


def test_frozen_batchnorm_is_put_back_in_eval_and_changed_buffers_are_saved() -> None:
    """Lightning restores modules' ``training`` flags one by one (not through ``train()``):
    ``freeze_norm_stats`` undoes that, and any encoder buffer that still changed is checkpointed."""
    cfg = SegmentTrainConfig.model_validate(
        {
            "model": {"encoder": "resnet18", "img_size": 32, "decoder_channels": 1},
            "adapter": {"mode": "frozen"},
        }
    )
    model = build_model(cfg).train()
    bn = model.encoder.model.bn1
    bn.training = True  # what Lightning's mode restore did
    model.freeze_norm_stats()
    assert not bn.training
    assert not [k for k in persistent_keys(model) if k.startswith("encoder.")]
    with torch.no_grad():
        model.encoder.model.layer1[0].bn2.running_var.mul_(2)
    assert "encoder.model.layer1.0.bn2.running_var" in persistent_keys(model)


def test_empty_images_count_in_dice_and_false_positive_images_are_reported() -> None:
    """Issue 14: an image with only false positives used to score NaN and vanish from Dice."""
    from pathopeft.seg.metrics import METRICS, image_scores, summarise_scores

    target = torch.zeros(3, 1, 8, 8, dtype=torch.long)
    target[0, 0, :4] = 1  # image 0: half foreground, predicted exactly
    pred = target.clone()
    pred[1, 0, 0, 0] = 1  # image 1: empty truth, one false-positive pixel
    # image 2: empty truth, empty prediction
    logits = torch.nn.functional.one_hot(pred[:, 0], 2).permute(0, 3, 1, 2).float()
    scores = image_scores(logits, target)
    assert scores.shape == (3, len(METRICS), 1)
    summary = summarise_scores(scores)
    assert summary["dice"] == pytest.approx((1 + 0 + 1) / 3)
    assert summary["iou"] == pytest.approx((1 + 0 + 1) / 3)
    assert summary["dice_nonempty"] == pytest.approx(1.0)
    assert summary["fp_image_rate"] == pytest.approx(0.5)
