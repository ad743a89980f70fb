"""Structural properties of the model: causality, padding, sizes, and its import boundary."""

import ast
import pathlib

import pytest
import torch

from transformer import build_model, count_parameters, preset
from transformer.config import TABLE3_PARAMETERS_M, ModelConfig

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
    torch.testing.assert_close(model(src, tgt, where), model(src, tgt)[where])


def test_shared_embeddings_are_one_matrix_and_unshared_are_three() -> None:
    shared = _model(share_embeddings=True)
    assert shared.src_embed.tokens.weight is shared.output.proj.weight
    unshared = _model(share_embeddings=False)
    delta = count_parameters(unshared) - count_parameters(shared)
    assert delta == 2 * VOCAB * unshared.config.d_model


@pytest.mark.parametrize("row", sorted(TABLE3_PARAMETERS_M))
def test_parameter_counts_match_table3(row: str) -> None:
    """Absolute counts within 7% and the change from base within 3% (or 1.5M) of the paper's."""
    count = count_parameters(build_model(preset(row, vocab_size=37000))) / 1e6
    base = count_parameters(build_model(preset("base", vocab_size=37000))) / 1e6
    paper, paper_base = TABLE3_PARAMETERS_M[row], TABLE3_PARAMETERS_M["base"]
    assert abs(count - paper) / paper < 0.07
    paper_delta, delta = paper - paper_base, count - base
    assert abs(delta - paper_delta) <= max(1.5, 0.03 * abs(paper_delta))


def test_learned_positions_and_unequal_head_sizes_build_and_run() -> None:
    model = _model(positional="learned", d_k=8, d_v=24)
    assert model(_tokens(2, 5, 12), _tokens(2, 4, 13)).shape == (2, 4, VOCAB)


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
