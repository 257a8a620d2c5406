"""Adapter library on a plain MLP (and a small conv net): the contract every method must keep."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import pathopeft.adapters as pa

METHODS = {
    "lora": {"rank": 4, "alpha": 8.0},
    "salt": {"ratio": 0.25, "lora_rank": 2},
    "svfit": {"energy": 0.9},
    "wara": {"rank": 2},
    "owlora": {"rank": 4, "protect_base": False},
}
TARGETS = r"net\.(0|2)"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 12), nn.LayerNorm(12))
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - 1.0).square().mean()
        loss.backward()
        opt.step()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_init_output_equals_base_exactly(method: str, x: torch.Tensor) -> None:
    model = make_mlp()
    before = model(x)
    names = pa.attach(model, method, targets=TARGETS, **METHODS[method])
    assert names == ["net.0", "net.2"]
    assert isinstance(model.net[0], pa.AdaptedLayer)
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_unmerge_restores(method: str, x: torch.Tensor) -> None:
    model = make_mlp()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pa.attach(model, method, targets=TARGETS, **METHODS[method])
    train_steps(model, x)
    adapted = model(x).detach()
    assert rel(adapted, make_mlp()(x).detach()) > 1e-4  # training really changed the output
    assert pa.merge(model) == ["default"]
    assert model.net[0].merged == ["default"]
    assert not model.net[0]._live  # merged forward is the base call only
    assert rel(model(x).detach(), adapted) <= 1e-5
    assert not torch.equal(model.net[0].base_layer.weight, original["net.0.weight"])
    assert pa.unmerge(model) == ["default"]
    for key in ("net.0.weight", "net.2.weight"):
        restored = model.get_submodule(key.rsplit(".", 1)[0]).base_layer.weight
        torch.testing.assert_close(restored, original[key], rtol=0, atol=1e-6)
    assert rel(model(x).detach(), adapted) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_train(method: str, x: torch.Tensor) -> None:
    model = make_mlp()
    pa.attach(model, method, targets=TARGETS, **METHODS[method])
    base_names = [n for n, _ in model.named_parameters() if ".adapters." not in n]
    frozen = {n: p.clone() for n, p in model.named_parameters() if n in base_names}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    (model(x) - 1).square().mean().backward()
    for name, p in model.named_parameters():
        if name in base_names:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n not in base_names)
    opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def _energy_rank_np(weight: np.ndarray, energy: float) -> int:
    # torch's svdvals (numpy's threaded LAPACK crawls on a shared machine); the rank rule is re-done here
    s = torch.linalg.svdvals(torch.from_numpy(weight)).double().numpy()
    share = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(share >= energy - 1e-12) + 1)


def expected_count(method: str, options: dict, weight: torch.Tensor) -> int:
    """METHODS.md's trainable-parameter formula for one layer, computed independently."""
    m, n = weight.shape[0], int(np.prod(weight.shape[1:]))
    big_r = min(m, n)
    if method == "lora":
        return options["rank"] * (m + n)
    if method == "owlora":
        return options["rank"] * (m + n) + options["rank"]
    if method == "svfit":
        rank = _energy_rank_np(weight.reshape(m, n).numpy(), options.get("energy", 0.99))
        return min(rank, options.get("max_rank") or rank)
    if method == "salt":
        r = options.get("rank") or max(1, int(big_r * options.get("ratio", 0.1)))
        return 2 * r + 2 * options["lora_rank"] * (big_r - r)
    if method == "wara":
        r, levels = options["rank"], options.get("levels", 1)
        step = 2**levels
        m_p, n_p = -(-m // step) * step, -(-n // step) * step
        if options.get("shared_factors"):
            return sum(r * (m_p // 2**j + n_p // 2**j) for j in range(1, levels + 1))
        detail = sum(3 * r * (m_p // 2**j + n_p // 2**j) for j in range(1, levels + 1))
        return detail + r * (m_p // step + n_p // step)
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_counts_match_formulas(method: str) -> None:
    model = make_mlp()
    weights = [model.net[0].weight.detach().clone(), model.net[2].weight.detach().clone()]
    total_before = sum(p.numel() for p in model.parameters())
    pa.attach(model, method, targets=TARGETS, **METHODS[method])
    expected = sum(expected_count(method, METHODS[method], w) for w in weights)
    info = pa.trainable_parameters(model)
    assert info["per_adapter"] == {"default": expected}
    assert info["trainable"] == expected
    assert info["total"] == total_before + expected
    assert info["share"] == pytest.approx(expected / (total_before + expected))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("wara", {"rank": 2, "levels": 2}),
        ("wara", {"rank": 2, "shared_factors": True}),
        ("salt", {"rank": 3, "lora_rank": 5}),
    ],
)
def test_trainable_counts_other_options(method: str, options: dict) -> None:
    model = make_mlp()
    weights = [model.net[0].weight.detach().clone(), model.net[2].weight.detach().clone()]
    pa.attach(model, method, targets=TARGETS, **options)
    expected = sum(expected_count(method, options, w) for w in weights)
    assert pa.trainable_parameters(model)["per_adapter"]["default"] == expected


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, dilation=1, bias=False)
        self.proj = nn.Conv2d(6, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


CONV_METHODS = {
    "lora": {"rank": 2},
    "salt": {"rank": 2, "lora_rank": 2},
    "svfit": {"energy": 0.95},
    "wara": {"rank": 1},
    "owlora": {"rank": 2, "protect_base": False},
}


@pytest.mark.parametrize("method", CONV_METHODS)
def test_conv2d_adapters_follow_the_reshaped_kernel(method: str) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(2, 3, 12, 12)
    before = model(x)
    pa.attach(model, method, targets=r"conv\d|proj", **CONV_METHODS[method])
    assert torch.equal(model(x), before)
    with torch.no_grad():  # random adapter state, then the factored forward must equal W + ΔW
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    for layer in (model.conv1, model.conv2, model.proj):
        adapter = layer.adapters["default"]
        inp = torch.randn(2, layer.base_layer.in_channels, 7, 7)
        weight = layer.base_layer.weight + layer.geometry.as_weight(adapter.delta_weight())
        expected = layer.base_layer._conv_forward(inp, weight, layer.base_layer.bias)
        torch.testing.assert_close(layer(inp), expected, rtol=1e-4, atol=1e-5)
    adapted = model(x).detach()
    pa.merge(model)
    assert rel(model(x).detach(), adapted) <= 1e-5


def test_errors_name_the_problem() -> None:
    model = make_mlp()
    with pytest.raises(pa.AdapterError, match="unknown adapter method 'lorra'.*lora"):
        pa.attach(model, "lorra", targets=TARGETS)
    with pytest.raises(pa.AdapterError, match=r"selected no module.*net\.0"):
        pa.attach(model, "lora", targets=r"blocks\.\d+\.qkv")
    with pytest.raises(pa.AdapterError, match=r"net\.1 \(GELU\)"):
        pa.attach(model, "lora", targets=r"net\.\d")
    with pytest.raises(
        pa.AdapterError, match=r"net\.2: LoRA rank 13 is larger than the layer allows \(min\(out, in\) = 12\)"
    ):
        pa.attach(model, "lora", targets=TARGETS, rank=13)
    with pytest.raises(pa.AdapterError, match=r"lora_rank 20 is larger than the layer allows"):
        pa.attach(model, "salt", targets=TARGETS, rank=2, lora_rank=20)
    with pytest.raises(pa.AdapterError, match=r"SALT rank 40 is larger"):
        pa.attach(model, "salt", targets=TARGETS, rank=40)
    with pytest.raises(
        pa.AdapterError, match=r"WaRA rank 7 is larger than the layer allows \(smallest subband: 6\)"
    ):
        pa.attach(model, "wara", targets=TARGETS, rank=7)
    with pytest.raises(
        pa.AdapterError, match=r"invalid options for adapter method 'lora': rnak: unknown option"
    ):
        pa.attach(model, "lora", targets=TARGETS, rnak=4)
    with pytest.raises(pa.AdapterError, match="rank: Input should be greater than 0"):
        pa.attach(model, "lora", targets=TARGETS, rank=0)
    with pytest.raises(pa.AdapterError, match="unknown wavelet 'db99"):
        pa.attach(model, "wara", targets=TARGETS, wavelet="db99")
    with pytest.raises(pa.AdapterError, match="not orthogonal"):
        pa.attach(model, "wara", targets=TARGETS, wavelet="bior2.2")
    with pytest.raises(pa.AdapterError, match="only use letters"):
        pa.attach(model, "lora", targets=TARGETS, name="a.b")
    with pytest.raises(pa.AdapterError, match="invalid target pattern"):
        pa.attach(model, "lora", targets="(")
    # every failure above left the model untouched
    assert not list(pa.adapted_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    pa.attach(model, "lora", targets=TARGETS, rank=2)
    with pytest.raises(pa.AdapterError, match="already attached"):
        pa.attach(model, "lora", targets=TARGETS, rank=2)
    with pytest.raises(pa.AdapterError, match=r"unknown adapter\(s\) \['nope'\]"):
        pa.set_active(model, ["nope"])
    conv = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(pa.AdapterError, match="groups=2"):
        pa.attach(conv, "lora", targets="0", rank=1)


def test_exclude_and_wrapped_layers_are_selected_once() -> None:
    model = make_mlp()
    assert pa.attach(model, "lora", targets=r".*", exclude=r"net\.1|net\.3|net|head", rank=2) == [
        "net.0",
        "net.2",
    ]
    # a second adapter matches the wrappers, never their insides (".*" would hit base_layer)
    assert pa.attach(model, "lora", targets=r"net\..*", exclude=r"net\.(1|3)", name="b", rank=2) == [
        "net.0",
        "net.2",
    ]
    assert list(model.net[0].adapters) == ["default", "b"]


def test_several_named_adapters_and_set_active(x: torch.Tensor) -> None:
    model = make_mlp()
    base = model(x).detach()
    pa.attach(model, "lora", targets=TARGETS, name="a", rank=2)
    pa.attach(model, "wara", targets=r"net\.0", name="b", rank=2)
    assert pa.adapter_names(model) == ["a", "b"]
    assert pa.active_adapters(model) == ["a", "b"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.normal_(0, 0.2)

    def forward_with(active: list[str]) -> torch.Tensor:
        pa.set_active(model, active)
        return model(x).detach()

    both, only_a, only_b, none = (
        forward_with(["a", "b"]),
        forward_with(["a"]),
        forward_with(["b"]),
        forward_with([]),
    )
    assert torch.equal(none, base)
    assert len({tuple(t.flatten().tolist()) for t in (both, only_a, only_b, none)}) == 4
    # manual check on the first layer: y = W x + ΔW_a x + ΔW_b x
    layer = model.net[0]
    pa.set_active(model, ["a", "b"])
    w = layer.base_layer.weight + layer.adapters["a"].delta_weight() + layer.adapters["b"].delta_weight()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, layer.base_layer.bias))
    counts = pa.trainable_parameters(model)["per_adapter"]
    assert counts == {"a": 2 * (16 + 32) + 2 * (32 + 12), "b": 2 * 2 * (32 + 16)}
    pa.set_trainable(model, ["b"])
    assert not model.net[0].adapters["a"].lora_A.requires_grad
    assert all(p.requires_grad for p in model.net[0].adapters["b"].parameters())
    pa.merge(model, ["a"])
    with pytest.raises(pa.AdapterError, match="merged into the weights"):
        pa.set_active(model, ["b"])
    pa.unmerge(model)
    pa.detach(model, "a")
    assert pa.adapter_names(model) == ["b"]
    assert isinstance(model.net[2], nn.Linear)  # unwrapped: no adapter left there
    pa.detach(model, "b")
    assert not list(pa.adapted_layers(model))
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_dtype_and_device_moves_carry_buffers_and_bf16_autocast(method: str, x: torch.Tensor) -> None:
    model = make_mlp()
    pa.attach(model, method, targets=TARGETS, **METHODS[method])
    train_steps(model, x, steps=2)
    reference = model(x).detach()
    model64 = copy.deepcopy(model).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in [*model64.parameters(), *model64.buffers()])
    torch.testing.assert_close(model64(x.double()).float(), reference, rtol=1e-4, atol=1e-5)
    # bf16 keeps 8 significant bits (eps = 2^-7): a few roundings per layer, 3 layers deep, stay
    # within a few eps of the fp32 result; a wrong cast (e.g. an adapter dropped) is off by far more
    eps = torch.finfo(torch.bfloat16).eps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x)
    assert mixed.dtype == torch.bfloat16
    assert rel(mixed.float(), reference) < 3 * eps
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert rel(bf16(x.bfloat16()).float(), reference) < 3 * eps
    no_adapter = copy.deepcopy(model)
    pa.set_active(no_adapter, [])
    assert rel(no_adapter(x).detach(), reference) > 10 * eps  # the tolerance can tell the adapter is there
    meta = copy.deepcopy(model).to("meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    assert len(list(meta.buffers())) == len(list(model.buffers()))


def test_fp32_adapters_on_a_bf16_base_without_autocast(x: torch.Tensor) -> None:
    model = make_mlp().to(torch.bfloat16)
    pa.attach(model, "salt", targets=TARGETS, rank=2, lora_rank=2)
    adapter = model.net[0].adapters["default"]
    assert adapter.U.dtype == torch.float32  # SVD factors are float32
    out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert adapter.Y.grad is not None and adapter.Y.grad.dtype == torch.float32
    assert adapter.Y.grad.abs().sum() > 0


def test_adapter_spec_validates_options_at_config_time() -> None:
    from pydantic import ValidationError

    spec = pa.AdapterSpec(method="salt", targets=TARGETS, options={"rank": 2, "lora_rank": 2})
    assert isinstance(spec.config(), pa.SaltConfig)
    model = make_mlp()
    assert spec.attach(model) == ["net.0", "net.2"]
    with pytest.raises(ValidationError, match="lora_rnak: unknown option"):
        pa.AdapterSpec(method="salt", options={"lora_rnak": 2})
    with pytest.raises(ValidationError, match="unknown adapter method 'dora'"):
        pa.AdapterSpec(method="dora")
    with pytest.raises(ValidationError, match="unknown key|Extra inputs"):
        pa.AdapterSpec(method="lora", rank=4)
    assert pa.available_methods() == ["lora", "owlora", "salt", "svfit", "wara"]
    assert pa.get_method("wara") is pa.WaraConfig


def test_lora_dropout_only_in_training(x: torch.Tensor) -> None:
    model = make_mlp()
    pa.attach(model, "lora", targets=TARGETS, rank=4, dropout=0.5)
    with torch.no_grad():
        for layer in (model.net[0], model.net[2]):
            layer.adapters["default"].lora_B.normal_()
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_salt_regulariser(x: torch.Tensor) -> None:
    model = make_mlp()
    pa.attach(model, "salt", targets=TARGETS, rank=2, lora_rank=2, reg=0.5)
    assert float(pa.salt.regularization(model).detach()) == 0.0
    train_steps(model, x, steps=2)
    layer = model.net[0].adapters["default"]
    s = layer.S
    manual = 0.0
    for wrapped in (model.net[0], model.net[2]):
        a = wrapped.adapters["default"]
        top = torch.relu(a.scale * a.S[:2] + a.shift) - a.S[:2]
        manual = manual + 0.5 * (top.norm() + (a.X @ a.Y).norm())
    term = pa.salt.regularization(model)
    torch.testing.assert_close(term, manual)
    torch.testing.assert_close(pa.regularization(model), manual)
    term.backward()
    assert layer.X.grad is not None and s.grad is None
    unreg = make_mlp()
    pa.attach(unreg, "salt", targets=TARGETS, rank=2, lora_rank=2)
    assert float(pa.regularization(unreg)) == 0.0


def test_import_stays_light() -> None:
    code = (
        "import sys, pathopeft.adapters as pa\n"
        "bad = [m for m in ('transformers', 'peft', 'lightning', 'timm', 'pywt') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_on_a_fresh_model(method: str, x: torch.Tensor, tmp_path) -> None:
    model = make_mlp()
    pa.attach(model, method, targets=TARGETS, **METHODS[method])
    train_steps(model, x, steps=2)
    expected = model(x).detach()
    pa.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [pa.CONFIG_NAME, pa.WEIGHTS_NAME]
    document = pa.read_adapter_config(tmp_path)
    assert (
        document["method"] == method
        and document["options"] == pa.make_config(method, **METHODS[method]).model_dump()
    )
    assert set(document["layers"]) == {"net.0", "net.2"}
    assert document["layers"]["net.0"]["weight_shape"] == [32, 16]
    assert document["layers"]["net.0"]["hash"] == pa.layer_hash(make_mlp().net[0])
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / pa.WEIGHTS_NAME))
    module = model.net[0].adapters["default"]
    assert set(stored) >= {f"net.0.{k}" for k in module.state_dict()}  # buffers (SVD factors) included
    fresh = make_mlp()
    assert pa.load(fresh, tmp_path) == "default"
    assert torch.equal(fresh(x), expected)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded frozen by default
    assert pa.load(fresh, tmp_path, name="copy", trainable=True) == "copy"
    assert all(p.requires_grad for p in fresh.net[0].adapters["copy"].parameters())


def test_save_load_refusals_and_extras(x: torch.Tensor, tmp_path) -> None:
    model = make_mlp()
    pa.attach(model, "lora", targets=TARGETS, rank=2)
    train_steps(model, x, steps=2)
    with pytest.raises(pa.AdapterError, match="no adapter named 'other'"):
        pa.save(model, tmp_path / "x", name="other")
    with pytest.raises(pa.AdapterError, match="adapter config not found"):
        pa.load(make_mlp(), tmp_path / "missing")
    # norms trained next to the adapter travel with it when asked
    model.net[3].weight.requires_grad_(True)
    train_steps(model, x, steps=2)
    expected = model(x).detach()
    pa.save(model, tmp_path / "with_norm", extra_parameters=r"net\.3\..*")
    assert pa.read_adapter_config(tmp_path / "with_norm")["extra_parameters"] == [
        "net.3.bias",
        "net.3.weight",
    ]
    fresh = make_mlp()
    pa.load(fresh, tmp_path / "with_norm")
    assert torch.equal(fresh(x), expected)
    with pytest.raises(pa.AdapterError, match="matched no base parameter"):
        pa.save(model, tmp_path / "bad", extra_parameters=r"nothing")
    # merged: still saved against the recorded (unmerged) base hash
    pa.merge(model)
    pa.save(model, tmp_path / "merged")
    other = make_mlp()
    pa.load(other, tmp_path / "merged")
    torch.testing.assert_close(other.net[0](x), model.net[0](x), rtol=1e-5, atol=1e-6)
    # a base modified after attach (never merged) cannot be represented by the adapter alone
    edited = make_mlp()
    pa.attach(edited, "lora", targets=TARGETS, rank=2)
    with torch.no_grad():
        edited.net[2].base_layer.weight.add_(1.0)
    with pytest.raises(
        pa.AdapterError, match=r"net\.2: the base weights changed since the adapter was attached"
    ):
        pa.save(edited, tmp_path / "edited")
    with pytest.raises(pa.AdapterError, match=r"net\.0: base weights differ"):
        pa.load(make_mlp(seed=5), tmp_path / "merged")
    with pytest.raises(pa.AdapterError, match="already attached; pass name= to rename"):
        pa.load(other, tmp_path / "merged")
    # no partial files left behind by the atomic writers
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]


def test_wrapper_exposes_base_attributes() -> None:
    model = make_mlp()
    pa.attach(model, "lora", targets=TARGETS, rank=2)
    layer = model.net[0]
    assert layer.weight is layer.base_layer.weight and layer.in_features == 16 and layer.out_features == 32
    assert "base_layer.weight" in dict(layer.named_parameters())
    assert set(model.state_dict()) >= {"net.0.base_layer.weight", "net.0.adapters.default.lora_A"}


def test_adapter_name_stands_for_one_method_and_options(x: torch.Tensor, tmp_path) -> None:
    model = make_mlp()
    pa.attach(model, "lora", targets=r"net\.0", rank=2)
    assert pa.attach(model, "lora", targets=r"net\.2", rank=2) == ["net.2"]  # same config: extends it
    clash = r"adapter named 'default' already exists.*\(lora, other options\)"
    with pytest.raises(pa.AdapterError, match=clash):
        pa.attach(model, "svfit", targets="head")
    with pytest.raises(pa.AdapterError, match="already exists"):
        pa.attach(model, "lora", targets="head", rank=3)
    assert [n for n, _ in pa.adapted_layers(model)] == ["net.0", "net.2"]
    pa.save(model, tmp_path)
    assert set(pa.read_adapter_config(tmp_path)["layers"]) == {"net.0", "net.2"}


def test_layers_their_parent_never_calls_are_refused() -> None:
    model = nn.Module()
    model.mha = nn.MultiheadAttention(16, 2, batch_first=True)
    with pytest.raises(pa.AdapterError, match=r"mha\.out_proj: nn\.MultiheadAttention uses its out_proj"):
        pa.attach(model, "lora", targets=r".*out_proj", rank=2)
    assert not list(pa.adapted_layers(model))


def test_broken_adapter_files_name_the_file_and_change_nothing(x: torch.Tensor, tmp_path) -> None:
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    model = make_mlp()
    pa.attach(model, "salt", targets=TARGETS, rank=2, lora_rank=2)
    good = pa.save(model, tmp_path / "good")
    document = json.loads((good / pa.CONFIG_NAME).read_text())

    def broken(tag: str, config: object = None, weights: dict | bytes | None = None):
        folder = tmp_path / tag
        shutil.copytree(good, folder)
        if config is not None:
            (folder / pa.CONFIG_NAME).write_text(json.dumps(config))
        if isinstance(weights, bytes):
            (folder / pa.WEIGHTS_NAME).write_bytes(weights)
        elif weights is not None:
            save_file(weights, str(folder / pa.WEIGHTS_NAME))
        return folder

    tensors = load_file(str(good / pa.WEIGHTS_NAME))
    cases = {
        "corrupt": (
            broken("corrupt", weights=b"garbage"),
            r"corrupt/adapter_model\.safetensors: not a readable",
        ),
        "options": (
            broken("options", {**document, "options": {"rank": 2, "lora_rnak": 2}}),
            r"options/adapter_config\.json: invalid options for adapter method 'salt': lora_rnak",
        ),
        "method": (broken("method", {**document, "method": "dora"}), r"method/adapter_config\.json: unknown"),
        "list": (broken("list", [1, 2]), r"list/adapter_config\.json: not a pathopeft adapter"),
        "layer": (
            broken("layer", {**document, "layers": {**document["layers"], "net.0": {"kind": "linear"}}}),
            r"layer 'net\.0' lacks weight_shape, hash",
        ),
        "tensors": (  # the last layer's tensors are missing: found only after earlier layers were built
            broken("tensors", weights={k: v for k, v in tensors.items() if not k.startswith("net.2.")}),
            r"tensors for net\.2 do not fit",
        ),
    }
    for folder, message in cases.values():
        fresh = make_mlp()
        before = fresh(x).detach()
        with pytest.raises(pa.AdapterError, match=message):
            pa.load(fresh, folder)
        assert not list(pa.adapted_layers(fresh)), folder.name  # nothing attached
        assert torch.equal(fresh(x), before)


def _aten_calls(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), Record():
        model(x)
    return calls


@pytest.mark.parametrize("autocast", [False, True])
def test_merged_forward_runs_exactly_the_base_models_operations(x: torch.Tensor, autocast: bool) -> None:
    """'Merged inference costs the base model's time', checked without a clock: same aten calls."""
    # frozen like an adapted base (autocast caches only trainable casts)
    base = make_mlp().requires_grad_(False)
    merged = copy.deepcopy(base)
    pa.attach(merged, "salt", targets=TARGETS, rank=2, lora_rank=2)
    pa.attach(merged, "lora", targets=TARGETS, name="b", rank=2)
    train_steps(merged, x, steps=1)
    unmerged_calls = _aten_calls(merged, x, autocast)
    pa.merge(merged)
    assert _aten_calls(merged, x, autocast) == _aten_calls(base, x, autocast)
    assert len(unmerged_calls) > len(_aten_calls(base, x, autocast))
