"""Label-smoothed cross entropy (§5.4, epsilon_ls = 0.1) that ignores padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothed_loss(
    logits: torch.Tensor,  # (N, V) or (B, T, V)
    targets: torch.Tensor,  # (N,) or (B, T)
    epsilon: float,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed smoothed loss and summed NLL over non-pad targets.

    The smoothing mass epsilon is spread uniformly over the whole vocabulary (the paper's and
    torch's convention): loss = (1 - eps) * nll + eps * mean_v(-log p_v). Sums, not means, so that
    callers normalise by the token count of the whole (possibly accumulated) batch.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, ignore_index=pad_id, label_smoothing=epsilon, reduction="sum")
    with torch.no_grad():
        nll = F.cross_entropy(logits, targets, ignore_index=pad_id, reduction="sum")
    return loss, nll
