"""modules_to_save (issue 14 § 3): whole modules trained, switched and saved with their adapter."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapters_core import TARGETS, make_mlp, train_steps
from torch import nn

import pathopeft.adapters as pa


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(1))


def head_copy(model: nn.Module, name: str) -> nn.Module:
    return model.head.modules_to_save[name]


def trained(x: torch.Tensor, name: str = "default", seed: int = 0, **kwargs) -> nn.Module:
    model = make_mlp()
    pa.attach(model, "lora", targets=TARGETS, rank=2, name=name, modules_to_save=["head"], **kwargs)
    torch.manual_seed(seed)
    train_steps(model, x + seed, steps=3)
    return model


def test_trained_head_is_saved_and_restored_bit_exactly(x: torch.Tensor, tmp_path) -> None:
    base_head = make_mlp().head.weight.detach().clone()
    model = trained(x)
    assert isinstance(model.head, pa.SavedModule)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.modules_to_save.default.weight", "head.modules_to_save.default.bias"} <= trainable
    assert "head.original_module.weight" not in trainable  # the original stays frozen and unchanged
    assert torch.equal(model.head.original_module.weight, base_head)
    assert not torch.equal(head_copy(model, "default").weight, base_head)  # the copy trained
    heads = sum(p.numel() for p in head_copy(model, "default").parameters())
    assert pa.trainable_parameters(model)["per_adapter"]["default"] == 2 * (32 + 16) + 2 * (12 + 32) + heads
    expected = model(x).detach()
    out = pa.save(model, tmp_path / "ad")
    document = json.loads((out / pa.CONFIG_NAME).read_text())
    assert document["modules_to_save"] == {"head": "Linear"}
    tensors = load_file(str(out / pa.WEIGHTS_NAME))
    assert {"__module__.head.weight", "__module__.head.bias"} <= set(tensors)
    fresh = make_mlp()
    pa.load(fresh, out)
    for key, value in head_copy(model, "default").state_dict().items():
        assert torch.equal(head_copy(fresh, "default").state_dict()[key], value), key
    assert torch.equal(fresh(x), expected)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded frozen unless trainable=True
    again = make_mlp()
    pa.load(again, out, trainable=True)
    assert all(p.requires_grad for p in head_copy(again, "default").parameters())


def test_saved_module_tensors_are_verified_like_the_rest(x: torch.Tensor, tmp_path) -> None:
    out = pa.save(trained(x), tmp_path / "ad")
    tensors = load_file(str(out / pa.WEIGHTS_NAME))
    with safe_open(str(out / pa.WEIGHTS_NAME), framework="pt") as handle:
        metadata = handle.metadata()

    def edited(label: str, new: dict, keep_metadata: bool = True, document: dict | None = None):
        folder = tmp_path / label
        folder.mkdir()
        save_file(new, str(folder / pa.WEIGHTS_NAME), metadata=metadata if keep_metadata else None)
        text = json.dumps(document) if document else (out / pa.CONFIG_NAME).read_text()
        (folder / pa.CONFIG_NAME).write_text(text)
        return folder

    def refused(folder, match: str) -> None:
        model = make_mlp()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(pa.AdapterError, match=match):
            pa.load(model, folder)
        assert not list(pa.adapted_layers(model)) and not list(pa.saved_modules(model))  # all or nothing
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    dropped = {k: v for k, v in tensors.items() if k != "__module__.head.bias"}
    refused(edited("dropped", dropped), "do not belong together")  # the metadata hash covers the names
    refused(edited("dropped2", dropped, keep_metadata=False), r"(?s)modules_to_save head do not fit.*bias")
    nan = {
        **tensors,
        "__module__.head.weight": torch.full_like(tensors["__module__.head.weight"], float("nan")),
    }
    refused(edited("nan", nan), r"'__module__\.head\.weight' holds NaN")
    wide = {**tensors, "__module__.head.weight": torch.zeros(3, 13)}
    refused(edited("shape", wide, keep_metadata=False), r"(?s)modules_to_save head do not fit.*size mismatch")
    document = json.loads((out / pa.CONFIG_NAME).read_text())
    document["modules_to_save"] = {"head": "Conv2d"}
    refused(edited("hash", tensors, document=document), "do not belong together")
    refused(
        edited("type", tensors, keep_metadata=False, document=document), "saved from a Conv2d, found a Linear"
    )
    document["modules_to_save"] = {"head.original_module": "Linear"}
    refused(edited("inside", tensors, document=document), "inside an adapter wrapper")
    document["modules_to_save"] = {"net": "Sequential"}
    refused(edited("holds", tensors, document=document), r"modules_to_save 'net' overlaps 'net\.0'")

    class Headless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_mlp().net

    model = Headless()
    with pytest.raises(pa.AdapterError, match="modules_to_save head: no such module in Headless"):
        pa.load(model, out)
    assert not list(pa.adapted_layers(model))


def test_two_adapters_with_their_own_copies_switch_together(x: torch.Tensor, tmp_path) -> None:
    model = trained(x, name="a")
    a_head = {k: v.clone() for k, v in head_copy(model, "a").state_dict().items()}
    pa.set_active(model, [])
    pa.attach(model, "lora", targets=TARGETS, rank=2, name="b", modules_to_save=["head"])
    assert torch.equal(head_copy(model, "b").weight, model.head.original_module.weight)  # from the original
    pa.set_trainable(model, ["b"])
    train_steps(model, x - 1.0, steps=3)
    assert all(torch.equal(head_copy(model, "a").state_dict()[k], v) for k, v in a_head.items())  # a frozen
    assert not torch.equal(head_copy(model, "a").weight, head_copy(model, "b").weight)

    def features(model: nn.Module) -> torch.Tensor:
        return model.net(x)

    outputs = {}
    for name in ("a", "b"):
        pa.set_active(model, [name])
        outputs[name] = model(x).detach()
        assert torch.equal(outputs[name], head_copy(model, name)(features(model)))  # that adapter's head runs
    with pa.disable_adapters(model):
        assert torch.equal(model(x), make_mlp()(x))  # the base head and no adapter
    with pytest.warns(UserWarning, match=r"\['a', 'b'\] are active and each has its own copy of 'head'"):
        pa.set_active(model, ["a", "b"])
    assert model.head.current_name() == "b"
    assert model.head.weight is head_copy(model, "b").weight  # attributes come from the running copy
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x)) and clone.head.modules_to_save["a"] is not head_copy(model, "a")
    saved = {name: pa.save(model, tmp_path / name, name=name) for name in ("a", "b")}
    fresh = make_mlp()
    pa.load(fresh, saved["a"])
    pa.set_active(fresh, [])
    pa.load(fresh, saved["b"])
    for name in ("a", "b"):
        pa.set_active(fresh, [name])
        assert torch.equal(fresh(x), outputs[name])
    pa.detach(fresh, "a")
    assert list(fresh.head.modules_to_save) == ["b"] and torch.equal(fresh(x), outputs["b"])
    pa.detach(fresh, "b")
    assert type(fresh.head) is nn.Linear and torch.equal(fresh(x), make_mlp()(x))


def test_merge_and_unload_keeps_the_trained_copy(x: torch.Tensor) -> None:
    model = trained(x)
    expected = model(x).detach()
    trained_head = head_copy(model, "default")
    pa.merge_and_unload(model)
    assert model.head is trained_head and type(model.head) is nn.Linear
    assert set(model.state_dict()) == set(make_mlp().state_dict())  # the base model's keys
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    other = trained(x)
    pa.set_active(other, [])  # nothing active: merge_and_unload merges nothing and keeps the original
    original = other.head.original_module
    pa.merge_and_unload(other)
    assert other.head is original


def test_modules_with_integer_buffers_round_trip(tmp_path) -> None:
    """BatchNorm's running statistics and its int64 num_batches_tracked are part of the saved copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    pristine = [p.detach().clone() for p in model.parameters()]
    pa.attach(model, "lora", targets="0", rank=2, modules_to_save=["1", "2"])
    data = torch.randn(16, 8)
    train_steps(model, data, steps=2)
    model.eval()
    expected = model(data)
    out = pa.save(model, tmp_path / "bn")
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), pristine))
    pa.load(fresh, out)
    fresh.eval()
    assert fresh[1].modules_to_save["default"].num_batches_tracked.item() == 2
    assert torch.equal(fresh(data), expected)


def test_bad_modules_to_save_are_clear_errors() -> None:
    model = make_mlp()
    before = dict(model.named_modules())
    with pytest.raises(
        pa.AdapterError, match=r"entry 'haed' names no module of MLP .*top-level modules: net, head"
    ):
        pa.attach(model, "lora", targets=TARGETS, rank=2, modules_to_save=["head", "haed"])
    with pytest.raises(pa.AdapterError, match=r"'net\.0' is an adapted layer"):
        pa.attach(model, "lora", targets=TARGETS, rank=2, modules_to_save=[r"net\.0"])
    with pytest.raises(pa.AdapterError, match=r"'net' contains adapted layers \(net\.0"):
        pa.attach(model, "lora", targets=TARGETS, rank=2, modules_to_save=["net"])
    with pytest.raises(pa.AdapterError, match="must be module names"):
        pa.attach(model, "lora", targets=TARGETS, rank=2, modules_to_save=[3])
    assert dict(model.named_modules()) == before  # refused before anything was wrapped
    mha = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    with pytest.raises(pa.AdapterError, match="uses its out_proj weight"):
        pa.attach(mha, "lora", targets="1", rank=2, modules_to_save=["out_proj"])
    # a YAML adapter spec carries modules_to_save to attach
    spec = pa.AdapterSpec(method="lora", targets=TARGETS, modules_to_save=["head"], options={"rank": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.attach(model)
    assert isinstance(model.head, pa.SavedModule)
    with pytest.raises(pa.AdapterError, match="already has a copy for adapter 'default'"):
        pa.attach(model, "lora", targets=TARGETS, rank=2, modules_to_save=["head"])
