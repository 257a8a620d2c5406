"""SVFit and SALT: rank choice, the SVD factors they keep, and their factored forwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pathopeft.adapters as pa
from pathopeft.adapters.svfit import energy_rank


def matrix_with_spectrum(singular_values: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(singular_values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


# s² = 64, 16, 9, 4, 1, 1, 0.25, 0.25 -> total 95.5; cumulative shares 0.670, 0.838, 0.932, 0.974, 0.984, ...
SPECTRUM = [8.0, 4.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize(
    ("energy", "max_rank", "expected"),
    [
        (0.5, None, 1),
        (0.67, None, 1),
        (0.68, None, 2),
        (0.9, None, 3),
        (0.97, None, 4),
        (0.99, None, 6),
        (1.0, None, 8),
        (0.99, 3, 3),
    ],
)
def test_svfit_energy_rank_on_a_known_spectrum(energy: float, max_rank: int | None, expected: int) -> None:
    weight = matrix_with_spectrum(SPECTRUM, 12, 10).float()
    assert energy_rank(torch.tensor(SPECTRUM), energy, max_rank) == expected
    model = nn.Sequential(nn.Linear(10, 12))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    options = {"energy": energy} | ({"max_rank": max_rank} if max_rank else {})
    pa.attach(model, "svfit", targets="0", **options)
    adapter = model[0].adapters["default"]
    assert adapter.rank == expected
    assert pa.trainable_parameters(model)["per_adapter"]["default"] == expected
    torch.testing.assert_close(adapter.S, torch.tensor(SPECTRUM[:expected]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.sigma.detach(), adapter.S)
    assert adapter.U.shape == (12, expected) and adapter.Vh.shape == (expected, 10)


def test_svfit_delta_is_the_singular_value_change() -> None:
    weight = matrix_with_spectrum(SPECTRUM, 12, 10).float()
    model = nn.Sequential(nn.Linear(10, 12))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    pa.attach(model, "svfit", targets="0", energy=0.9)
    adapter = model[0].adapters["default"]
    with torch.no_grad():
        adapter.sigma.copy_(torch.tensor([9.0, 3.0, 0.0]))
    # W' = W_e + U_r diag(σ) V_rᵀ: singular values 9, 3 replace 8, 4; the third direction is removed
    merged_s = torch.linalg.svdvals((weight + adapter.delta_weight()).double())
    expected = torch.tensor(
        sorted([9.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0], reverse=True), dtype=torch.float64
    )
    torch.testing.assert_close(merged_s, expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), x @ (weight + adapter.delta_weight()).T + model[0].base_layer.bias)


def _salt_layer(m: int, n: int, **options) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, m))
    pa.attach(model, "salt", targets="0", **options)
    return model[0]


def test_salt_rank_from_ratio_or_rank_and_factors() -> None:
    layer = _salt_layer(24, 40, ratio=0.3, lora_rank=3)
    adapter = layer.adapters["default"]
    assert (adapter.rank, adapter.rest) == (7, 17)  # int(24·0.3) = 7, R − r = 17
    weight = layer.base_layer.weight
    torch.testing.assert_close(adapter.U @ torch.diag(adapter.S) @ adapter.Vh, weight, atol=1e-5, rtol=1e-5)
    assert torch.all(adapter.S[:-1] >= adapter.S[1:])
    assert _salt_layer(24, 40, ratio=0.01, lora_rank=3).adapters["default"].rank == 1  # max(1, ·)
    assert _salt_layer(24, 40, rank=5, ratio=0.9, lora_rank=3).adapters["default"].rank == 5
    full = _salt_layer(6, 8, rank=6, lora_rank=2).adapters["default"]  # no remaining subspace
    assert full.rest == 0 and full.num_parameters() == 12


@pytest.mark.parametrize(("m", "n", "tokens"), [(24, 40, 3), (24, 40, 64), (40, 24, 64)])
def test_salt_forward_paths_equal_the_dense_update(m: int, n: int, tokens: int) -> None:
    layer = _salt_layer(m, n, ratio=0.25, lora_rank=4)
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.scale.uniform_(0.0, 2.0)
        adapter.shift.normal_(0, 0.5)
        adapter.Y.normal_(0, 0.5)
        adapter.shift[0] = -adapter.scale[0] * adapter.S[0] - 1.0  # forces the relu to clip s_0'
    s = adapter.S
    pre_top = adapter.scale * s[: adapter.rank] + adapter.shift
    assert pre_top[0] < 0  # clipping happens, whatever the seed
    top = adapter.top_delta()
    assert top[0] == -s[0]  # relu(·) = 0: the singular value is removed
    torch.testing.assert_close(top, torch.clamp(pre_top, min=0) - s[: adapter.rank])
    pre_rest = torch.diag(s[adapter.rank :]) + adapter.X @ adapter.Y
    assert (pre_rest < 0).any()  # off-diagonal negatives of X Y are clipped too
    rest = adapter.rest_delta()
    torch.testing.assert_close(rest, torch.clamp(pre_rest, min=0) - torch.diag(s[adapter.rank :]))
    x = torch.randn(tokens, n)  # 3 tokens: per-token path; 64: folded into the smaller SVD factor
    expected = torch.nn.functional.linear(x, adapter.delta_weight())
    torch.testing.assert_close(adapter.delta(x), expected, rtol=1e-4, atol=1e-5)
    # the two decomposition terms of METHODS.md, built directly
    u, s, vh = adapter.U, adapter.S, adapter.Vh
    r = adapter.rank
    s_r_new = torch.relu(adapter.scale * s[:r] + adapter.shift)
    sigma_new = torch.relu(torch.diag(s[r:]) + adapter.X @ adapter.Y)
    direct = (
        u[:, :r] @ torch.diag(s_r_new - s[:r]) @ vh[:r] + u[:, r:] @ (sigma_new - torch.diag(s[r:])) @ vh[r:]
    )
    torch.testing.assert_close(adapter.delta_weight(), direct, rtol=1e-4, atol=1e-5)


def test_salt_gradients_reach_all_parameter_groups() -> None:
    layer = _salt_layer(24, 40, ratio=0.25, lora_rank=4)
    adapter = layer.adapters["default"]
    opt = torch.optim.SGD(adapter.parameters(), lr=1e-3)
    x, target = torch.randn(64, 40), torch.randn(64, 24)
    for _ in range(2):
        opt.zero_grad()
        (layer(x) - target).square().mean().backward()
        opt.step()
    grads = {name: p.grad.abs().sum().item() for name, p in adapter.named_parameters()}
    assert all(value > 0 for value in grads.values()), grads


THREAD_PROBE = """
import torch
from pathopeft.adapters import base

def threads():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))

seen = []
svd = base.float32_svd
def recording(matrix):
    out = svd(matrix)
    seen.append(threads())  # LAPACK's OpenMP team of this pool thread is still alive here
    return out
base.float32_svd = recording
torch.set_num_threads(2)
start = threads()
base.float32_svd_many([torch.randn(768, 384) for _ in range(6)])
print(start, max(seen))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="counts threads through /proc")
def test_svd_pool_threads_do_not_oversubscribe() -> None:
    """Each pool thread must run LAPACK single-threaded: OpenMP/MKL thread counts are per thread.

    With OMP_NUM_THREADS=6 and 2 pool workers, the old pool ran 2 × 6 LAPACK threads (15 in the
    process; 7× slower on a shared 2-core machine, 16 × 16 on a 16-core GPU host).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "6", "MKL_NUM_THREADS": "6"}
    out = subprocess.run(
        [sys.executable, "-c", THREAD_PROBE], capture_output=True, text=True, env=env, check=True
    )
    start, peak = map(int, out.stdout.split())
    assert peak <= start + 3, (start, peak)  # the 2 workers (+1 slack), not 2 teams of 6
