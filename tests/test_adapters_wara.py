"""WaRA and its torch wavelet transforms: against PyWavelets, the Kronecker oracle, the dense form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pathopeft.adapters as pa
from pathopeft.adapters.wavelets import dwt1, dwt2, get_wavelet, idwt1, idwt2

pywt = pytest.importorskip("pywt")


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
