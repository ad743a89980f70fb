"""A tiny model learns to copy and to reverse random sequences (>= 99% token accuracy)."""

import pytest
import torch

from transformer import build_model, preset
from transformer.decoding import Decoding, greedy_search
from transformer.loss import label_smoothed_loss
from transformer.schedule import inverse_sqrt_lr

VOCAB, LENGTH, BOS, EOS = 16, 8, 2, 3


def _batch(generator: torch.Generator, size: int, reverse: bool):
    body = torch.randint(4, VOCAB, (size, LENGTH), generator=generator)
    target = body.flip(1) if reverse else body
    bos = torch.full((size, 1), BOS)
    eos = torch.full((size, 1), EOS)
    return body, torch.cat([bos, target], 1), torch.cat([target, eos], 1)


@pytest.mark.parametrize("reverse", [False, True])
def test_tiny_model_learns_copy_and_reverse(reverse: bool) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = preset("tiny", vocab_size=VOCAB, d_model=64, d_ff=256, n_layers=2, label_smoothing=0.0)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: inverse_sqrt_lr(step + 1, 3e-3, 50))
    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        src, tgt_in, tgt_out = _batch(generator, 64, reverse)
        loss, _ = label_smoothed_loss(model(src, tgt_in), tgt_out, config.label_smoothing, config.pad_id)
        optimizer.zero_grad()
        (loss / tgt_out.numel()).backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    src, _, tgt_out = _batch(torch.Generator().manual_seed(99), 200, reverse)
    hypotheses = greedy_search(model, src, Decoding(max_len_b=2))
    predicted = torch.tensor([(h.tokens + [0] * LENGTH)[:LENGTH] for h in hypotheses])
    accuracy = (predicted == tgt_out[:, :LENGTH]).float().mean().item()
    assert accuracy >= 0.99, accuracy
