"""Structural properties of the model: causality, padding, sizes, and its import boundary."""

import ast
import pathlib

import pytest
import torch

import transformer.layers
import transformer.model
from transformer import build_model, count_parameters, preset
from transformer.attention import MultiHeadAttention
from transformer.config import TABLE3_PARAMETERS_M, ModelConfig
from transformer.elementwise import dropout, dropout_add
from transformer.layers import FeedForward

VOCAB = 50


def _model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=VOCAB, **overrides)
    return build_model(config).eval()


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=generator)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_changing_future_targets_leaves_earlier_logits_unchanged(norm: str) -> None:
    model = _model(norm=norm)
    src, tgt = _tokens(2, 7, 1), _tokens(2, 9, 2)
    position = 4
    changed = tgt.clone()
    changed[:, position + 1 :] = _tokens(2, 9 - position - 1, 3)
    before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(before[:, : position + 1], after[:, : position + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, position + 1 :], after[:, position + 1 :])


def test_decoder_only_is_causal() -> None:
    model = _model(architecture="decoder_only")
    tokens = _tokens(3, 10, 4)
    changed = tokens.clone()
    changed[:, 6:] = _tokens(3, 4, 5)
    torch.testing.assert_close(model(tokens)[:, :6], model(changed)[:, :6], rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_never_changes_real_token_outputs(norm: str) -> None:
    model = _model(norm=norm)
    src, tgt = _tokens(1, 6, 6), _tokens(1, 5, 7)
    pad = model.config.pad_id
    padded_src = torch.cat([src, torch.full((1, 4), pad)], dim=1)
    padded_tgt = torch.cat([tgt, torch.full((1, 3), pad)], dim=1)
    # Batch it with a longer neighbour, as a real batch would be.
    neighbour_src, neighbour_tgt = _tokens(1, 10, 8), _tokens(1, 8, 9)
    alone = model(src, tgt)
    batched = model(torch.cat([padded_src, neighbour_src]), torch.cat([padded_tgt, neighbour_tgt]))
    torch.testing.assert_close(batched[:1, :5], alone, rtol=0, atol=1e-5)


def test_logits_at_selects_only_requested_positions() -> None:
    model = _model()
    src, tgt = _tokens(2, 6, 10), _tokens(2, 5, 11)
    where = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    positions = where.flatten().nonzero().squeeze(1)
    torch.testing.assert_close(model(src, tgt, positions), model(src, tgt)[where])


def test_an_unpadded_source_needs_no_mask() -> None:
    """Dropping the mask (the host knows there is no padding) changes nothing but the kernel."""
    model = _model()
    src, tgt = _tokens(3, 6, 14), _tokens(3, 5, 15)
    assert bool((src != model.config.pad_id).all()) and model.encode(src, padded=False)[1] is None
    torch.testing.assert_close(model(src, tgt, src_padded=False), model(src, tgt), rtol=0, atol=1e-6)


def test_shared_embeddings_are_one_matrix_and_unshared_are_three() -> None:
    shared = _model(share_embeddings=True)
    assert shared.src_embed.tokens.weight is shared.output.proj.weight
    unshared = _model(share_embeddings=False)
    delta = count_parameters(unshared) - count_parameters(shared)
    assert delta == 2 * VOCAB * unshared.config.d_model


@pytest.mark.parametrize("row", sorted(TABLE3_PARAMETERS_M))
def test_parameter_counts_match_table3(row: str) -> None:
    """Absolute counts within 7% and the change from base within 3% (or 1.5M) of the paper's.
    Built on the meta device: shapes without storage, so `big` costs no time or memory."""
    with torch.device("meta"):
        count = count_parameters(build_model(preset(row, vocab_size=37000))) / 1e6
        base = count_parameters(build_model(preset("base", vocab_size=37000))) / 1e6
    paper, paper_base = TABLE3_PARAMETERS_M[row], TABLE3_PARAMETERS_M["base"]
    assert abs(count - paper) / paper < 0.07
    paper_delta, delta = paper - paper_base, count - base
    assert abs(delta - paper_delta) <= max(1.5, 0.03 * abs(paper_delta))


def test_learned_positions_and_unequal_head_sizes_build_and_run() -> None:
    model = _model(positional="learned", d_k=8, d_v=24)
    assert model(_tokens(2, 5, 12), _tokens(2, 4, 13)).shape == (2, 4, VOCAB)


def test_attention_with_d_k_unequal_d_v_matches_a_reference_computation() -> None:
    """softmax(Q K^T / sqrt(d_k)) V per head, concatenated, times W^O (§3.2), written out here."""
    torch.manual_seed(3)
    heads, d_model, d_k, d_v = 3, 12, 5, 7
    attention = MultiHeadAttention(d_model, heads, d_k, d_v, bias=True).eval()
    query, memory = torch.randn(2, 4, d_model), torch.randn(2, 6, d_model)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[1, 4:] = False
    w, b = attention.in_proj.weight, attention.in_proj.bias
    q = (query @ w[: heads * d_k].T + b[: heads * d_k]).view(2, 4, heads, d_k)
    k = (memory @ w[heads * d_k: 2 * heads * d_k].T + b[heads * d_k: 2 * heads * d_k]).view(2, 6, heads, d_k)
    v = (memory @ w[2 * heads * d_k:].T + b[2 * heads * d_k:]).view(2, 6, heads, d_v)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / d_k ** 0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    heads_out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, 4, heads * d_v)
    expected = attention.out_proj(heads_out)
    with torch.no_grad():
        assert torch.allclose(attention(query, memory, key_mask=key_mask), expected, atol=1e-5)
        attention.in_proj.bias.zero_(), attention.out_proj.bias.zero_()
        without = MultiHeadAttention(d_model, heads, d_k, d_v).eval()  # the paper's: plain matrices
        without.load_state_dict(attention.state_dict(), strict=False)
        assert without.in_proj.bias is None and without.out_proj.bias is None
        assert torch.allclose(without(query, memory, key_mask=key_mask), attention(query, memory, key_mask=key_mask),
                              atol=1e-6)


def test_embeddings_are_scaled_by_sqrt_d_model() -> None:
    """§3.4: the embedding weights are multiplied by sqrt(d_model) before the positions are added."""
    model = _model()
    ids = _tokens(1, 3, 5)
    with torch.no_grad():
        embedded = model.src_embed(ids)
        positions = model.src_embed.positions(3)
        rows = model.src_embed.tokens.weight[ids[0]]
    assert torch.allclose(embedded[0] - positions, rows * model.config.d_model ** 0.5, atol=1e-6)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_dropout_is_applied_where_the_paper_puts_it(monkeypatch, norm: str) -> None:
    """§5.4: dropout on every sub-layer's output before the residual addition, and on the sums of
    embeddings and positions; active in training, off in evaluation."""
    model = _model(norm=norm, dropout=0.25)
    calls: list[tuple[torch.Tensor, float, bool]] = []

    def recording_dropout(x, p, training):
        calls.append((x, p, training))
        return dropout(x, p, training)

    def recording_dropout_add(residual, x, p, training):  # a residual connection's dropout
        calls.append((x, p, training))
        return dropout_add(residual, x, p, training)

    for module in (transformer.model, transformer.layers):
        monkeypatch.setattr(module, "dropout", recording_dropout)
    monkeypatch.setattr(transformer.layers, "dropout_add", recording_dropout_add)
    sublayer_outputs: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, (MultiHeadAttention, FeedForward)):
            module.register_forward_hook(lambda _m, _i, out: sublayer_outputs.append(out))
    src, tgt = _tokens(2, 5, 1), _tokens(2, 4, 2)
    model.train()
    model(src, tgt)
    n_enc, n_dec = len(model.encoder.layers), len(model.decoder.layers)
    assert len(calls) == 2 + 2 * n_enc + 3 * n_dec  # two embeddings, two sub-layers per encoder layer, three per decoder layer
    assert all(p == 0.25 and training for _, p, training in calls)
    dropped = [x for x, _, _ in calls]
    assert all(any(out is x for x in dropped) for out in sublayer_outputs)  # each sub-layer output itself
    assert any(torch.equal(x, model.src_embed.tokens(src) + model.src_embed.positions(5)) for x in dropped)
    calls.clear()
    model.eval()
    first, second = model(src, tgt), model(src, tgt)
    assert all(not training for _, _, training in calls) and torch.equal(first, second)


def test_bad_config_names_the_key() -> None:
    with pytest.raises(ValueError, match="model.n_heads"):
        ModelConfig(d_model=100, n_heads=8)
    with pytest.raises(ValueError, match="model.dropout"):
        ModelConfig(dropout=1.5)


def test_model_package_has_no_distributed_imports() -> None:
    forbidden = {"ray", "deepspeed", "torch.distributed", "mlflow"}
    package = pathlib.Path(__file__).resolve().parents[2] / "transformer"
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (source, name)
