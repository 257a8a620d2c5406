"""WaRA and its torch wavelet transforms: against PyWavelets, the Kronecker oracle, the dense form."""

from __future__ import annotations

import numpy as np
import pytest
import pywt  # PyWavelets is a required dependency (the reference here): missing fails, not skips
import torch
from torch import nn

import pathopeft.adapters as pa
from pathopeft.adapters.wavelets import dwt1, dwt2, get_wavelet, idwt1, idwt2


@pytest.mark.parametrize("name", ["haar", "db2", "sym4", "coif1"])
def test_dwt_matches_pywavelets_periodization(name: str) -> None:
    wavelet = get_wavelet(name)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    lo, hi = dwt1(x, wavelet, dim=-1)
    ref_lo, ref_hi = pywt.dwt(x.numpy(), name, mode="periodization", axis=-1)
    np.testing.assert_allclose(lo.numpy(), ref_lo, atol=1e-12)
    np.testing.assert_allclose(hi.numpy(), ref_hi, atol=1e-12)
    back = idwt1(lo, hi, wavelet, dim=-1)
    np.testing.assert_allclose(
        back.numpy(), pywt.idwt(ref_lo, ref_hi, name, mode="periodization", axis=-1), atol=1e-10
    )
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    if wavelet.length <= 8:  # along any axis
        y = torch.randn(3, 8, 5, dtype=torch.float64)
        ref = pywt.dwt(y.numpy(), name, mode="periodization", axis=1)[1]
        np.testing.assert_allclose(dwt1(y, wavelet, dim=1)[1].numpy(), ref, atol=1e-12)
    matrix = torch.randn(16, 24, dtype=torch.float64)
    bands = dwt2(matrix, wavelet, levels=1)
    (ref_ll, (ref_h, ref_v, ref_d)) = pywt.dwt2(matrix.numpy(), name, mode="periodization")
    # pywt's cH is low-pass along columns / high-pass along rows = our HL; cV = our LH
    for ours, ref in (
        (bands["LL1"], ref_ll),
        (bands["HL1"], ref_h),
        (bands["LH1"], ref_v),
        (bands["HH1"], ref_d),
    ):
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-12)
    deep = dwt2(torch.randn(32, 64, dtype=torch.float64), wavelet, levels=2)
    torch.testing.assert_close(
        dwt2(idwt2(deep, wavelet, 2), wavelet, 2)["LL2"], deep["LL2"], atol=1e-10, rtol=0
    )


def test_transforms_are_differentiable_and_orthogonal() -> None:
    wavelet = get_wavelet("db2")
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dwt1(t, wavelet)[1], (x,))
    lo, hi = dwt1(x, wavelet)
    torch.testing.assert_close(lo.square().sum() + hi.square().sum(), x.square().sum())  # energy kept


def _wara_linear(m: int, n: int, **options) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, m))
    pa.attach(model, "wara", targets="0", **options)
    with torch.no_grad():
        for p in model[0].adapters.parameters():
            p.normal_(0, 0.3)
    return model[0]


def test_shared_factors_haar_one_level_kronecker_oracle() -> None:
    layer = _wara_linear(12, 20, rank=3, alpha=6.0, shared_factors=True)
    adapter = layer.adapters["default"]
    b, a = adapter.B["level1"], adapter.A["level1"]
    delta = adapter.delta_weight()
    # the same pair in all four Haar subbands: IDWT2 puts 2·C_ij at (2i, 2j) and 0 elsewhere
    oracle = (6.0 / 3) * torch.kron(b @ a, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(delta, oracle, rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(delta) <= 3
    # METHODS.md's (B A) ⊗ I₂ is the IDWT2 of that pair on the diagonal subbands LL and HH only
    c = (b @ a).detach().double()
    zero = torch.zeros_like(c)
    diagonal = idwt2({"LL1": c, "HH1": c, "LH1": zero, "HL1": zero}, get_wavelet("haar"), 1)
    torch.testing.assert_close(diagonal, torch.kron(c, torch.eye(2, dtype=c.dtype)))
    assert int(torch.linalg.matrix_rank(diagonal)) == 2 * int(torch.linalg.matrix_rank(c))


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 2},
        {"rank": 2, "shared_factors": True},
        {"rank": 1, "levels": 2},
        {"rank": 1, "levels": 2, "wavelet": "db2", "shared_factors": True},
        {"rank": 2, "wavelet": "sym4"},
    ],
)
@pytest.mark.parametrize(("m", "n"), [(16, 32), (13, 22)])  # second: padded to a multiple of 2^levels
def test_factored_forward_equals_dense_update(options: dict, m: int, n: int) -> None:
    if options.get("wavelet") == "sym4":  # 8 taps need ≥ 8 samples per axis
        m, n = m + 3, n
    layer = _wara_linear(m, n, **options)
    adapter = layer.adapters["default"]
    x = torch.randn(5, 3, n)
    delta = adapter.delta_weight()
    assert delta.shape == (m, n)
    torch.testing.assert_close(adapter.delta(x), torch.nn.functional.linear(x, delta), rtol=1e-5, atol=1e-5)
    # ΔW really is (α/r)·IDWT2 of the per-subband products (checked through PyWavelets)
    bands = {k: v.detach().double().numpy() for k, v in adapter.subbands().items()}
    levels = options.get("levels", 1)
    coeffs = [bands[f"LL{levels}"]] + [
        (bands[f"HL{j}"], bands[f"LH{j}"], bands[f"HH{j}"]) for j in range(levels, 0, -1)
    ]
    full = pywt.waverec2(coeffs, options.get("wavelet", "haar"), mode="periodization")
    expected = adapter.scaling * full[:m, :n]
    np.testing.assert_allclose(delta.detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_wara_layer_too_small_for_the_wavelet() -> None:
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(pa.AdapterError, match="too small for 2 level"):
        pa.attach(model, "wara", targets="0", rank=1, levels=2, wavelet="db2")


@pytest.mark.parametrize(
    "options",
    [{"rank": 2}, {"rank": 2, "levels": 3}, {"rank": 1, "levels": 2, "shared_factors": True}],
)
def test_haar_shortcut_equals_the_transform_path(options: dict) -> None:
    """The Haar forward skips the inverse transforms; it must give the very factors they give."""
    layer = _wara_linear(24, 40, **options)
    adapter = layer.adapters["default"]
    fast_a, fast_b = adapter._haar_signal_factors()
    slow_a, slow_b = adapter._synthesised_factors()
    # same pairing and layout; the shortcut moves A's s^j (s = 1/√2) to B's side
    assert fast_a.shape == slow_a.shape and fast_b.shape == slow_b.shape
    ratio = slow_a.abs().sum(1) / fast_a.abs().sum(1)
    torch.testing.assert_close(fast_a * ratio[:, None], slow_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast_b / ratio, slow_b, rtol=1e-6, atol=1e-7)
    assert set(torch.round(torch.log2(ratio) * 2).tolist()) <= {-1.0, -2.0, -3.0, -4.0, -5.0, -6.0}
    assert (fast_b @ fast_a).abs().sum() > 0
    # the shortcut's patterns are ±1 and ±2^-j: exact in bf16, so a dtype round trip keeps them
    buffers = {k: v.clone() for k, v in adapter.named_buffers()}
    assert buffers and all(torch.equal(v, v.bfloat16().float()) for v in buffers.values())
    assert not adapter.state_dict().keys() & buffers.keys()  # derived, not saved


def test_factored_forward_costs_few_operations() -> None:
    """WaRA's forward+backward must not grow with the number of subbands (GPU steps are launch-bound)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    def ops(method: str, **options) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 96))
        pa.attach(model, method, targets="0", **options)
        x = torch.randn(3, 64, requires_grad=True)
        Count.calls = 0
        with Count():
            model(x).sum().backward()
        return Count.calls

    lora = ops("lora", rank=8, alpha=16.0)  # 30 aten calls (torch 2.14)
    # before batching: 6.6×, 28× and 10.7× LoRA's (transform calls per subband, side and level)
    assert ops("wara", rank=4) <= 2.5 * lora
    assert ops("wara", rank=2, levels=3) <= 5 * lora
    assert ops("wara", rank=2, wavelet="db2") <= 5 * lora
