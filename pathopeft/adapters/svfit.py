"""SVFit: fine-tune only the top-r singular values of each weight (METHODS.md § SVFit).

``ΔW = U_r diag(σ − s_r) V_rᵀ`` with trainable ``σ`` (init ``s_r``), r chosen per layer as the
smallest rank holding ``energy`` of ``Σ s²`` (capped by ``max_rank``). The frozen residual
``W_e = W − U_r diag(s_r) V_rᵀ`` is never stored: in the residual form ``y = W x + ΔW x`` it is
implicit in ``W`` itself. Forward: ``W x + U_r((σ − s_r) ⊙ (V_rᵀ x))``, never an m×n matrix.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from pathopeft.adapters.base import AdapterError, AdapterModule, LayerGeometry, check_svd, float32_svd
from pathopeft.adapters.registry import AdapterConfig, register_method

__all__ = ["SvfitConfig", "SvfitModule", "energy_rank"]


def energy_rank(singular_values: torch.Tensor, energy: float, max_rank: int | None = None) -> int:
    """Smallest r with ``Σ_{i<r} s_i² ≥ energy · Σ s²`` (s sorted descending), capped by ``max_rank``."""
    s2 = singular_values.detach().double() ** 2
    total = float(s2.sum())
    if total <= 0.0:
        rank = 1
    else:
        kept = torch.cumsum(s2, 0) / total
        # tolerance: cumulative sums of float64 may land a hair below an energy that is hit exactly
        rank = int((kept < energy - 1e-12).sum()) + 1
    rank = min(rank, singular_values.numel())
    return min(rank, max_rank) if max_rank is not None else rank


class SvfitModule(AdapterModule):
    def __init__(
        self,
        geometry: LayerGeometry,
        config: SvfitConfig,
        weight: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
        svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(geometry, config)
        m, n = geometry.out_features, geometry.in_features
        if weight is not None:
            u, s, vh = svd if svd is not None else float32_svd(weight)
            r = energy_rank(s, config.energy, config.max_rank)
            u, s, vh = u[:, :r].contiguous(), s[:r].contiguous(), vh[:r].contiguous()
        else:
            r = (meta or {}).get("rank")
            if not isinstance(r, int) or isinstance(r, bool):
                raise AdapterError(f"saved SVFit meta field 'rank' must be an integer, got {r!r}")
            if not 0 < r <= geometry.rank_limit:
                raise AdapterError(
                    f"saved SVFit rank {r} does not fit the layer (min(out, in) = {geometry.rank_limit})"
                )
            u, s, vh = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
        self.rank = r
        self.register_buffer("U", u)  # U_r (m×r), frozen
        self.register_buffer("S", s)  # s_r, frozen reference values
        self.register_buffer("Vh", vh)  # V_rᵀ (r×n), frozen
        self.sigma = nn.Parameter(s.clone())  # trainable singular values σ, init s_r

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return g.up(g.scale(g.down(x, self.Vh), self.sigma - self.S), self.U)

    def delta_weight(self) -> torch.Tensor:
        return (self.U.float() * (self.sigma.float() - self.S.float())) @ self.Vh.float()

    def fold_weight(self) -> torch.Tensor:
        return (self.U * (self.sigma - self.S)) @ self.Vh

    def forward_costs(self, tokens: int, backward: bool) -> tuple[float, float]:
        """Multiply-adds (residual, folded): ``T·r·(m+n)`` per pass against building ``ΔW`` (``m·n·r``)
        plus, when training, the weight gradient ``T·m·n`` and ``∂σ`` through the build (``m·n·r``).
        Folding pays only for ``r > mn / (2(m+n))`` (METHODS.md § SALT)."""
        m, n, r, t = self.geometry.out_features, self.geometry.in_features, self.rank, tokens
        residual, folded = t * r * (m + n), m * n * r
        if backward:
            residual, folded = 2 * residual, folded + t * m * n + m * n * r
        return float(residual), float(folded)

    def check_factors(self, weight: torch.Tensor) -> str | None:
        return check_svd(weight, self.U, self.S, self.Vh)

    def meta(self) -> dict[str, Any]:
        return {"rank": self.rank}


@register_method
class SvfitConfig(AdapterConfig):
    """SVFit options. Trainable per layer: r (the energy rank of that layer)."""

    method: ClassVar[str] = "svfit"
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")
    module_cls: ClassVar[type[AdapterModule]] = SvfitModule
    uses_svd: ClassVar[bool] = True
    rank_field: ClassVar[str | None] = "max_rank"  # rank_pattern caps the energy rank per layer

    energy: float = Field(0.99, gt=0.0, le=1.0)  # share of Σ s² the kept singular values must hold
    max_rank: int | None = Field(None, gt=0)  # optional cap on r per layer
