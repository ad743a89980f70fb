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
    """Keys and values of one attention layer, seen as (B, h, S, d_k) and (B, h, S, d_v).

    Self-attention keys/values of incremental decoding are written into a preallocated buffer
    (doubled when full) instead of concatenated every step; `keys`/`values` are views of its
    filled part. Cross-attention keys/values are stored once, one row per sentence. The buffers
    are position-major, (B, S, h, d), as the projections make them and as torch's CPU flash
    attention reads them: a row's filled positions are one block, which a beam reorder copies
    1.4x faster than h blocks of a head-major buffer."""

    _keys: torch.Tensor | None = None  # (B, capacity, h, d_k)
    _values: torch.Tensor | None = None  # (B, capacity, h, d_v)
    length: int = 0
    capacity: int = 64  # positions allocated at the first append

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, : self.length].transpose(1, 2)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, : self.length].transpose(1, 2)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, h, T, d) keys and values; returns all of them so far."""
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (B, T, h, d)
        new = keys.shape[1]
        if self._keys is None or self._values is None:
            self._keys = keys.new_empty((keys.shape[0], max(self.capacity, new)) + keys.shape[2:])
            self._values = values.new_empty((values.shape[0], max(self.capacity, new)) + values.shape[2:])
        elif self.length + new > self._keys.shape[1]:
            self._keys = torch.cat([self._keys, torch.empty_like(self._keys)], dim=1)
            self._values = torch.cat([self._values, torch.empty_like(self._values)], dim=1)
        self._keys[:, self.length : self.length + new] = keys
        self._values[:, self.length : self.length + new] = values
        self.length += new
        return self.keys, self.values

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows: beam search keeps the surviving hypotheses, drops finished sentences
        or makes a sentence's first row its beams. The filled positions are gathered straight into
        a new buffer of the same capacity: one pass over them, where gathering and then writing
        back in place took two (the freed buffer is reused by the allocator, on a CPU too:
        `jobs.train.cpu_allocator`)."""
        if self._keys is None or self._values is None:
            return
        self._keys, self._values = (self._gathered(buffer, index) for buffer in (self._keys, self._values))

    def _gathered(self, buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = buffer.new_empty((index.shape[0],) + buffer.shape[1:])
        torch.index_select(buffer[:, : self.length], 0, index, out=rows[:, : self.length])
        return rows


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""

    def __init__(self, d_model: int, n_heads: int, d_k: int, d_v: int, dropout: float = 0.0, *, bias: bool = False):
        super().__init__()
        self.n_heads, self.d_k, self.d_v = n_heads, d_k, d_v
        self.dropout = dropout
        # W^Q, W^K, W^V stacked in one matrix (nn.MultiheadAttention's layout): self-attention
        # projects with one matmul, cross-attention uses row slices of it (views, no copies).
        # Without biases (the paper's), a CPU training step is 1.02-1.04x faster at `small` and
        # `tiny` (no bias broadcast into each GEMM's output, no bias gradient reductions).
        self.in_proj = nn.Linear(d_model, n_heads * (2 * d_k + d_v), bias=bias)
        self.out_proj = nn.Linear(n_heads * d_v, d_model, bias=bias)

    def _split(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, head_dim).transpose(1, 2)  # (B, h, T, d)

    def _project(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        return F.linear(x, self.in_proj.weight[rows], None if self.in_proj.bias is None else self.in_proj.bias[rows])

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
        # Beam search: the K beams of a sentence share its encoder keys (B rows against B*K queries),
        # so the beams' queries are attended as K*T queries of one row; nothing is copied per beam.
        beams = q.shape[0] // k.shape[0]
        if beams > 1:
            q = q.unflatten(0, (k.shape[0], beams)).transpose(1, 2).flatten(2, 3)  # (B, h, K*T, d_k)
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
        if beams > 1:
            out = out.unflatten(2, (beams, -1)).transpose(1, 2).flatten(0, 1)  # (B*K, h, T, d_v)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.d_v))
