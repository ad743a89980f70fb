"""The Transformer of "Attention Is All You Need" and a decoder-only model from the same blocks.

Shapes: B batch, S source length, T target length, V vocabulary. Masks are True at real
tokens. Padding is on the right, so causal self-attention never sees a pad from a real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transformer.config import ModelConfig
from transformer.elementwise import dropout
from transformer.embeddings import PositionalEncoding, ScaledEmbedding
from transformer.attention import KVCache
from transformer.layers import LayerCache, Stack


def _init_linear_layers(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear, as tensor2tensor and fairseq do."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


class _Embedder(nn.Module):
    """Scaled token embedding + positional encoding + dropout (§3.4, §3.5, §5.4)."""

    def __init__(self, config: ModelConfig, tokens: ScaledEmbedding):
        super().__init__()
        self.tokens, self.dropout = tokens, config.dropout
        self.positions = PositionalEncoding(config.positional, config.max_positions, config.d_model)

    def forward(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.tokens(ids)  # (B, T, d_model)
        x = x + self.positions(ids.shape[1], offset).to(x.dtype)  # the fp32 table joins a bf16 model's dtype
        return dropout(x, self.dropout, self.training)


class _OutputHead(nn.Module):
    """Pre-softmax linear layer. Tied weights live in an nn.Linear so that ZeRO-3 gathers them."""

    def __init__(self, config: ModelConfig, tied: ScaledEmbedding | None):
        super().__init__()
        self.proj = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if tied is not None:
            self.proj.weight = tied.weight

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (..., V); with `positions` (flat indices into hidden's leading dims) only there.

        Indices rather than a boolean mask: the caller computes them on the host from lengths it
        knows, and index_select needs no device-to-host synchronisation (boolean indexing does)."""
        if positions is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # skip padding
        return self.proj(hidden)


class EncoderDecoderTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "encoder_decoder":
            raise ValueError("EncoderDecoderTransformer needs model.architecture=encoder_decoder")
        self.config = config
        self.encoder = Stack(config, config.n_layers, cross_attention=False)
        self.decoder = Stack(config, config.decoder_layers, cross_attention=True)
        _init_linear_layers(self)
        src_tokens = ScaledEmbedding(config.vocab_size, config.d_model, config.pad_id)
        tgt_tokens = (
            src_tokens if config.share_embeddings
            else ScaledEmbedding(config.vocab_size, config.d_model, config.pad_id)
        )
        self.src_embed = _Embedder(config, src_tokens)
        self.tgt_embed = _Embedder(config, tgt_tokens)
        self.output = _OutputHead(config, tgt_tokens if config.share_embeddings else None)
        if not config.share_embeddings:
            nn.init.normal_(self.output.proj.weight, std=config.d_model**-0.5)

    def encode(self, src: torch.Tensor, *, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder output (B, S, d_model) and the source mask (B, S).

        `padded=False` (the caller knows, from the host, that no row has padding) drops the mask,
        so that attention runs without one and the fastest SDPA kernel is eligible."""
        src_mask = src != self.config.pad_id if padded else None
        return self.encoder(self.src_embed(src), self_mask=src_mask), src_mask

    def decode(
        self,
        tgt_in: torch.Tensor,  # (B, T) target shifted right, starting with BOS
        memory: torch.Tensor,
        src_mask: torch.Tensor | None,
        *,
        caches: list[LayerCache] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """Decoder output (B, T, d_model) before the output projection."""
        return self.decoder(
            self.tgt_embed(tgt_in, offset), caches,
            causal=True, memory=memory, memory_mask=src_mask,
        )

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, logits_at: torch.Tensor | None = None,
        *, src_padded: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (N, V) at the N flat positions `logits_at` of (B, T)."""
        memory, src_mask = self.encode(src, padded=src_padded)
        return self.output(self.decode(tgt_in, memory, src_mask), logits_at)

    def new_caches(self, capacity: int = 64) -> list[LayerCache]:
        """Empty decoding caches; `capacity`: target positions preallocated (grown if exceeded)."""
        return [LayerCache(self_attn=KVCache(capacity=capacity)) for _ in self.decoder.layers]

    def decode_step(
        self, last_tokens: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None,
        caches: list[LayerCache], offset: int,
    ) -> torch.Tensor:
        """Log-probabilities (B, V) of the next token given the newest one (B, 1) and the caches."""
        hidden = self.decode(last_tokens, memory, src_mask, caches=caches, offset=offset)
        return F.log_softmax(self.output(hidden[:, -1]).float(), dim=-1)


class DecoderOnlyTransformer(nn.Module):
    """A GPT-style language model: the decoder stack without cross-attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture != "decoder_only":
            raise ValueError("DecoderOnlyTransformer needs model.architecture=decoder_only")
        self.config = config
        self.decoder = Stack(config, config.decoder_layers, cross_attention=False)
        _init_linear_layers(self)
        tokens = ScaledEmbedding(config.vocab_size, config.d_model, config.pad_id)
        self.embed = _Embedder(config, tokens)
        self.output = _OutputHead(config, tokens if config.share_embeddings else None)
        if not config.share_embeddings:
            nn.init.normal_(self.output.proj.weight, std=config.d_model**-0.5)

    def forward(
        self, tokens: torch.Tensor, logits_at: torch.Tensor | None = None,
        *, caches: list[LayerCache] | None = None, offset: int = 0,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V), or (N, V) at the N flat positions `logits_at` of (B, T)."""
        hidden = self.decoder(self.embed(tokens, offset), caches, causal=True)
        return self.output(hidden, logits_at)

    def new_caches(self, capacity: int = 64) -> list[LayerCache]:
        return [LayerCache(self_attn=KVCache(capacity=capacity)) for _ in self.decoder.layers]


def build_model(config: ModelConfig) -> nn.Module:
    """The model class that `config.architecture` names."""
    if config.architecture == "decoder_only":
        return DecoderOnlyTransformer(config)
    return EncoderDecoderTransformer(config)


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
