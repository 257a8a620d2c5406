"""WaRA: low-rank factors in the wavelet domain of the weight update (METHODS.md § WaRA).

``ΔW = (α/r) · crop(IDWT2({B_k A_k}))``, one pair per subband k (``B_k`` zeros, ``A_k``
Kaiming-uniform) or, with ``shared_factors``, one pair per level shared by that level's subbands.

The forward never builds ΔW: the wavelet is orthogonal, so
``IDWT2(C) = Σ_k S_rows,kᵀ B_k A_k S_cols,k`` and each factor can be carried back to the signal
domain by a 1-D inverse transform of the (small) factor itself (see ``signal_factors``); the
layer then applies a LoRA-like pair, for nn.Linear and nn.Conv2d (kernel as out × in·kh·kw) alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from pathopeft.adapters.base import AdapterError, AdapterModule, LayerGeometry, kaiming_uniform
from pathopeft.adapters.registry import AdapterConfig, register_method
from pathopeft.adapters.wavelets import get_wavelet, idwt1, idwt2, subband_names

__all__ = ["WaraConfig", "WaraModule", "subband_shapes"]


def _padded(size: int, levels: int) -> int:
    step = 2**levels
    return -(-size // step) * step


def subband_shapes(out_features: int, in_features: int, levels: int) -> dict[str, tuple[int, int]]:
    """Shape of every subband of the zero-padded ``m_p × n_p`` update (multiples of 2^levels)."""
    m_p, n_p = _padded(out_features, levels), _padded(in_features, levels)
    return {name: (m_p >> int(name[2:]), n_p >> int(name[2:])) for name in subband_names(levels)}


def _factor_key(band: str, shared: bool) -> str:
    return f"level{band[2:]}" if shared else band


class WaraModule(AdapterModule):
    def __init__(
        self,
        geometry: LayerGeometry,
        config: WaraConfig,
        weight: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(geometry, config)
        self.wavelet = get_wavelet(config.wavelet)
        m, n, levels, r = geometry.out_features, geometry.in_features, config.levels, config.rank
        self.shapes = subband_shapes(m, n, levels)
        self.padded = (_padded(m, levels), _padded(n, levels))
        smallest = min(min(shape) for shape in self.shapes.values())
        for size in self.padded:  # every analysis level needs an even length ≥ the filter length
            if (size >> (levels - 1)) < max(2, self.wavelet.length):
                raise AdapterError(
                    f"layer {m}×{n} is too small for {levels} level(s) of wavelet {config.wavelet!r}"
                )
        if r > smallest:
            raise AdapterError(
                f"WaRA rank {r} is larger than the layer allows (smallest subband: {smallest})"
            )
        self.scaling = config.alpha / r
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for band, (rows, cols) in self.shapes.items():
            key = _factor_key(band, config.shared_factors)
            if key not in self.A:
                self.A[key] = nn.Parameter(kaiming_uniform(r, cols))
                self.B[key] = nn.Parameter(torch.zeros(rows, r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def factors(self, band: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = _factor_key(band, self.config.shared_factors)  # type: ignore[attr-defined]
        return self.B[key], self.A[key]

    def subbands(self) -> dict[str, torch.Tensor]:
        """The wavelet-domain update ``C_k = B_k A_k`` for every subband (before α/r)."""
        return {band: b @ a for band in self.shapes for b, a in [self.factors(band)]}

    def delta_weight(self) -> torch.Tensor:
        levels = self.config.levels  # type: ignore[attr-defined]
        bands = {k: v.float() for k, v in self.subbands().items()}
        full = idwt2(bands, self.wavelet, levels)
        m, n = self.geometry.out_features, self.geometry.in_features
        return full[:m, :n] * self.scaling

    def _to_signal(self, coeffs: torch.Tensor, band: str, level: int, dim: int) -> torch.Tensor:
        """Synthesis of ``coeffs`` placed in one band (L/H) at ``level``, every other band zero."""
        zeros = torch.zeros_like(coeffs)
        out = (
            idwt1(coeffs, zeros, self.wavelet, dim)
            if band == "L"
            else idwt1(zeros, coeffs, self.wavelet, dim)
        )
        for _ in range(level - 1):
            out = idwt1(out, torch.zeros_like(out), self.wavelet, dim)
        return out

    def signal_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_all, B_all)`` with ``ΔW = (α/r)·B_all A_all``: the factors taken out of the wavelet domain.

        Subband k contributes ``S_rows,kᵀ B_k A_k S_cols,k``; since the transform is orthogonal,
        ``A_k S_cols,k`` is the synthesis of A_k's rows and ``S_rows,kᵀ B_k`` that of B_k's
        columns. Stacking all subbands gives a LoRA-like pair of rank (#subbands · r), so the
        forward is two matmuls (costing like LoRA of that rank) plus transforms of the small factors.
        """
        m, n = self.geometry.out_features, self.geometry.in_features
        a_rows, b_cols = [], []
        for band in self.shapes:  # band = <row band><col band><level>
            b, a = self.factors(band)
            level = int(band[2:])
            a_rows.append(self._to_signal(a, band[1], level, dim=1))
            b_cols.append(self._to_signal(b, band[0], level, dim=0))
        return torch.cat(a_rows, dim=0)[:, :n], torch.cat(b_cols, dim=1)[:m]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a_all, b_all = self.signal_factors()
        g = self.geometry
        return g.up(g.down(self.dropout(x), a_all), b_all) * self.scaling


@register_method
class WaraConfig(AdapterConfig):
    """WaRA options.

    This project's choices (the official code could not be inspected): the 2-D DWT is the
    separable Mallat transform in periodization mode with an orthogonal wavelet (default Haar;
    db*/sym*/coif* via PyWavelets' filter taps), ``levels`` default 1; the update matrix is
    zero-padded to a multiple of 2^levels and cropped back; every subband k gets rank ``rank``
    factors ``B_k`` (zeros) and ``A_k`` (Kaiming-uniform, a=√5, like LoRA's A); scaling α/r as LoRA.
    ``shared_factors``: one pair per level shared by that level's subbands (at one level: one pair
    for LL, LH, HL, HH). Note: for Haar at one level this gives ``ΔW = (α/r)·(BA) ⊗ [[2,0],[0,0]]``
    (rank ≤ r); ``(BA) ⊗ I₂`` is what the same pair placed on LL and HH only would give.
    Trainable per layer: ``Σ_k r·(m_k + n_k)`` over subbands (or over levels when shared);
    one level, unshared: ``2r(m_p + n_p)``.
    """

    method: ClassVar[str] = "wara"
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")
    module_cls: ClassVar[type[AdapterModule]] = WaraModule

    rank: int = Field(4, gt=0)  # r per subband; one level unshared ≈ LoRA rank 2r in size and cost
    alpha: float = Field(8.0, gt=0)  # scaling α/r, as LoRA
    wavelet: str = "haar"  # orthogonal PyWavelets family name
    levels: int = Field(1, ge=1, le=6)  # decomposition depth (LL is decomposed again)
    shared_factors: bool = False  # one (B, A) pair per level instead of one per subband
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input

    @field_validator("wavelet")
    @classmethod
    def _known_wavelet(cls, value: str) -> str:
        try:
            get_wavelet(value)
        except AdapterError as exc:
            raise ValueError(str(exc)) from None
        return value
