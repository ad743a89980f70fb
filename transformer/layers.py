"""Residual blocks of the encoder and decoder stacks (§3.1, §3.3, §5.4).

One `TransformerBlock` serves all three uses: encoder layer (self-attention, no mask),
decoder layer (causal self-attention + cross-attention) and decoder-only layer (causal
self-attention, no cross-attention). Post-LN is the paper's LayerNorm(x + Dropout(Sublayer(x)));
pre-LN is x + Dropout(Sublayer(LayerNorm(x))), with a final LayerNorm after the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from transformer.attention import KVCache, MultiHeadAttention
from transformer.config import ModelConfig
from transformer.elementwise import dropout, dropout_add, relu


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (§3.3)."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.activation_dropout = activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = relu(self.linear1(x))
        if self.activation_dropout:
            hidden = dropout(hidden, self.activation_dropout, self.training)
        return self.linear2(hidden)


@dataclass
class LayerCache:
    """Incremental-decoding state of one decoder layer: self-attention keys/values per hypothesis
    (B*K rows), cross-attention ones per sentence (B rows, shared by its beams)."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)

    def reorder(self, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        """Keep hypothesis `rows`; `sentences`, when some finished, the sentences still searched."""
        self.self_attn.reorder(rows)
        if sentences is not None:
            self.cross_attn.reorder(sentences)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, *, cross_attention: bool):
        super().__init__()
        attn = lambda: MultiHeadAttention(  # noqa: E731 - two identical constructions
            config.d_model, config.n_heads, config.head_dim_k, config.head_dim_v, config.attention_dropout,
            bias=config.attention_bias,
        )
        self.pre_norm = config.norm == "pre"
        self.dropout = config.dropout
        self.self_attn = attn()
        self.self_attn_norm = nn.LayerNorm(config.d_model)
        self.cross_attn = attn() if cross_attention else None
        self.cross_attn_norm = nn.LayerNorm(config.d_model) if cross_attention else None
        self.ffn = FeedForward(config.d_model, config.d_ff, config.activation_dropout)
        self.ffn_norm = nn.LayerNorm(config.d_model)

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return dropout_add(x, sublayer(norm(x)), self.dropout, self.training)
        return norm(dropout_add(x, sublayer(x), self.dropout, self.training))

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d_model)
        *,
        self_mask: torch.Tensor | None = None,  # (B, T) True at real tokens
        causal: bool = False,
        memory: torch.Tensor | None = None,  # (B, S, d_model) encoder output
        memory_mask: torch.Tensor | None = None,  # (B, S)
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = self._residual(
            x, self.self_attn_norm,
            lambda h: self.self_attn(
                h, key_mask=self_mask, causal=causal, cache=cache.self_attn if cache else None
            ),
        )
        if self.cross_attn is not None:
            x = self._residual(
                x, self.cross_attn_norm,
                lambda h: self.cross_attn(
                    h, memory, key_mask=memory_mask,
                    cache=cache.cross_attn if cache else None,
                ),
            )
        return self._residual(x, self.ffn_norm, self.ffn)


class Stack(nn.Module):
    """N identical blocks; pre-LN stacks end with a LayerNorm, post-LN ones do not need one."""

    def __init__(self, config: ModelConfig, n_layers: int, *, cross_attention: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(config, cross_attention=cross_attention) for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(config.d_model) if config.norm == "pre" else nn.Identity()

    def forward(self, x: torch.Tensor, caches: list[LayerCache] | None = None, **kwargs) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x, cache=caches[index] if caches is not None else None, **kwargs)
        return self.final_norm(x)
