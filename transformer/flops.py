"""Training FLOPs, counted the way MFU is usually reported, with the attention terms spelled out.

Convention (Kaplan et al. 2020; PaLM appendix B): a multiply-add is 2 FLOPs, the backward pass
costs twice the forward, so training costs 3x forward, which is 6N per token for the N weights a
token passes through. Biases, layer norms, softmax and embedding look-ups are left out (< 1%).
On top of 6N we count, per layer:
- self-attention scores and weighted sum: 2 * L_ctx * h * (d_k + d_v) per query token, where
  L_ctx is the full length for the encoder and (L + 1) / 2 on average for causal attention
  (the work a causal kernel actually does, so MFU is not inflated by masked-out products);
- cross-attention: its key/value projections run once per *source* token, not per target
  token, and its scores/sum cost 2 * S * h * (d_k + d_v) per target token;
- the output projection: 2 * d_model * V per predicted token.
"""

from __future__ import annotations

from transformer.config import ModelConfig


def _attention_weights(config: ModelConfig) -> tuple[int, int]:
    """Weights of the query/output and key/value projections of one attention block."""
    d, h, dk, dv = config.d_model, config.n_heads, config.head_dim_k, config.head_dim_v
    return d * h * dk + h * dv * d, d * h * dk + d * h * dv


def _ffn_weights(config: ModelConfig) -> int:
    return 2 * config.d_model * config.d_ff


def _scores(config: ModelConfig, context: float) -> float:
    """Forward FLOPs of QK^T and AV for one query against `context` keys."""
    return 2.0 * context * config.n_heads * (config.head_dim_k + config.head_dim_v)


def encoder_decoder_training_flops(config: ModelConfig, src_len: float, tgt_len: float) -> float:
    """Training FLOPs of one sentence pair with src_len source and tgt_len target tokens."""
    q_out, k_v = _attention_weights(config)
    ffn = _ffn_weights(config)
    encoder = src_len * config.n_layers * (2.0 * (q_out + k_v + ffn) + _scores(config, src_len))
    causal_context = (tgt_len + 1) / 2
    decoder_per_token = config.decoder_layers * (
        2.0 * (q_out + k_v)  # self-attention projections
        + _scores(config, causal_context)
        + 2.0 * q_out  # cross-attention query and output projections
        + _scores(config, src_len)  # cross-attention over the source
        + 2.0 * ffn
    )
    cross_kv = src_len * config.decoder_layers * 2.0 * k_v  # encoder keys/values, once per source token
    output = tgt_len * 2.0 * config.d_model * config.vocab_size
    return 3.0 * (encoder + tgt_len * decoder_per_token + cross_kv + output)


def decoder_only_training_flops(config: ModelConfig, seq_len: float) -> float:
    """Training FLOPs of one packed sequence of seq_len tokens."""
    q_out, k_v = _attention_weights(config)
    per_token = config.decoder_layers * (
        2.0 * (q_out + k_v + _ffn_weights(config)) + _scores(config, (seq_len + 1) / 2)
    ) + 2.0 * config.d_model * config.vocab_size
    return 3.0 * seq_len * per_token


def training_flops_per_token(config: ModelConfig, src_len: float, tgt_len: float) -> float:
    """Training FLOPs per target (predicted) token; src_len is ignored for decoder-only models."""
    if config.architecture == "decoder_only":
        return decoder_only_training_flops(config, tgt_len) / tgt_len
    return encoder_decoder_training_flops(config, src_len, tgt_len) / tgt_len
