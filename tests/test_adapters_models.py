"""Every method on timm's ViT-S and SAM ViT-B image encoder (random init, small images)."""

from __future__ import annotations

import copy

import pytest
import timm  # a required dependency: a missing timm fails here, it is not skipped
import torch

import pathopeft.adapters as pa

VIT_TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"
SAM_TARGETS = r"blocks\.0\.attn\.(qkv|proj)|neck\.(0|2)"
OPTIONS = {
    "lora": {"rank": 4},
    "salt": {"ratio": 0.1, "lora_rank": 4},
    "svfit": {"energy": 0.9},
    "wara": {"rank": 2},
    "owlora": {"rank": 4},
}


@pytest.fixture(scope="module")
def vit_pristine() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, num_classes=5).eval()


@pytest.fixture(scope="module")
def sam_pristine() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, num_classes=0).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def one_step(model: torch.nn.Module, x: torch.Tensor, forward, steps: int = 2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        forward(model, x).square().mean().backward()
        opt.step()


def expected_counts(method: str, options: dict, model: torch.nn.Module, names: list[str]) -> int:
    from test_adapters_core import expected_count

    return sum(expected_count(method, options, model.get_submodule(n).weight.detach()) for n in names)


def check_method(
    method: str, pristine: torch.nn.Module, targets: str, x: torch.Tensor, train_fwd, tmp_path
) -> None:
    """Outputs are compared under no_grad: SDPA picks another CPU kernel when inputs need grad."""

    def forward(m: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return train_fwd(m, inp)

    model = copy.deepcopy(pristine)
    base_out = forward(model, x).detach()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    names = pa.attach(model, method, targets=targets, **OPTIONS[method])
    counts = expected_counts(method, OPTIONS[method], pristine, names)
    assert pa.trainable_parameters(model)["per_adapter"] == {"default": counts}
    assert pa.trainable_parameters(model)["trainable"] == counts
    assert torch.equal(forward(model, x), base_out)  # 1: exact at init, SVD methods included
    one_step(model, x, train_fwd)
    for key, value in base_state.items():  # 3: base weights bit-identical after optimiser steps
        wrapped = key.rsplit(".", 1)
        live_key = f"{wrapped[0]}.base_layer.{wrapped[1]}" if wrapped[0] in names else key
        assert torch.equal(model.state_dict()[live_key], value), key
    adapted = forward(model, x).detach()
    assert rel(adapted, base_out) > 1e-5
    pa.save(model, tmp_path / method, name="default")
    fresh = copy.deepcopy(pristine)
    assert pa.load(fresh, tmp_path / method) == "default"
    assert torch.equal(forward(fresh, x), adapted)  # 9: reproduced on a freshly built base
    pa.merge(model)  # 2
    assert rel(forward(model, x), adapted) <= 1e-5
    pa.unmerge(model)
    for name in names:
        restored = model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(restored, base_state[f"{name}.weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", OPTIONS)
def test_vit_small(method: str, vit_pristine, tmp_path) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    check_method(method, vit_pristine, VIT_TARGETS, x, lambda m, inp: m(inp), tmp_path)


@pytest.mark.parametrize("method", OPTIONS)
def test_sam_encoder_with_neck_convolutions(method: str, sam_pristine, tmp_path) -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    check_method(method, sam_pristine, SAM_TARGETS, x, lambda m, inp: m.forward_features(inp), tmp_path)


def test_sam_neck_conv_geometry(sam_pristine) -> None:
    model = copy.deepcopy(sam_pristine)
    names = pa.attach(model, "salt", targets=r"neck\.(0|2)", rank=8, lora_rank=4)
    assert names == ["neck.0", "neck.2"]
    neck2 = model.get_submodule("neck.2")
    assert neck2.geometry.kind == "conv2d"
    assert (neck2.geometry.out_features, neck2.geometry.in_features) == (256, 256 * 9)
    adapter = neck2.adapters["default"]
    assert adapter.U.shape == (256, 256) and adapter.Vh.shape == (256, 2304)


def test_mismatched_base_is_refused(vit_pristine, tmp_path) -> None:
    model = copy.deepcopy(vit_pristine)
    pa.attach(model, "lora", targets=VIT_TARGETS, rank=2)
    pa.save(model, tmp_path / "a")
    torch.manual_seed(123)
    other = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, num_classes=5)
    with pytest.raises(pa.AdapterError, match=r"blocks\.0\.attn\.qkv: base weights differ"):
        pa.load(other, tmp_path / "a")
    assert not list(pa.adapted_layers(other))  # nothing attached on refusal
    torch.manual_seed(0)
    wider = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=5)
    with pytest.raises(
        pa.AdapterError,
        match=r"saved for a linear of weight shape \(1152, 384\), found a linear of shape \(2304, 768\)",
    ):
        pa.load(wider, tmp_path / "a")
    assert pa.load(other, tmp_path / "a", verify_hash=False) == "default"
