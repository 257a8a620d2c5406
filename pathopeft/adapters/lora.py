"""LoRA: ``ΔW = (α/r)·B A`` with A Kaiming-uniform and B zero (HF PEFT's init, scaling and merge).

The forward is computed in the same order as ``peft.tuners.lora.Linear`` so that, given the same
A and B, outputs agree bit for bit: ``base(x) + up(down(dropout(x), A), B) * (α/r)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from pathopeft.adapters.base import AdapterError, AdapterModule, LayerGeometry, kaiming_uniform
from pathopeft.adapters.registry import AdapterConfig, register_method

__all__ = ["LoraConfig", "LoraModule"]


class LoraModule(AdapterModule):
    def __init__(
        self,
        geometry: LayerGeometry,
        config: LoraConfig,
        weight: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(geometry, config)
        r = config.rank
        if r > geometry.rank_limit:
            raise AdapterError(
                f"LoRA rank {r} is larger than the layer allows (min(out, in) = {geometry.rank_limit})"
            )
        self.scaling = config.alpha / r
        self.lora_A = nn.Parameter(kaiming_uniform(r, geometry.in_features))
        self.lora_B = nn.Parameter(torch.zeros(geometry.out_features, r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        out = g.up(g.down(self.dropout(x), self.lora_A), self.lora_B)
        # ·1.0 is exact, so skipping it (α = r, the default) keeps PEFT's numbers and saves a T×m pass
        return out if self.scaling == 1.0 else out * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


@register_method
class LoraConfig(AdapterConfig):
    """LoRA options. Trainable per layer: ``r·(m + n)`` (n = in·kh·kw for a Conv2d)."""

    method: ClassVar[str] = "lora"
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")
    module_cls: ClassVar[type[AdapterModule]] = LoraModule
    rank_field: ClassVar[str | None] = "rank"
    alpha_field: ClassVar[str | None] = "alpha"

    rank: int = Field(8, gt=0)  # r; HF PEFT's default
    alpha: float = Field(8.0, gt=0)  # scaling α/r (PEFT's lora_alpha, default 8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input only (PEFT's lora_dropout)
