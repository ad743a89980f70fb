"""Where the architectures coincide, our stacks give torch.nn.Transformer's outputs (1e-5).

nn.Transformer always ends both stacks with a LayerNorm, which matches our pre-LN model; the
post-LN (paper) layers are compared against nn.TransformerEncoder/Decoder built without one.
"""

import pytest
import torch
from torch import nn

from transformer import build_model, preset

D, HEADS, FF, LAYERS = 32, 4, 64, 2


def _copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    ours.in_proj.weight.copy_(theirs.in_proj_weight)
    ours.in_proj.bias.copy_(theirs.in_proj_bias)
    ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


def _copy_layer(ours, theirs) -> None:
    _copy_attention(ours.self_attn, theirs.self_attn)
    ours.self_attn_norm.load_state_dict(theirs.norm1.state_dict())
    ours.ffn.linear1.load_state_dict(theirs.linear1.state_dict())
    ours.ffn.linear2.load_state_dict(theirs.linear2.state_dict())
    if ours.cross_attn is not None:
        _copy_attention(ours.cross_attn, theirs.multihead_attn)
        ours.cross_attn_norm.load_state_dict(theirs.norm2.state_dict())
        ours.ffn_norm.load_state_dict(theirs.norm3.state_dict())
    else:
        ours.ffn_norm.load_state_dict(theirs.norm2.state_dict())


def _inputs():
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(3, 7, D, generator=generator)
    tgt = torch.randn(3, 5, D, generator=generator)
    src_mask = torch.ones(3, 7, dtype=torch.bool)
    src_mask[1, 5:] = False
    return src, tgt, src_mask


@torch.no_grad()
def test_pre_ln_model_matches_nn_transformer() -> None:
    torch.manual_seed(0)
    ours = build_model(preset("tiny", d_model=D, n_heads=HEADS, d_ff=FF, n_layers=LAYERS, norm="pre",
                                attention_bias=True)).eval()
    theirs = nn.Transformer(D, HEADS, LAYERS, LAYERS, FF, dropout=0.0, batch_first=True, norm_first=True).eval()
    for mine, other in zip(ours.encoder.layers, theirs.encoder.layers):
        _copy_layer(mine, other)
    for mine, other in zip(ours.decoder.layers, theirs.decoder.layers):
        _copy_layer(mine, other)
    ours.encoder.final_norm.load_state_dict(theirs.encoder.norm.state_dict())
    ours.decoder.final_norm.load_state_dict(theirs.decoder.norm.state_dict())
    src, tgt, src_mask = _inputs()
    memory = ours.encoder(src, self_mask=src_mask)
    mine = ours.decoder(tgt, causal=True, memory=memory, memory_mask=src_mask)
    expected = theirs(
        src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
        src_key_padding_mask=~src_mask, memory_key_padding_mask=~src_mask, tgt_is_causal=True,
    )
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
@torch.no_grad()
def test_post_ln_stacks_match_nn_layers(cross: bool) -> None:
    torch.manual_seed(1)
    ours = build_model(preset("tiny", d_model=D, n_heads=HEADS, d_ff=FF, n_layers=LAYERS, norm="post",
                                attention_bias=True)).eval()
    src, tgt, src_mask = _inputs()
    if not cross:
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        theirs = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()
        for mine, other in zip(ours.encoder.layers, theirs.layers):
            _copy_layer(mine, other)
        torch.testing.assert_close(
            ours.encoder(src, self_mask=src_mask), theirs(src, src_key_padding_mask=~src_mask),
            rtol=1e-5, atol=1e-5,
        )
        return
    layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
    theirs = nn.TransformerDecoder(layer, LAYERS).eval()
    for mine, other in zip(ours.decoder.layers, theirs.layers):
        _copy_layer(mine, other)
    expected = theirs(
        tgt, src, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True,
        memory_key_padding_mask=~src_mask,
    )
    mine = ours.decoder(tgt, causal=True, memory=src, memory_mask=src_mask)
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
