"""SALT: scale/shift the top-r singular values, low-rank-update the rest (METHODS.md § SALT).

``ΔW = U_r diag(relu(a ⊙ s_r + c) − s_r) V_rᵀ + U_⊥ (relu(diag(s_⊥) + X Y) − diag(s_⊥)) V_⊥ᵀ``.

The forward never builds an m×n matrix. The R×R mixing ``D = blockdiag(δ, M)`` is applied
either per token (``up(D·down(x))``, for few tokens) or, for batches with more tokens than
``min(m, n)``, folded into the smaller of the two SVD factors once per forward (``D Vh`` is R×n,
``U D`` is m×R) — the same product, chosen for speed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pathopeft.adapters.base import (
    AdapterError,
    AdapterModule,
    LayerGeometry,
    check_svd,
    float32_svd,
    kaiming_uniform,
)
from pathopeft.adapters.model import adapter_modules
from pathopeft.adapters.registry import AdapterConfig, register_method

__all__ = ["SaltConfig", "SaltModule", "regularization"]


class SaltModule(AdapterModule):
    def __init__(
        self,
        geometry: LayerGeometry,
        config: SaltConfig,
        weight: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
        svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(geometry, config)
        m, n, big_r = geometry.out_features, geometry.in_features, geometry.rank_limit
        r = config.rank if config.rank is not None else max(1, int(big_r * config.ratio))
        if r > big_r:
            raise AdapterError(f"SALT rank {r} is larger than the layer allows (min(out, in) = {big_r})")
        k = config.lora_rank
        if big_r - r > 0 and k > big_r - r:
            raise AdapterError(
                f"SALT lora_rank {k} is larger than the layer allows (R − r = {big_r} − {r} = {big_r - r})"
            )
        if weight is not None:
            u, s, vh = svd if svd is not None else float32_svd(weight)
        else:
            u, s, vh = torch.zeros(m, big_r), torch.zeros(big_r), torch.zeros(big_r, n)
        self.rank, self.rest = r, big_r - r
        self.register_buffer("U", u)  # [U_r | U_⊥] (m×R), frozen
        self.register_buffer("S", s)  # [s_r | s_⊥], frozen
        self.register_buffer("Vh", vh)  # [V_r | V_⊥]ᵀ (R×n), frozen
        self.scale = nn.Parameter(torch.ones(r))  # a, init 1
        self.shift = nn.Parameter(torch.zeros(r))  # c, init 0
        self.X = nn.Parameter(kaiming_uniform(self.rest, k) if self.rest else torch.zeros(0, k))
        self.Y = nn.Parameter(torch.zeros(k, self.rest))

    def top_delta(self) -> torch.Tensor:
        """δ = relu(a ⊙ s_r + c) − s_r (exactly 0 at init, since s_r ≥ 0)."""
        s_r = self.S[: self.rank]
        return F.relu(self.scale * s_r + self.shift) - s_r

    def rest_delta(self) -> torch.Tensor:
        """M = relu(diag(s_⊥) + X Y) − diag(s_⊥) ((R−r)×(R−r); exactly 0 at init, Y = 0)."""
        diag = torch.diag(self.S[self.rank :])
        return F.relu(diag + self.X @ self.Y) - diag

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U', Vh')`` with ``ΔW = U' Vh'``: the R×R mixing ``D = blockdiag(δ, M)`` folded into the
        smaller SVD factor (``D Vh`` is R×n, ``U D`` is m×R), computed once per call."""
        r = self.rank
        top = self.top_delta()
        if not self.rest:
            return self.U[:, :r], top[:, None] * self.Vh[:r]
        rest = self.rest_delta()
        if self.geometry.in_features <= self.geometry.out_features:
            return self.U, torch.cat([top[:, None] * self.Vh[:r], rest @ self.Vh[r:]], dim=0)
        return torch.cat([self.U[:, :r] * top, self.U[:, r:] @ rest], dim=1), self.Vh

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        r = self.rank
        if not self.rest:
            return g.up(g.scale(g.down(x, self.Vh[:r]), self.top_delta()), self.U[:, :r])
        m, n = g.out_features, g.in_features
        if g.tokens(x) < min(m, n):  # per token: R×R mixing in the singular basis
            top, rest = self.top_delta(), self.rest_delta()
            h = g.down(x, self.Vh)
            h_top, h_rest = h.narrow(g.feature_dim, 0, r), h.narrow(g.feature_dim, r, self.rest)
            mixed = torch.cat([g.scale(h_top, top), g.up(h_rest, rest)], dim=g.feature_dim)
            return g.up(mixed, self.U)
        u, vh = self.factors()
        return g.up(g.down(x, vh), u)

    def fold_weight(self) -> torch.Tensor:
        u, vh = self.factors()
        return u @ vh

    def forward_costs(self, tokens: int, backward: bool) -> tuple[float, float]:
        """Multiply-adds (residual, folded) of one call, forward and, with ``backward``, backward.

        Residual: the tokens are rotated into the singular basis and back (``T·R·(m+n)`` per pass;
        backward also forms the gradient of the folded factor, ``T·R·min(m, n)``) plus the mixing.
        Folded: building ``ΔW = U' Vh'`` (``m·n·R``) and its gradient ``(∂W')ᵀ`` through it
        (``m·n·R``), plus the weight gradient ``T·m·n`` the frozen layer would not need; the
        ``W' x`` GEMM itself replaces the base layer's and costs nothing extra.
        """
        g = self.geometry
        m, n, big_r, t = g.out_features, g.in_features, g.rank_limit, tokens
        small = min(m, n)
        rank = big_r if self.rest else self.rank
        mixing = self.rest**2 * (min(t, small) if self.rest else 0)
        residual = t * rank * (m + n) + mixing
        folded = m * n * rank + mixing
        if backward:
            residual += t * rank * (m + n) + (t * rank * small if t >= small else t * self.rest**2) + mixing
            folded += t * m * n + m * n * rank + mixing
        return float(residual), float(folded)

    def check_factors(self, weight: torch.Tensor) -> str | None:
        return check_svd(weight, self.U, self.S, self.Vh)

    def delta_weight(self) -> torch.Tensor:
        r = self.rank
        u, vh = self.U.float(), self.Vh.float()
        out = (u[:, :r] * self.top_delta().float()) @ vh[:r]
        if self.rest:
            out = out + u[:, r:] @ self.rest_delta().float() @ vh[r:]
        return out

    def regularization(self) -> torch.Tensor | None:
        """``reg · (‖diag(s_r') − diag(s_r)‖_F + ‖X Y‖_F)``; None when ``reg`` is 0."""
        weight = self.config.reg  # type: ignore[attr-defined]
        if not weight:
            return None
        term = torch.linalg.vector_norm(self.top_delta())
        if self.rest:
            term = term + torch.linalg.matrix_norm(self.X @ self.Y)
        return weight * term


def regularization(model: nn.Module, name: str = "default") -> torch.Tensor:
    """SALT's optional regulariser summed over every layer of adapter ``name`` (0 if ``reg`` is 0)."""
    modules = [a for _, _, a in adapter_modules(model, name)]
    if not modules:
        raise AdapterError(f"no adapter named {name!r} on this model")
    terms = [t for a in modules if (t := a.regularization()) is not None]
    if not terms:
        return torch.zeros((), device=modules[0].S.device)
    return torch.stack(terms).sum()


@register_method
class SaltConfig(AdapterConfig):
    """SALT options. Trainable per layer: ``2r + 2k(R − r)`` with R = min(m, n), k = lora_rank.

    Keep ``rank``/``ratio`` explicit in experiment configs: the share of trainable parameters
    grows quickly with k (report it with ``pa.trainable_parameters``).
    """

    method: ClassVar[str] = "salt"
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")
    module_cls: ClassVar[type[AdapterModule]] = SaltModule
    uses_svd: ClassVar[bool] = True
    rank_field: ClassVar[str | None] = "rank"  # rank_pattern sets r (the top singular values) per layer

    ratio: float = Field(0.1, gt=0.0, le=1.0)  # r = max(1, int(R·ratio)) when rank is not given
    rank: int | None = Field(None, gt=0)  # absolute r (top singular values scaled/shifted); overrides ratio
    lora_rank: int = Field(8, gt=0)  # k: rank of the X Y update of the remaining (R−r)×(R−r) block
    reg: float = Field(0.0, ge=0.0)  # weight of the optional regulariser (0 = off)
