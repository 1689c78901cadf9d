"""Grouped-query attention with an optional KV cache, and the pre-norm decoder layer built on it.

Grouped-query attention (GQA): ``n_heads`` query heads share ``n_kv_heads`` key/value heads
(``n_heads % n_kv_heads == 0``; ``n_kv_heads == n_heads`` is ordinary multi-head attention,
``n_kv_heads == 1`` multi-query attention). Fewer K/V heads shrink the KV cache, which is what
incremental decoding keeps in memory and re-reads at every step.

Shapes: R = rows (requests, or requests x beams), T = positions, N = candidates, d = width.
Cached keys and values are ``[R, n_kv_heads, T, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


class GroupedQueryAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"attention: dim {dim} is not divisible by n_heads {n_heads}")
        if not 1 <= n_kv_heads <= n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"attention: n_kv_heads {n_kv_heads} must divide n_heads {n_heads} (1..n_heads)"
            )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * n_kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def project_kv(self, x: torch.Tensor) -> KV:
        """Keys and values ``[R, n_kv_heads, T, head_dim]`` of ``x [R, T, d]``."""
        r, t, _ = x.shape
        kv = self.key_value(x).view(r, t, 2, self.n_kv_heads, self.head_dim)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def attend(
        self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """Queries from ``x [R, Tq, d]`` over ``kv``; ``mask`` broadcastable to
        ``[R, 1, Tq, Tk]`` (True = may attend)."""
        r, tq, d = x.shape
        q = self.query(x).view(r, tq, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = kv
        if self.n_kv_heads != self.n_heads:  # each K/V head serves a group of query heads
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(out.transpose(1, 2).reshape(r, tq, d))


class DecoderLayer(nn.Module):
    """Pre-norm layer: causal GQA self-attention, GQA cross-attention to a memory, feed-forward.

    ``forward`` runs all positions at once (training, or recomputation without a cache);
    ``step`` runs one new position against a KV cache and returns the grown cache. Both compute
    the same function, which the cache-equivalence test checks.
    """

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, ff_mult: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = GroupedQueryAttention(dim, n_heads, n_kv_heads, dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = GroupedQueryAttention(dim, n_heads, n_kv_heads, dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(dim * ff_mult, dim),
        )
        self.drop = nn.Dropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> KV:
        """Cross-attention keys/values of the encoded candidates: computed once per request."""
        return self.cross_attn.project_kv(memory)

    def _rest(self, h: torch.Tensor, memory_kv: KV, memory_mask: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.cross_attn.attend(self.cross_norm(h), memory_kv, memory_mask))
        return h + self.drop(self.ff(self.ff_norm(h)))

    def forward(self, h: torch.Tensor, memory_kv: KV, memory_mask: torch.Tensor) -> torch.Tensor:
        """All positions ``h [R, T, d]``; position t sees positions <= t only."""
        x = self.self_norm(h)
        h = h + self.drop(self.self_attn.attend(x, self.self_attn.project_kv(x), causal=True))
        return self._rest(h, memory_kv, memory_mask)

    def step(
        self, h: torch.Tensor, cache: KV | None, memory_kv: KV, memory_mask: torch.Tensor
    ) -> tuple[torch.Tensor, KV]:
        """One new position ``h [R, 1, d]`` attending to the cached earlier positions."""
        x = self.self_norm(h)
        k, v = self.self_attn.project_kv(x)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        # The newest position may see every cached one: no causal mask is needed.
        h = h + self.drop(self.self_attn.attend(x, (k, v)))
        return self._rest(h, memory_kv, memory_mask), (k, v)
