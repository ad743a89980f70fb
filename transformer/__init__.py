"""The Transformer of Vaswani et al. (2017) in plain PyTorch: no distributed code lives here."""

from transformer.config import PRESETS, ModelConfig, preset
from transformer.model import DecoderOnlyTransformer, EncoderDecoderTransformer, build_model, count_parameters

__all__ = [
    "PRESETS", "ModelConfig", "preset",
    "DecoderOnlyTransformer", "EncoderDecoderTransformer", "build_model", "count_parameters",
]
