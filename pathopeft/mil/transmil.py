"""TransMIL baseline (Shao et al., 2021) with Nyström self-attention (Xiong et al., 2021).

Architecture as published: ``Linear(D→512) + ReLU``, a class token, TransLayer (pre-norm Nyström
attention, 8 heads, 256 landmarks, 6 pseudo-inverse iterations, depthwise residual convolution of
the values), PPEG (depthwise 7/5/3 convolutions on the tokens laid out on a square), TransLayer,
LayerNorm; the bag embedding is the class token.

Nyström attention approximates ``softmax(QKᵀ)V`` by ``softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) ·
softmax(Q̃ Kᵀ) V`` with ``Q̃, K̃`` the means of m consecutive segments (the landmarks). The two
N×m products run through ``F.scaled_dot_product_attention`` (same math, fused kernels), only the
m×m kernel is built explicitly.

Per-instance attention (for localization) is the class token's row of the last layer's Nyström
attention, ``softmax(q_cls K̃ᵀ) · pinv(·) · softmax(Q̃Kᵀ)``, computed in O(N·m) (see
:class:`TransMIL` for how the model maps onto the shared interface and handles padding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathopeft.mil.base import MILModel, Task, valid_mask
from pathopeft.mil.registry import register_model

__all__ = ["PPEG", "NystromAttention", "TransMIL", "moore_penrose_pinv"]


def moore_penrose_pinv(x: Tensor, iterations: int = 6) -> Tensor:
    """Iterative Moore–Penrose pseudo-inverse (Razavi et al., 2014), as in Nyströmformer.

    ``Z₀ = Xᵀ / (‖X‖₁ ‖X‖_∞)`` computed per matrix (not over the batch, so one bag's result never
    depends on another's), then ``Z ← ¼ Z (13I − XZ(15I − XZ(7I − XZ)))``.
    """
    x = x.float()
    abs_x = x.abs()
    norm_1 = abs_x.sum(dim=-2).amax(dim=-1)  # max column sum
    norm_inf = abs_x.sum(dim=-1).amax(dim=-1)  # max row sum
    z = x.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention over one unpadded sequence (B, L, dim)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        # no bias: the zero rows padded in front of the sequence stay zero queries/keys/values
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.res_conv = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (B,H,L,d) of the front-padded sequence, landmarks Q̃, K̃ and pinv(softmax(Q̃K̃ᵀ))."""
        b, n, _ = x.shape
        m = self.landmarks
        pad = (-n) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))  # zeros in front, so every landmark segment is full
        length = n + pad
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        seg = length // m
        q_land = q.reshape(b, self.heads, m, seg, self.head_dim).mean(dim=3)
        k_land = k.reshape(b, self.heads, m, seg, self.head_dim).mean(dim=3)
        scale = 1.0 / math.sqrt(self.head_dim)
        kernel = torch.softmax((q_land.float() @ k_land.float().transpose(-1, -2)) * scale, dim=-1)
        return q, k, v, q_land, k_land, moore_penrose_pinv(kernel, self.pinv_iterations)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v, q_land, k_land, kernel_inv = self._project(x)
        landmark_values = F.scaled_dot_product_attention(q_land, k, v)  # softmax(Q̃Kᵀ)V: (B,H,m,d)
        mixed = (kernel_inv @ landmark_values.float()).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k_land, mixed)  # softmax(QK̃ᵀ)·(...): (B,H,L,d)
        out = out + self.res_conv(v)
        out = out[:, :, -n:].transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def attention_row(self, x: Tensor, index: int = 0) -> Tensor:
        """Row ``index`` of the approximated attention matrix, averaged over heads: (B, n).

        ``softmax(q_i K̃ᵀ) · pinv(softmax(Q̃K̃ᵀ)) · softmax(Q̃Kᵀ)`` costs O(n·m), never O(n²).
        """
        n = x.shape[1]
        q, k, _, q_land, k_land, kernel_inv = self._project(x)
        scale = 1.0 / math.sqrt(self.head_dim)
        row = q[:, :, q.shape[2] - n + index].float().unsqueeze(2)  # (B, H, 1, d)
        left = torch.softmax(row @ k_land.float().transpose(-1, -2) * scale, dim=-1)  # (B, H, 1, m)
        right = torch.softmax(q_land.float() @ k.float().transpose(-1, -2) * scale, dim=-1)  # (B, H, m, L)
        return (left @ kernel_inv @ right).squeeze(2)[:, :, -n:].mean(dim=1)


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))``."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, landmarks=landmarks, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7×7, 5×5 and 3×3 convolutions on the square token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        b, _, c = x.shape
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@register_model("transmil")
class TransMIL(MILModel):
    """TransMIL: Nyström-attention transformer with PPEG; the class token is the bag embedding.

    Mapped onto the shared interface so that every step is a function of the previous one:
    ``forward_features`` → tokens after the first layer and PPEG, ``(B, 1+N, E)``, class token
    first; ``forward_attention`` → the class token's row of the last layer's (Nyström) attention
    over the instances, clipped at 0 and renormalised (the approximation can dip below 0);
    ``aggregate`` → the last layer and norm, returning the class token. Bags of a padded batch are
    processed one by one over their valid tiles (landmark segments and the PPEG square depend on
    the length), so a bag alone equals the same bag in a batch.
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[Task | Mapping[str, Any]],
        embed_dim: int = 512,
        heads: int = 8,
        landmarks: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, embed_dim, tasks)
        self.encoder = nn.Sequential()
        self.encoder.add_module("fc", nn.Linear(in_dim, embed_dim))
        self.encoder.add_module("act", nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.layers = nn.ModuleList([TransLayer(embed_dim, heads, landmarks, dropout) for _ in range(2)])
        self.ppeg = PPEG(embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    # --- one unpadded bag at a time ---------------------------------------------------------------
    def _tokens(self, x: Tensor) -> Tensor:
        """(1, n, D) → (1, 1+n, E): embedding, class token, first layer, PPEG (square padding dropped)."""
        n = x.shape[1]
        h = self.encoder(x)
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, torch.arange(extra, device=h.device) % n]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        h = self.ppeg(self.layers[0](h), side)
        return h[:, : 1 + n]

    def _last_layer(self, h: Tensor) -> Tensor:
        """The second layer on the square-padded sequence again (as published), then the norm."""
        n = h.shape[1] - 1
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, 1 + torch.arange(extra, device=h.device) % n]], dim=1)
        return self.norm(self.layers[1](h))

    def _cls_attention(self, h: Tensor) -> Tensor:
        n = h.shape[1] - 1
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, 1 + torch.arange(extra, device=h.device) % n]], dim=1)
        row = self.layers[1].attn.attention_row(self.layers[1].norm(h), 0)[:, 1 : 1 + n].clamp_min(0)
        total = row.sum(dim=-1, keepdim=True)
        return torch.where(total > 0, row / total.clamp_min(1e-12), torch.full_like(row, 1.0 / n))

    # --- the shared interface -------------------------------------------------------------------
    def forward_features(self, x: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if mask is None or bool(mask.all()):
            return self._tokens(x)
        out = x.new_zeros((x.shape[0], 1 + x.shape[1], self.embed_dim))
        for i in range(x.shape[0]):
            keep = torch.cat([mask.new_ones(1), mask[i]])
            out[i, keep] = self._tokens(x[i : i + 1, mask[i]])[0].to(out.dtype)
        return out

    def forward_attention(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        valid = valid_mask(h[:, 1:], mask)
        if bool(valid.all()):
            return self._cls_attention(h)
        out = h.new_zeros(valid.shape, dtype=torch.float32)
        for i in range(h.shape[0]):
            keep = torch.cat([valid.new_ones(1), valid[i]])
            out[i, valid[i]] = self._cls_attention(h[i : i + 1, keep])[0].float()
        return out

    def aggregate(self, h: Tensor, attention: Tensor, mask: Tensor | None = None) -> Tensor:
        valid = valid_mask(h[:, 1:], mask)
        if bool(valid.all()):
            return self._last_layer(h)[:, 0]
        rows = []
        for i in range(h.shape[0]):
            keep = torch.cat([valid.new_ones(1), valid[i]])
            rows.append(self._last_layer(h[i : i + 1, keep])[0, 0])
        return torch.stack(rows)

    def instance_embeddings(self, h: Tensor) -> Tensor:
        return h[:, 1:]
