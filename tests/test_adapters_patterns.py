"""Per-layer options (issue 14 § 3): rank_pattern / alpha_pattern / layer_options, HF PEFT style."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from test_adapters_core import TARGETS, make_mlp, train_steps

import pathopeft.adapters as pa


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(1))


def shapes(model: torch.nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    return {
        name: {key: tuple(p.shape) for key, p in layer.adapters["default"].named_parameters()}
        for name, layer in pa.adapted_layers(model)
    }


def test_rank_and_alpha_patterns_end_up_in_the_shapes_and_scaling() -> None:
    model = make_mlp()  # net.0: 32×16, net.2: 12×32
    pa.attach(model, "lora", targets=TARGETS, rank=2, rank_pattern={"0": 6}, alpha_pattern={r"net\.2": 3.0})
    assert shapes(model) == {
        "net.0": {"lora_A": (6, 16), "lora_B": (32, 6)},  # suffix "0" -> rank 6
        "net.2": {"lora_A": (2, 32), "lora_B": (12, 2)},  # the adapter-wide rank
    }
    assert model.net[0].adapters["default"].scaling == 8.0 / 6  # alpha 8 / rank 6
    assert model.net[2].adapters["default"].scaling == 3.0 / 2  # alpha_pattern (full-match regex)
    # per_adapter still counts every layer's own parameters: r·(m + n) with each layer's r
    assert pa.trainable_parameters(model)["per_adapter"]["default"] == 6 * (32 + 16) + 2 * (12 + 32)


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        # SALT: rank_pattern sets r (scale/shift of the top r singular values) on that layer
        ("salt", {"rank": 2, "lora_rank": 2, "rank_pattern": {"0": 5}}, {"net.0": (5, 2), "net.2": (2, 2)}),
        # SVFit: rank_pattern caps the energy rank (max_rank) on that layer
        ("svfit", {"energy": 1.0, "rank_pattern": {"2": 3}}, {"net.0": (16,), "net.2": (3,)}),
        # WaRA: rank per subband, via layer_options (any option by name)
        ("wara", {"rank": 2, "layer_options": {"0": {"rank": 3}}}, {"net.0": (3,), "net.2": (2,)}),
        (
            "owlora",
            {"rank": 2, "protect_base": False, "rank_pattern": {"0": 4}},
            {"net.0": (4,), "net.2": (2,)},
        ),
    ],
)
def test_every_method_takes_per_layer_ranks(method: str, options: dict, expected: dict) -> None:
    model = make_mlp()
    pa.attach(model, method, targets=TARGETS, **options)
    for name, layer in pa.adapted_layers(model):
        adapter = layer.adapters["default"]
        if method == "salt":
            got = (adapter.scale.shape[0], adapter.X.shape[1])
        elif method == "svfit":
            got = tuple(adapter.sigma.shape)
        elif method == "wara":
            got = (next(iter(adapter.A.values())).shape[0],)
        else:
            got = (adapter.w.shape[0],)
        assert got == expected[name], name


def test_patterns_are_recorded_and_round_trip_on_load(x: torch.Tensor, tmp_path) -> None:
    model = make_mlp()
    options = {
        "rank": 2,
        "rank_pattern": {"0": 6},
        "layer_options": {r"net\.2": {"alpha": 1.0, "dropout": 0.1}},
    }
    pa.attach(model, "lora", targets=TARGETS, **options)
    train_steps(model, x, steps=2)
    model.eval()
    expected = model(x).detach()
    out = pa.save(model, tmp_path / "ad")
    saved = json.loads((out / pa.CONFIG_NAME).read_text())["options"]
    assert saved["rank_pattern"] == {"0": 6}
    assert saved["layer_options"] == {r"net\.2": {"alpha": 1.0, "dropout": 0.1}}
    fresh = make_mlp()
    pa.load(fresh, out)
    fresh.eval()
    assert shapes(fresh) == shapes(model)
    assert fresh.net[2].adapters["default"].config.dropout == 0.1  # the layer's resolved options
    assert fresh.net[2].adapters["default"].adapter_config == model.net[2].adapters["default"].adapter_config
    assert torch.equal(fresh(x), expected)
    # the same name attached again with the same patterns extends the adapter (the config is one)
    other = make_mlp()
    pa.attach(other, "lora", targets=r"net\.0", **options | {"layer_options": {}})
    with pytest.raises(pa.AdapterError, match="already exists .* other options"):
        pa.attach(other, "lora", targets=r"net\.2", **options)


def test_patterns_that_match_nothing_or_conflict_are_errors(x: torch.Tensor, tmp_path) -> None:
    model = make_mlp()
    before = dict(model.named_modules())
    with pytest.raises(
        pa.AdapterError,
        match=r"rank_pattern: pattern\(s\) \['fc9'\] match none of the adapted layers \(net\.0, net\.2\)",
    ):
        pa.attach(model, "lora", targets=TARGETS, rank_pattern={"fc9": 4})
    with pytest.raises(
        pa.AdapterError, match=r"net\.0: per-layer patterns '0' and 'net\\\\.0' both set 'rank'"
    ):
        pa.attach(
            model, "lora", targets=TARGETS, layer_options={"0": {"rank": 4}}, rank_pattern={r"net\.0": 5}
        )
    with pytest.raises(pa.AdapterError, match=r"net\.2: LoRA rank 13 is larger than the layer allows"):
        pa.attach(model, "lora", targets=TARGETS, rank_pattern={"2": 13})
    assert dict(model.named_modules()) == before  # every refusal left the model untouched
    with pytest.raises(pa.AdapterError, match=r"layer_options\['0'\]: unknown option\(s\) \['ranks'\]"):
        pa.make_config("lora", layer_options={"0": {"ranks": 3}})
    with pytest.raises(pa.AdapterError, match=r"rank_pattern\.0: Input should be greater than 0"):
        pa.make_config("lora", rank_pattern={"0": 0})
    with pytest.raises(pa.AdapterError, match="alpha_pattern: method 'svfit' has no alpha option"):
        pa.make_config("svfit", alpha_pattern={"0": 2.0})
    with pytest.raises(pa.AdapterError, match=r"\['ortho_lambda'\] apply to the whole adapter"):
        pa.make_config("owlora", layer_options={"0": {"ortho_lambda": 2.0}})
    with pytest.raises(pa.AdapterError, match=r"per-layer options for '0': dropout: .*less than 1"):
        pa.make_config("lora", layer_options={"0": {"dropout": 1.5}})
    with pytest.raises(pa.AdapterError, match="not a valid regex"):
        pa.make_config("lora", rank_pattern={"a[": 2})
    # a YAML adapter spec validates per-layer options at config-load time
    with pytest.raises(ValueError, match="unknown option"):
        pa.AdapterSpec(method="lora", options={"layer_options": {"0": {"alpah": 1.0}}})
    # a saved file whose pattern matches none of its layers (edited, hash dropped) names the file
    pa.attach(model, "lora", targets=TARGETS, rank=2, rank_pattern={"0": 4})
    out = pa.save(model, tmp_path / "ad")
    document = json.loads((out / pa.CONFIG_NAME).read_text())
    document["options"]["rank_pattern"] = {"fc9": 4}
    (out / pa.CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(pa.AdapterError, match=r"adapter_config\.json: rank_pattern: pattern\(s\) \['fc9'\]"):
        pa.load(make_mlp(), out)


def test_no_patterns_means_one_shared_config_object() -> None:
    """Without patterns every layer keeps the adapter's own config (no per-layer copies, no re-validation:
    WaRA's shared-factors warning is raised once, not once per layer)."""
    model = make_mlp()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        config = pa.make_config("wara", rank=2, shared_factors=True)
        pa.attach(model, config, targets=TARGETS)
    assert len([w for w in seen if "quarter" in str(w.message)]) == 1
    assert all(layer.adapters["default"].config is config for _, layer in pa.adapted_layers(model))
