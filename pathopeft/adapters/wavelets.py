"""Differentiable 1-D and 2-D discrete wavelet transforms in torch (periodization mode).

Orthogonal wavelets only (Haar built in; ``db*``, ``sym*``, ``coif*`` take their filter taps from
PyWavelets). With periodization and even lengths the analysis operator is orthogonal, so the
inverse transform is exactly its adjoint: that is what lets WaRA apply ``ΔW = IDWT2(C)`` to an
input without building ΔW (analysis on the input, synthesis on the output). Results match
``pywt.dwt/idwt(..., mode="periodization")`` and, for 2-D, subbands ``LL, LH, HL, HH`` where the
first letter is the band along rows (axis 0, the output axis of a weight) and the second along
columns (axis 1, the input axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from pathopeft.adapters.base import AdapterError

__all__ = ["Wavelet", "dwt1", "dwt2", "get_wavelet", "idwt1", "idwt2", "subband_names"]


@dataclass(frozen=True)
class Wavelet:
    name: str
    dec_lo: tuple[float, ...]
    dec_hi: tuple[float, ...]

    @property
    def length(self) -> int:
        return len(self.dec_lo)

    def filters(self, like: torch.Tensor) -> torch.Tensor:
        """(2, 1, L) conv1d weight: reversed decomposition filters (conv1d correlates)."""
        taps = torch.tensor([self.dec_lo[::-1], self.dec_hi[::-1]], dtype=like.dtype, device=like.device)
        return taps[:, None, :]


@lru_cache(maxsize=32)
def get_wavelet(name: str) -> Wavelet:
    """Haar without PyWavelets; any other orthogonal family through ``pywt.Wavelet(name)``."""
    if name == "haar":
        s = 1.0 / math.sqrt(2.0)
        return Wavelet("haar", (s, s), (-s, s))
    import pywt  # only needed for the non-Haar families

    try:
        wavelet = pywt.Wavelet(name)
    except ValueError:
        raise AdapterError(
            f"unknown wavelet {name!r} (PyWavelets names such as haar, db2, sym4, coif1)"
        ) from None
    if not wavelet.orthogonal:
        raise AdapterError(f"wavelet {name!r} is not orthogonal; use haar, db*, sym* or coif*")
    return Wavelet(name, tuple(wavelet.dec_lo), tuple(wavelet.dec_hi))


def _check_length(n: int, wavelet: Wavelet) -> None:
    if n % 2 or n < wavelet.length:
        raise AdapterError(f"wavelet {wavelet.name}: length {n} must be even and ≥ {wavelet.length}")


def dwt1(x: torch.Tensor, wavelet: Wavelet, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """One analysis level along ``dim`` (even length N): approximation and detail, N/2 each."""
    xt = x.movedim(dim, -1)
    n = xt.shape[-1]
    _check_length(n, wavelet)
    if wavelet.name == "haar":  # same numbers as the conv path, without the conv
        s = wavelet.dec_lo[0]
        pairs = xt.unflatten(-1, (n // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        lo, hi = (even + odd) * s, (even - odd) * s
    else:
        pad = wavelet.length // 2 - 1
        flat = xt.reshape(-1, 1, n)
        padded = torch.cat([flat[..., n - pad :], flat, flat[..., :pad]], dim=-1)
        out = F.conv1d(padded, wavelet.filters(xt), stride=2).reshape(*xt.shape[:-1], 2, n // 2)
        lo, hi = out[..., 0, :], out[..., 1, :]
    return lo.movedim(-1, dim), hi.movedim(-1, dim)


def idwt1(lo: torch.Tensor, hi: torch.Tensor, wavelet: Wavelet, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`dwt1` (its exact adjoint, the transform being orthogonal)."""
    lo_t, hi_t = lo.movedim(dim, -1), hi.movedim(dim, -1)
    half = lo_t.shape[-1]
    n = 2 * half
    _check_length(n, wavelet)
    if wavelet.name == "haar":
        s = wavelet.dec_lo[0]
        out = torch.stack([(lo_t + hi_t) * s, (lo_t - hi_t) * s], dim=-1).flatten(-2)
    else:
        pad = wavelet.length // 2 - 1
        coeffs = torch.stack([lo_t, hi_t], dim=-2).reshape(-1, 2, half)
        full = F.conv_transpose1d(coeffs, wavelet.filters(lo_t), stride=2)[:, 0]  # length n + 2·pad
        out = full[:, pad : pad + n]
        if pad:
            middle = full.new_zeros(full.shape[0], n - 2 * pad)
            out = out + torch.cat([full[:, n + pad :], middle, full[:, :pad]], dim=-1)
        out = out.reshape(*lo_t.shape[:-1], n)
    return out.movedim(-1, dim)


def subband_names(levels: int) -> list[str]:
    """``LH1, HL1, HH1, ..., LH<L>, HL<L>, HH<L>, LL<L>`` (level 1 is the finest)."""
    names = [f"{band}{j}" for j in range(1, levels + 1) for band in ("LH", "HL", "HH")]
    return [*names, f"LL{levels}"]


def dwt2(matrix: torch.Tensor, wavelet: Wavelet, levels: int = 1) -> dict[str, torch.Tensor]:
    """Multi-level 2-D DWT of an (m, n) matrix (Mallat: the LL band is decomposed again)."""
    bands: dict[str, torch.Tensor] = {}
    current = matrix
    for j in range(1, levels + 1):
        row_lo, row_hi = dwt1(current, wavelet, dim=0)
        current, bands[f"LH{j}"] = dwt1(row_lo, wavelet, dim=1)
        bands[f"HL{j}"], bands[f"HH{j}"] = dwt1(row_hi, wavelet, dim=1)
    bands[f"LL{levels}"] = current
    return bands


def idwt2(bands: dict[str, torch.Tensor], wavelet: Wavelet, levels: int = 1) -> torch.Tensor:
    """Inverse of :func:`dwt2`."""
    current = bands[f"LL{levels}"]
    for j in range(levels, 0, -1):
        row_lo = idwt1(current, bands[f"LH{j}"], wavelet, dim=1)
        row_hi = idwt1(bands[f"HL{j}"], bands[f"HH{j}"], wavelet, dim=1)
        current = idwt1(row_lo, row_hi, wavelet, dim=0)
    return current
