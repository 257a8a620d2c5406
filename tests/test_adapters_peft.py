"""Our LoRA against HF peft's LoRA (test-only reference) given the same A and B."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import pathopeft.adapters as pa

# the reference is a dev dependency: a missing peft fails (CI installs the dev extra); skip only on request
if os.environ.get("PATHOPEFT_SKIP_PEFT") == "1":
    pytest.skip("PATHOPEFT_SKIP_PEFT=1", allow_module_level=True)
import peft
import timm

TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"


def build_pair(model: torch.nn.Module, targets: str, rank: int, alpha: float):
    ours = copy.deepcopy(model)
    theirs = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0),
    )
    names = pa.attach(ours, "lora", targets=targets, rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            peft_layer = theirs.base_model.model.get_submodule(name)
            a_weight = peft_layer.lora_A["default"].weight
            b_weight = peft_layer.lora_B["default"].weight
            b_weight.copy_(torch.randn(b_weight.shape, generator=generator) * 0.05)  # non-zero B
            adapter = ours.get_submodule(name).adapters["default"]
            adapter.lora_A.copy_(a_weight.reshape(adapter.lora_A.shape))
            adapter.lora_B.copy_(b_weight.reshape(adapter.lora_B.shape))
    return ours, theirs, names


@pytest.mark.parametrize("alpha", [16.0, 4.0])  # α = r: scaling 1, which our forward skips (exactly)
def test_lora_matches_peft_on_vit_outputs_grads_and_merge(alpha: float) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, num_classes=4)
    ours, theirs, names = build_pair(vit, TARGETS, rank=4, alpha=alpha)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # bit for bit: same ops in the same order
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for name in names:
        ad = ours.get_submodule(name).adapters["default"]
        ref = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(ad.lora_A.grad, ref.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ad.lora_B.grad, ref.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)
    trainable, _ = theirs.get_nb_trainable_parameters()  # same trainable count as peft reports
    assert pa.trainable_parameters(ours)["per_adapter"]["default"] == trainable
    pa.merge(ours)
    merged = theirs.merge_and_unload()
    for name in names:
        assert torch.equal(ours.get_submodule(name).base_layer.weight, merged.get_submodule(name).weight)


def test_lora_matches_peft_init_distribution_and_conv() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 1)
    )
    ours, theirs, names = build_pair(net, r"0|2", rank=2, alpha=4.0)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    pa.merge(ours)
    merged = theirs.merge_and_unload()
    for name in names:
        torch.testing.assert_close(
            ours.get_submodule(name).base_layer.weight,
            merged.get_submodule(name).weight,
            rtol=1e-5,
            atol=1e-7,
        )
    # the same init: peft's kaiming_uniform(a=√5) bound for A, zeros for B
    fresh = copy.deepcopy(net)
    pa.attach(fresh, "lora", targets=r"0", rank=2)
    adapter = fresh[0].adapters["default"]
    bound = 1.0 / (4 * 3 * 3) ** 0.5
    assert adapter.lora_A.abs().max() <= bound and adapter.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(adapter.lora_B) == 0


def test_print_trainable_parameters_matches_peft(capsys) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, num_classes=4)
    ours, theirs, _ = build_pair(vit, TARGETS, rank=4, alpha=4.0)
    theirs.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    assert pa.print_trainable_parameters(ours) == peft_line


def test_modules_to_save_and_rank_pattern_match_peft() -> None:
    """Same state-dict layout for a head trained whole, same per-layer ranks, same counts as peft."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=4)
    theirs = peft.get_peft_model(
        copy.deepcopy(vit),
        peft.LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=["qkv", "proj"],
            rank_pattern={"blocks.1.attn.qkv": 6},
            alpha_pattern={"proj": 3.0},
            modules_to_save=["head"],
        ),
    )
    ours = copy.deepcopy(vit)
    pa.attach(
        ours,
        "lora",
        targets=["qkv", "proj"],
        rank=2,
        alpha=2.0,
        rank_pattern={r"blocks\.1\.attn\.qkv": 6},
        alpha_pattern={"proj": 3.0},
        modules_to_save=["head"],
    )
    reference = theirs.base_model.model
    head_keys = {k for k in reference.state_dict() if k.startswith("head.")}
    assert {k for k in ours.state_dict() if k.startswith("head.")} == head_keys
    assert "head.modules_to_save.default.weight" in head_keys
    for name in ("blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.1.attn.proj"):
        mine = ours.get_submodule(name).adapters["default"]
        ref = reference.get_submodule(name)
        assert mine.lora_A.shape == ref.lora_A["default"].weight.shape, name
        assert mine.scaling == ref.scaling["default"], name
    trainable, total = theirs.get_nb_trainable_parameters()
    info = pa.trainable_parameters(ours)
    assert (info["trainable"], info["total"]) == (trainable, total)
