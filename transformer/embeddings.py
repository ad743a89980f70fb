"""Token embeddings scaled by sqrt(d_model) (§3.4) and positional encodings (§3.5)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(max_positions: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...), (max_positions, d_model)."""
    position = torch.arange(max_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(max_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table.float()


class PositionalEncoding(nn.Module):
    """Adds position information: fixed sinusoids (the paper's) or learned vectors (Table 3, row E)."""

    def __init__(self, kind: str, max_positions: int, d_model: int):
        super().__init__()
        self.max_positions = max_positions
        if kind == "learned":
            self.learned = nn.Embedding(max_positions, d_model)
            nn.init.normal_(self.learned.weight, std=d_model**-0.5)
        else:
            self.learned = None
            self.register_buffer("table", sinusoidal_table(max_positions, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        """Encodings of positions offset..offset+length-1, (length, d_model)."""
        if offset + length > self.max_positions:
            raise ValueError(
                f"sequence of {offset + length} positions exceeds model.max_positions={self.max_positions}"
            )
        if self.learned is not None:
            return self.learned.weight[offset : offset + length]
        return self.table[offset : offset + length]


class ScaledEmbedding(nn.Embedding):
    """Embedding whose output is multiplied by sqrt(d_model) (§3.4)."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int):
        super().__init__(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model)
        # std d^-0.5 keeps scaled embeddings at unit variance and the tied output layer small.
        nn.init.normal_(self.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * self.scale
