"""Multi-head attention (§3.2.2) through torch's fused scaled_dot_product_attention.

d_k and d_v are independent of d_model/h so that every Table 3 row can be built. A
`KVCache` holds, per layer, either the growing self-attention keys/values of incremental
decoding or the encoder keys/values of cross-attention, computed once per source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class KVCache:
    """Keys and values of one attention layer, (B, h, S, d_k) and (B, h, S, d_v)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the surviving hypotheses)."""
        if self.keys is not None and self.values is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""

    def __init__(self, d_model: int, n_heads: int, d_k: int, d_v: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.d_k, self.d_v = n_heads, d_k, d_v
        self.dropout = dropout
        # W^Q, W^K, W^V stacked in one matrix (nn.MultiheadAttention's layout): self-attention
        # projects with one matmul, cross-attention uses row slices of it (views, no copies).
        self.in_proj = nn.Linear(d_model, n_heads * (2 * d_k + d_v))
        self.out_proj = nn.Linear(n_heads * d_v, d_model)

    def _split(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, head_dim).transpose(1, 2)  # (B, h, T, d)

    def _project(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        return F.linear(x, self.in_proj.weight[rows], self.in_proj.bias[rows])

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a sequence, (B, h, S, d_k) and (B, h, S, d_v)."""
        qk = self.n_heads * self.d_k
        k, v = self._project(memory, slice(qk, None)).split([qk, self.n_heads * self.d_v], dim=-1)
        return self._split(k, self.d_k), self._split(v, self.d_v)

    def forward(
        self,
        query: torch.Tensor,  # (B, T, d_model)
        key_value: torch.Tensor | None = None,  # (B, S, d_model); None means self-attention
        *,
        key_mask: torch.Tensor | None = None,  # (B, S) True where a key is a real token
        causal: bool = False,
        cache: KVCache | None = None,  # self-attention: grows by T; cross-attention: filled once
    ) -> torch.Tensor:
        qk = self.n_heads * self.d_k
        if key_value is None:  # self-attention: Q, K and V in one matmul
            q, k, v = self.in_proj(query).split([qk, qk, self.n_heads * self.d_v], dim=-1)
            q, k, v = self._split(q, self.d_k), self._split(k, self.d_k), self._split(v, self.d_v)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            q = self._split(self._project(query, slice(0, qk)), self.d_k)  # (B, h, T, d_k)
            if cache is not None and cache.keys is not None:  # encoder K/V computed once
                k, v = cache.keys, cache.values
            else:
                k, v = self.project_kv(key_value)
                if cache is not None:
                    k, v = cache.append(k, v)
        attn_mask = None
        if key_mask is not None:
            attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, S) broadcast over heads and queries
        # With a cache, a single new query attends to every cached key: no causal mask needed.
        is_causal = causal and attn_mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
        if causal and not is_causal and q.shape[2] > 1:
            causal_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            causal_mask = causal_mask.tril(k.shape[2] - q.shape[2])
            attn_mask = causal_mask if attn_mask is None else attn_mask & causal_mask
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, h, T, d_v)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.d_v))
