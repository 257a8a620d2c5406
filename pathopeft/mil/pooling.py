"""ABMIL attention pooling (Ilse et al., 2018), plain (tanh) or gated (tanh ⊙ sigmoid).

CoMEL pools its GDAT instance embeddings with the plain tanh variant, hidden size 256
(METHODS.md, CoMEL "Pooling and heads"); the ABMIL baseline offers both. Layer names are stable so
adapters can target them: ``proj`` (tanh branch, V), ``gate`` (sigmoid branch, U), ``score`` (the
1-unit output w, which OWLoRA must not adapt).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pathopeft.mil.base import masked_softmax

__all__ = ["AttentionPooling"]


class AttentionPooling(nn.Module):
    """``a_i = softmax_i(wᵀ (tanh(V h_i) [⊙ sigmoid(U h_i)]))`` over each bag's valid instances."""

    def __init__(self, dim: int, hidden: int = 256, gated: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.gated = gated
        self.proj = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden) if gated else None
        self.drop = nn.Dropout(dropout)
        self.score = nn.Linear(hidden, 1)

    def logits(self, h: Tensor) -> Tensor:
        """Unnormalised attention logits (B, N)."""
        z = torch.tanh(self.proj(h))
        if self.gate is not None:
            z = z * torch.sigmoid(self.gate(h))
        return self.score(self.drop(z)).squeeze(-1)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """Attention (B, N) summing to 1 over valid instances; padding gets 0."""
        return masked_softmax(self.logits(h), mask)
