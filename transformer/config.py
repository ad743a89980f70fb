"""Typed model configuration with the presets of Vaswani et al. (2017), Table 3.

Every Table 3 row is expressible: d_k and d_v are free (they need not equal d_model/h), the
positional encoding may be sinusoidal or learned (row E), and dropout / label smoothing are
per-config (row D). Small presets exist for CPU work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

PositionalKind = Literal["sinusoidal", "learned"]
NormPlacement = Literal["post", "pre"]
Architecture = Literal["encoder_decoder", "decoder_only"]


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one Transformer. Names follow the paper (§3, Table 3)."""

    architecture: Architecture = "encoder_decoder"
    vocab_size: int = 37000
    n_layers: int = 6  # N: encoder layers (and decoder layers unless n_decoder_layers is set)
    n_decoder_layers: int | None = None
    d_model: int = 512
    d_ff: int = 2048
    n_heads: int = 8  # h
    d_k: int | None = None  # defaults to d_model / h
    d_v: int | None = None  # defaults to d_model / h
    dropout: float = 0.1  # P_drop: residual and embedding dropout (§5.4)
    # The paper's projections W^Q, W^K, W^V and W^O are plain matrices (§3.2.2); true adds biases,
    # as torch's and fairseq's attention do (and as aiayn did before 2026-12-05, see SAVED_BEFORE).
    attention_bias: bool = False
    attention_dropout: float = 0.0  # not in the paper; tensor2tensor's option
    activation_dropout: float = 0.0  # not in the paper; fairseq's "relu_dropout"
    label_smoothing: float = 0.1  # epsilon_ls (§5.4)
    positional: PositionalKind = "sinusoidal"
    max_positions: int = 1024
    norm: NormPlacement = "post"  # "post" is the paper's; "pre" trains more stably without warm-up
    share_embeddings: bool = True  # one matrix for source, target and output (§3.4)
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        positive = ("vocab_size", "n_layers", "d_model", "d_ff", "n_heads", "max_positions")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout", "activation_dropout", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {value}")
        if self.d_k is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.d_k and model.d_v explicitly"
            )

    @property
    def head_dim_k(self) -> int:
        return self.d_k if self.d_k is not None else self.d_model // self.n_heads

    @property
    def head_dim_v(self) -> int:
        return self.d_v if self.d_v is not None else self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    def replace(self, **changes: object) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_BASE = ModelConfig()

# Keys added after models were first saved, each with the value the models saved before it were
# built with: a saved config (an export's config.json, a checkpoint's job config) that lacks one
# was written before the key existed, and must be read with that value to fit its weights.
SAVED_BEFORE: dict[str, object] = {"attention_bias": True}


def saved_model_section(data: dict) -> dict:
    """A saved model section as the model it was written with."""
    return {**SAVED_BEFORE, **data}


# Table 3 of the paper. Rows (A)-(E) change the base model; "big" is the last row.
PRESETS: dict[str, ModelConfig] = {
    "base": _BASE,
    "big": _BASE.replace(d_model=1024, d_ff=4096, n_heads=16, dropout=0.3),
    # (A) heads, with d_k = d_v chosen to keep computation constant
    "A1": _BASE.replace(n_heads=1, d_k=512, d_v=512),
    "A2": _BASE.replace(n_heads=4, d_k=128, d_v=128),
    "A3": _BASE.replace(n_heads=16, d_k=32, d_v=32),
    "A4": _BASE.replace(n_heads=32, d_k=16, d_v=16),
    # (B) smaller attention key size
    "B1": _BASE.replace(d_k=16),
    "B2": _BASE.replace(d_k=32),
    # (C) model size
    "C1": _BASE.replace(n_layers=2),
    "C2": _BASE.replace(n_layers=4),
    "C3": _BASE.replace(n_layers=8),
    "C4": _BASE.replace(d_model=256, d_k=32, d_v=32),
    "C5": _BASE.replace(d_model=1024, d_k=128, d_v=128),
    "C6": _BASE.replace(d_ff=1024),
    "C7": _BASE.replace(d_ff=4096),
    # (D) regularization
    "D1": _BASE.replace(dropout=0.0),
    "D2": _BASE.replace(dropout=0.2),
    "D3": _BASE.replace(label_smoothing=0.0),
    "D4": _BASE.replace(label_smoothing=0.2),
    # (E) learned positional embedding instead of sinusoids
    "E": _BASE.replace(positional="learned", max_positions=512),
    # Small models for CPU: recipes and tests
    "small": _BASE.replace(
        n_layers=3, d_model=256, d_ff=1024, n_heads=4, norm="pre", max_positions=256
    ),
    "tiny": _BASE.replace(
        n_layers=2, d_model=64, d_ff=128, n_heads=4, dropout=0.0, norm="pre", max_positions=128
    ),
}

# Parameter counts printed in Table 3 (millions), for the rows that list one.
TABLE3_PARAMETERS_M: dict[str, float] = {
    "base": 65, "big": 213, "B1": 58, "B2": 60, "C1": 36, "C2": 50, "C3": 80,
    "C4": 28, "C5": 168, "C6": 53, "C7": 90,
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """Return a named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
