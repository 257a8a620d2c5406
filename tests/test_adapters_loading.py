"""Loading is all-or-nothing and checks what it loads (issue 14 § 2); the folded SALT/SVFit forward."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters_core import TARGETS, make_mlp, train_steps
from torch import nn

import pathopeft.adapters as pa


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(1))


def saved(tmp_path: Path, x: torch.Tensor, method: str = "salt", **options) -> Path:
    model = make_mlp()
    pa.attach(model, method, targets=TARGETS, **(options or {"rank": 2, "lora_rank": 2}))
    train_steps(model, x, steps=2)
    return pa.save(model, tmp_path / "good")


def edited(good: Path, tag: str, config=None, tensors=None, keep_metadata: bool = True) -> Path:
    """A copy of ``good`` with the config document and/or tensors replaced (metadata kept)."""
    folder = good.parent / tag
    shutil.copytree(good, folder)
    if config is not None:
        (folder / pa.CONFIG_NAME).write_text(json.dumps(config))
    if tensors is not None:
        from safetensors import safe_open

        with safe_open(str(good / pa.WEIGHTS_NAME), framework="pt") as handle:
            metadata = handle.metadata() if keep_metadata else None
        save_file(tensors, str(folder / pa.WEIGHTS_NAME), metadata=metadata)
    return folder


def refused(folder: Path, x: torch.Tensor, match: str, **kwargs) -> None:
    fresh = make_mlp()
    before = fresh(x).detach()
    with pytest.raises(pa.AdapterError, match=match):
        pa.load(fresh, folder, **kwargs)
    assert not list(pa.adapted_layers(fresh)), folder.name  # the model was not touched
    assert torch.equal(fresh(x), before)


def document_of(folder: Path) -> dict:
    return json.loads((folder / pa.CONFIG_NAME).read_text())


@pytest.mark.parametrize("bad", ["x.y", "", "a b"])
def test_bad_saved_name_is_refused_before_any_layer_is_wrapped(bad: str, x, tmp_path) -> None:
    good = saved(tmp_path, x)
    refused(edited(good, "name", {**document_of(good), "name": bad}), x, "field 'name'")
    with pytest.raises(pa.AdapterError, match="may only use letters"):
        pa.load(make_mlp(), good, name=bad or "x.y")


def test_tensor_dtypes_and_values_are_checked(x, tmp_path) -> None:
    good = saved(tmp_path, x)
    tensors = load_file(str(good / pa.WEIGHTS_NAME))
    key = "net.0.scale"
    as_int = edited(good, "int", tensors={**tensors, key: tensors[key].to(torch.int64)})
    refused(as_int, x, r"tensor 'net\.0\.scale' has dtype torch\.int64")
    nan = tensors[key].clone()
    nan[0] = float("nan")
    refused(edited(good, "nan", tensors={**tensors, key: nan}), x, r"'net\.0\.scale' holds NaN")
    inf = tensors["net.2.U"].clone()
    inf[0, 0] = float("inf")
    refused(edited(good, "inf", tensors={**tensors, "net.2.U": inf}), x, r"'net\.2\.U' holds NaN or infinite")
    half = edited(good, "half", tensors={k: v.half() for k, v in tensors.items()})
    fresh = make_mlp()
    with pytest.warns(UserWarning, match=r"is torch\.float16, the adapter uses torch\.float32; cast"):
        pa.load(fresh, half, verify_hash=False)
    assert fresh.net[0].adapters["default"].scale.dtype == torch.float32


@pytest.mark.parametrize(
    ("method", "options", "edit"),
    [
        ("lora", {"rank": 2, "alpha": 4.0}, {"alpha": 8.0}),
        ("lora", {"rank": 2}, {"dropout": 0.5}),
        ("wara", {"rank": 1}, {"wavelet": "db2"}),
    ],
)
def test_same_shape_option_edits_are_refused(method, options, edit, x, tmp_path) -> None:
    good = saved(tmp_path, x, method, **options)
    document = document_of(good)
    changed = edited(good, "opt", {**document, "options": {**document["options"], **edit}})
    refused(changed, x, "do not belong together")
    pa.load(make_mlp(), good)  # the unedited pair loads


def test_stray_tensors_and_replaced_svd_factors_are_refused(x, tmp_path) -> None:
    good = saved(tmp_path, x)
    tensors = load_file(str(good / pa.WEIGHTS_NAME))
    stray = {**tensors, "net.0.extra": torch.zeros(3)}
    refused(edited(good, "stray", tensors=stray), x, "do not belong together")
    refused(edited(good, "stray2", tensors=stray, keep_metadata=False), x, r"unknown tensor 'net\.0\.extra'")
    q, _ = torch.linalg.qr(torch.randn(tensors["net.0.U"].shape))
    replaced = {**tensors, "net.0.U": q.contiguous()}  # orthonormal, right shape, wrong layer
    refused(edited(good, "factor", tensors=replaced), x, r"net\.0: the saved SVD factors .* not an SVD")
    swapped = {**tensors, "net.0.S": tensors["net.0.S"].flip(0).contiguous()}
    refused(edited(good, "order", tensors=swapped), x, "sorted descending")


def test_saved_factors_are_used_not_recomputed(x, tmp_path) -> None:
    """Flip the sign of one remaining singular pair (a valid SVD too): the loaded model follows the file."""
    model = make_mlp()
    pa.attach(model, "salt", targets=r"net\.0", rank=2, lora_rank=2)
    with torch.no_grad():
        model.net[0].adapters["default"].Y.normal_(0, 0.5)  # M has off-diagonal entries
    good = pa.save(model, tmp_path / "good")
    tensors = load_file(str(good / pa.WEIGHTS_NAME))
    u, vh = tensors["net.0.U"].clone(), tensors["net.0.Vh"].clone()
    u[:, 3], vh[3] = -u[:, 3], -vh[3]
    flipped = edited(good, "flip", tensors={**tensors, "net.0.U": u, "net.0.Vh": vh})
    from_file, recomputed = make_mlp(), make_mlp()
    pa.load(from_file, flipped)
    pa.load(recomputed, good)
    adapter = from_file.net[0].adapters["default"]
    assert torch.equal(adapter.U, u) and torch.equal(adapter.Vh, vh)
    # M's row/column 1 (pair 3) changes sign, so ΔW and the output differ from the unflipped file
    assert (from_file(x) - recomputed(x)).abs().max() > 1e-4
    expected = (
        adapter.U @ torch.block_diag(torch.diag(adapter.top_delta()), adapter.rest_delta()) @ adapter.Vh
    )
    torch.testing.assert_close(adapter.delta_weight(), expected, rtol=1e-5, atol=1e-6)


def test_base_hash_is_checked(x, tmp_path) -> None:
    good = saved(tmp_path, x)
    document = document_of(good)
    refused(edited(good, "bh", {**document, "base_hash": "0" * 64}), x, "field 'base_hash' does not match")


def test_base_edit_after_a_merge_cycle_is_still_caught(x, tmp_path) -> None:
    model = make_mlp()
    pa.attach(model, "lora", targets=TARGETS, rank=2)
    train_steps(model, x, steps=2)
    pa.merge(model)
    pa.unmerge(model)
    pa.save(model, tmp_path / "fine")  # own merge/unmerge rounding is not an edit
    with torch.no_grad():
        model.net[2].base_layer.weight.add_(1.0)
    with pytest.raises(pa.AdapterError, match=r"net\.2: the base weights changed"):
        pa.save(model, tmp_path / "edited")
    pa.merge(model)  # re-recording at merge must not forget the edit
    pa.unmerge(model)
    with pytest.raises(pa.AdapterError, match=r"net\.2: the base weights changed"):
        pa.save(model, tmp_path / "edited2")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"weight_shape": "32x16"}, "field 'weight_shape' must be a list of positive integers"),
        ({"weight_shape": [32, 16.5]}, "field 'weight_shape'"),
        ({"kind": "lstm"}, "field 'kind'"),
        ({"hash": 5}, "field 'hash'"),
        ({"meta": [1]}, "field 'meta'"),
    ],
)
def test_layer_fields_are_validated(edit, match, x, tmp_path) -> None:
    good = saved(tmp_path, x)
    document = document_of(good)
    layers = {**document["layers"], "net.2": {**document["layers"]["net.2"], **edit}}
    refused(edited(good, "f", {**document, "layers": layers}), x, match)


def test_svfit_rank_empty_layers_and_nested_wrappers(x, tmp_path) -> None:
    good = saved(tmp_path, x, "svfit", energy=0.9)
    document = document_of(good)
    layers = {**document["layers"], "net.2": {**document["layers"]["net.2"], "meta": {"rank": "3"}}}
    tensors = load_file(str(good / pa.WEIGHTS_NAME))  # an old file without the metadata hash
    bad_rank = edited(good, "rank", {**document, "layers": layers}, tensors, keep_metadata=False)
    refused(bad_rank, x, "meta field 'rank' must be an integer")
    refused(edited(good, "rank2", {**document, "layers": layers}), x, "do not belong together")
    refused(edited(good, "empty", {**document, "layers": {}}), x, "'layers' is empty")
    nested = {"net.0.base_layer": document["layers"]["net.0"]}
    refused(edited(good, "nested", {**document, "layers": nested}), x, "inside an adapter wrapper")
    # a model already wrapped: a saved name pointing inside the wrapper is refused, not double-wrapped
    lora = make_mlp()
    pa.attach(lora, "lora", targets=TARGETS, rank=2, name="other")
    inner = {k.replace("net.0", "net.0.base_layer"): v for k, v in document["layers"].items()}
    with pytest.raises(pa.AdapterError, match="inside an adapter wrapper"):
        pa.load(lora, edited(good, "inner", {**document, "layers": inner}))
    assert pa.adapter_names(lora) == ["other"]


def test_wara_shared_haar_one_level_warns() -> None:
    with pytest.warns(UserWarning, match="quarter of W's entries"):
        pa.make_config("wara", rank=2, shared_factors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pa.make_config("wara", rank=2, shared_factors=True, levels=2)


# ---- folded forward (issue 14 § 1) ----------------------------------------------------------


def _layer(method: str, m: int, n: int, **options) -> pa.AdaptedLayer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, m))
    pa.attach(model, method, targets="0", **options)
    return model[0]


@pytest.mark.parametrize(("method", "options"), [("salt", {"ratio": 0.1, "lora_rank": 4}), ("svfit", {})])
@pytest.mark.parametrize(("m", "n"), [(96, 32), (32, 96)])
def test_folded_forward_exact_at_init_and_equal_to_residual(method, options, m, n) -> None:
    layer = _layer(method, m, n, **options)
    adapter = layer.adapters["default"]
    calls = []
    original = adapter.fold_weight
    adapter.fold_weight = lambda: calls.append(1) or original()  # type: ignore[method-assign]
    x = torch.randn(4, 200, n, requires_grad=True)  # 800 tokens: folding is the cheaper form here
    base = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    assert torch.equal(layer(x), base) and calls  # folded, and W + ΔW = W bit for bit
    with torch.no_grad():
        assert torch.equal(layer(x), base)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folded = layer(x)
    grads_f = torch.autograd.grad(folded.square().sum(), [x, *adapter.parameters()])
    layer.fold_mode = "never"
    calls.clear()
    residual = layer(x)
    assert not calls
    grads_r = torch.autograd.grad(residual.square().sum(), [x, *adapter.parameters()])
    torch.testing.assert_close(folded, residual, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_f, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_cost_model_choices() -> None:
    """SALT folds for many tokens only; SVFit only when r > mn / (2(m+n)) (METHODS.md § SALT)."""
    salt = _layer("salt", 1152, 384, ratio=0.1, lora_rank=12).adapters["default"]
    residual, folded = salt.forward_costs(1576, backward=True)
    assert folded < residual  # ViT-S qkv, batch 8 at 224 px
    residual, folded = salt.forward_costs(64, backward=True)
    assert folded > residual
    crossover = next(t for t in range(1, 2000) if (c := salt.forward_costs(t, True))[1] < c[0])
    assert 250 <= crossover <= 600, crossover  # METHODS.md: ≈ 450 on qkv
    low = _layer("svfit", 1152, 384, max_rank=100).adapters["default"]  # 100 < 1152·384/3072 = 144
    high = _layer("svfit", 1152, 384, max_rank=200).adapters["default"]
    assert low.forward_costs(100_000, True)[1] > low.forward_costs(100_000, True)[0]
    assert high.forward_costs(100_000, True)[1] < high.forward_costs(100_000, True)[0]
