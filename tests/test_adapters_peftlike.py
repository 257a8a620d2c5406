"""The HF PEFT conveniences (issue 14 § 3): merge_and_unload, disable_adapters, the one-line count,
suffix and "all-linear" targets."""

from __future__ import annotations

import io

import pytest
import timm  # a required dependency: missing fails, not skips
import torch
from test_adapters_core import TARGETS, make_mlp, train_steps
from torch import nn

import pathopeft.adapters as pa


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["lora", "salt"])
def test_merge_and_unload_gives_a_plain_model_with_the_update(method, x) -> None:
    model = make_mlp()
    plain_keys = set(make_mlp().state_dict())
    options = {"rank": 2} if method == "lora" else {"rank": 2, "lora_rank": 2}
    pa.attach(model, method, targets=TARGETS, **options)
    pa.attach(model, "lora", targets=r"net\.0", name="unused", rank=2)
    with torch.no_grad():
        model.net[0].adapters["unused"].lora_B.normal_()
    pa.set_active(model, ["default"])
    train_steps(model, x, steps=2)
    expected = model(x).detach()
    out = pa.merge_and_unload(model)
    assert out is model and not list(pa.adapted_layers(model))
    assert set(model.state_dict()) == plain_keys
    assert isinstance(model.net[0], torch.nn.Linear)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)  # merged, not un-merged
    assert not torch.allclose(model(x), make_mlp()(x))


def test_disable_adapters_context_also_when_merged(x) -> None:
    model = make_mlp()
    base = model(x).detach()
    pa.attach(model, "lora", targets=TARGETS, rank=2)
    train_steps(model, x, steps=2)
    adapted = model(x).detach()
    with pa.disable_adapters(model):
        assert torch.equal(model(x), base)
    torch.testing.assert_close(model(x), adapted)
    pa.merge(model)
    with pa.disable_adapters(model):  # set_active([]) refuses while merged; this does not
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
    assert model.net[0].merged == ["default"]
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), pa.disable_adapters(model):
        raise RuntimeError("boom")
    assert pa.active_adapters(model) == ["default"] and model.net[0].merged == ["default"]


def test_print_trainable_parameters_line(x) -> None:
    model = make_mlp()
    pa.attach(model, "lora", targets=TARGETS, rank=2)
    stream = io.StringIO()
    line = pa.print_trainable_parameters(model, file=stream)
    info = pa.trainable_parameters(model)
    assert stream.getvalue() == line + "\n"
    assert line == (
        f"trainable params: {info['trainable']:,} || all params: {info['total']:,} "
        f"|| trainable%: {100 * info['trainable'] / info['total']:.4f}"
    )


def test_suffix_targets_and_all_linear() -> None:
    model = make_mlp()
    assert pa.attach(model, "lora", targets=["2"], rank=2) == ["net.2"]  # suffix, PEFT's list form
    other = make_mlp()
    assert pa.attach(other, "lora", targets=[r"net\.0", "2"], rank=2) == ["net.0", "net.2"]
    everything = make_mlp()
    # every nn.Linear but the output layer (here the last one, "head")
    assert pa.attach(everything, "lora", targets="all-linear", rank=2) == ["net.0", "net.2"]
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3)
    names = pa.attach(vit, "lora", targets="all-linear", rank=2)
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


class ReflectConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (reflect padding done by hand)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))


def test_conv2d_subclasses_that_override_forward_are_refused() -> None:
    """A Conv2d subclass with its own forward would be adapted with the plain padding attribute (its
    padding logic lost): refused, naming the layer, before anything is wrapped."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ReflectConv(8, 8, 3))
    before = dict(model.named_modules())
    with pytest.raises(
        pa.AdapterError, match=r"1: ReflectConv is an nn\.Conv2d subclass that overrides forward"
    ):
        pa.attach(model, "lora", targets=r"0|1", rank=2)
    assert dict(model.named_modules()) == before  # nothing wrapped, not even the plain conv
    assert pa.attach(model, "lora", targets="0", rank=2) == ["0"]  # a plain Conv2d still works


@pytest.mark.parametrize(
    ("method", "options"),
    [("lora", {"rank": 2}), ("salt", {"rank": 2, "lora_rank": 2}), ("svfit", {}), ("wara", {"rank": 1})],
)
@pytest.mark.parametrize("size", [9, 10])  # odd/even input: TF "same" pads asymmetrically (extra at the end)
def test_timm_conv2d_same_keeps_its_dynamic_padding(method: str, options: dict, size: int) -> None:
    """timm's Conv2dSame pads in forward from the input size (padding attribute 0). The adapter's
    convolution must pad the same way: adapted output == the layer run with W + ΔW (merged)."""
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.Conv2dSame(4, 6, 3, stride=2))
    x = torch.randn(2, 4, size, size)
    pa.attach(model, method, targets="0", **options)
    with torch.no_grad():  # a non-zero update in every method's parameters
        for p in model[0].adapters["default"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
        adapted = model(x)
        pa.merge(model)
        merged = model(x)  # Conv2dSame's own forward with the merged weight
    assert adapted.shape == merged.shape == (2, 6, (size + 1) // 2, (size + 1) // 2)
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-5)


def test_tf_efficientnet_stem_can_be_adapted() -> None:
    """The encoder of the shipped CNN segmentation configs: its stride-2 stem is a Conv2dSame."""
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    assert type(net.conv_stem).__name__ == "Conv2dSame"
    x = torch.randn(1, 3, 45, 45)
    with torch.no_grad():
        base = net(x)
        pa.attach(net, "lora", targets=["conv_stem"], rank=4)
        assert torch.equal(net(x), base)  # exact at initialisation
        net.conv_stem.adapters["default"].lora_B.normal_(0, 0.1)
        adapted = net(x)
        pa.merge(net)
        torch.testing.assert_close(net(x), adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(adapted, base)
