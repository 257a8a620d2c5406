"""WaRA: low-rank factors in the wavelet domain of the weight update (METHODS.md § WaRA).

``ΔW = (α/r) · crop(IDWT2({B_k A_k}))``, one pair per subband k (``B_k`` zeros, ``A_k``
Kaiming-uniform) or, with ``shared_factors``, one pair per level shared by that level's subbands.

The forward never builds ΔW: the wavelet is orthogonal, so
``IDWT2(C) = Σ_k S_rows,kᵀ B_k A_k S_cols,k`` and each factor can be carried back to the signal
domain by a 1-D inverse transform of the (small) factor itself (see ``signal_factors``); the
layer then applies a LoRA-like pair, for nn.Linear and nn.Conv2d (kernel as out × in·kh·kw) alike.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator
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


def _haar_pattern(bands: str, level: int, rank: int) -> torch.Tensor:
    """Rows ``h_band ⊗ 1_{2^(level-1)}`` (h_L = [1, 1], h_H = [1, −1]), each repeated ``rank`` times."""
    ones = torch.ones(2 ** (level - 1))
    rows = [torch.kron(torch.tensor([1.0, 1.0 if band == "L" else -1.0]), ones) for band in bands]
    return torch.stack(rows).repeat_interleave(rank, dim=0)


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
        # band names grouped by level, deepest first (LL last within its level), for signal_factors
        self.by_level = [
            [band for band in self.shapes if int(band[2:]) == level] for level in range(levels, 0, -1)
        ]
        if self.wavelet.name == "haar":  # synthesis patterns of the fast path (derived, not saved)
            for index, bands in enumerate(self.by_level):
                level = int(bands[0][2:])
                a_pattern = _haar_pattern("".join(band[1] for band in bands), level, r)
                b_pattern = _haar_pattern("".join(band[0] for band in bands), level, r) * 2.0**-level
                self.register_buffer(f"haar_a{index}", a_pattern[:, None, :], persistent=False)
                self.register_buffer(f"haar_b{index}", b_pattern.T.contiguous()[None], persistent=False)

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

    def _synthesise(
        self, coeffs: list[torch.Tensor], bands: str, carried: torch.Tensor | None, dim: int
    ) -> torch.Tensor:
        """One synthesis level for all factors of a level at once (few kernels: the GPU is launch-bound).

        ``coeffs[i]`` sits in band ``bands[i]`` (``L``/``H``) along ``dim`` with the other band zero;
        ``carried`` (the factors of deeper levels, already synthesised down to this level's size)
        sits in ``L``. Factors are stacked along the rank axis (``1 − dim``), so the result holds
        every factor's synthesis side by side, ``carried`` first.
        """
        stack_dim = 1 - dim
        zero = torch.zeros_like(coeffs[0])
        lo = [c if band == "L" else zero for c, band in zip(coeffs, bands)]
        hi = [zero if band == "L" else c for c, band in zip(coeffs, bands)]
        if carried is not None:
            lo.insert(0, carried)
            hi.insert(0, torch.zeros_like(carried))
        return idwt1(torch.cat(lo, dim=stack_dim), torch.cat(hi, dim=stack_dim), self.wavelet, dim)

    def signal_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_all, B_all)`` with ``ΔW = (α/r)·B_all A_all``: the factors taken out of the wavelet domain.

        Subband k contributes ``S_rows,kᵀ B_k A_k S_cols,k``; since the transform is orthogonal,
        ``A_k S_cols,k`` is the synthesis of A_k's rows and ``S_rows,kᵀ B_k`` that of B_k's
        columns. Stacking all subbands gives a LoRA-like pair of rank (#subbands · r), so the
        forward is two matmuls (costing like LoRA of that rank) plus transforms of the small
        factors: one batched inverse transform per level and side, deepest level first (its
        synthesis is carried up through the finer levels as an approximation band).
        """
        if self.wavelet.name == "haar":
            return self._crop(*self._haar_signal_factors())
        return self._crop(*self._synthesised_factors())

    def _synthesised_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Any orthogonal wavelet: batched inverse transforms of the factors (before cropping)."""
        a_all = b_all = None
        for bands in self.by_level:  # deepest level first
            pairs = [self.factors(band) for band in bands]
            a_all = self._synthesise([a for _, a in pairs], "".join(b[1] for b in bands), a_all, dim=1)
            b_all = self._synthesise([b for b, _ in pairs], "".join(b[0] for b in bands), b_all, dim=0)
        assert a_all is not None and b_all is not None
        return a_all, b_all

    def _crop(self, a_all: torch.Tensor, b_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the zero-padding rows/columns (no slice at all when there is none: one kernel less)."""
        m, n = self.geometry.out_features, self.geometry.in_features
        return (a_all if a_all.shape[1] == n else a_all[:, :n]), (b_all if b_all.shape[0] == m else b_all[:m])

    def _haar_signal_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Haar shortcut of the synthesis: per level one concatenation and one broadcast multiply a side.

        Haar synthesis has no overlap between filter taps: a coefficient in band L (H) at level j
        becomes the block ``c·s^j·(h ⊗ 1_{2^(j-1)})`` of 2^j samples with ``h = [1, 1]`` (``[1, −1]``)
        and s = 1/√2. The ±1 patterns sit on A's side, both sides' ``s^j`` (= 2^-j, exact in any
        float dtype) on B's side, so the pair needs no transform calls at all.
        """
        a_parts, b_parts = [], []
        for index, bands in enumerate(self.by_level):
            pairs = [self.factors(band) for band in bands]
            a = torch.cat([a for _, a in pairs], dim=0)  # (bands·r) × n_j
            b = torch.cat([b for b, _ in pairs], dim=1)  # m_j × (bands·r)
            a_parts.append((a.unsqueeze(-1) * getattr(self, f"haar_a{index}")).flatten(-2))
            b_parts.append((b.unsqueeze(1) * getattr(self, f"haar_b{index}")).flatten(0, 1))
        if len(a_parts) == 1:
            return a_parts[0], b_parts[0]
        return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a_all, b_all = self.signal_factors()
        g = self.geometry
        # α/r goes into the small m×(4r) factor, not onto the T×m output (one kernel fewer per pass)
        b_all = b_all if self.scaling == 1.0 else b_all * self.scaling
        return g.up(g.down(self.dropout(x), a_all), b_all)

    @property
    def dtype(self) -> torch.dtype:  # read on every forward: straight from the ParameterDict's storage
        return next(iter(self.A._parameters.values())).dtype  # type: ignore[union-attr]


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
    (rank ≤ r; it changes only a quarter of W's entries, so that combination warns);
    ``(BA) ⊗ I₂`` is what the same pair placed on LL and HH only would give.
    Trainable per layer: ``Σ_k r·(m_k + n_k)`` over subbands (or over levels when shared);
    one level, unshared: ``2r(m_p + n_p)``.
    """

    method: ClassVar[str] = "wara"
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")
    module_cls: ClassVar[type[AdapterModule]] = WaraModule
    rank_field: ClassVar[str | None] = "rank"
    alpha_field: ClassVar[str | None] = "alpha"

    rank: int = Field(4, gt=0)  # r per subband; one level unshared ≈ LoRA rank 2r in size and cost
    alpha: float = Field(8.0, gt=0)  # scaling α/r, as LoRA
    wavelet: str = "haar"  # orthogonal PyWavelets family name
    levels: int = Field(1, ge=1, le=6)  # decomposition depth (LL is decomposed again)
    shared_factors: bool = False  # one (B, A) pair per level instead of one per subband
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input

    @model_validator(mode="after")
    def _warn_quarter_update(self) -> WaraConfig:
        if self.shared_factors and self.wavelet == "haar" and self.levels == 1:
            warnings.warn(
                "WaRA shared_factors with Haar at one level gives ΔW = (α/r)·(BA) ⊗ [[2,0],[0,0]]: it can "
                "change only a quarter of W's entries (use levels ≥ 2, another wavelet or unshared factors)",
                UserWarning,
                stacklevel=2,
            )
        return self

    @field_validator("wavelet")
    @classmethod
    def _known_wavelet(cls, value: str) -> str:
        try:
            get_wavelet(value)
        except AdapterError as exc:
            raise ValueError(str(exc)) from None
        return value
