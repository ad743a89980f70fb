"""Label-smoothed cross entropy (§5.4, epsilon_ls = 0.1) that ignores padding."""

from __future__ import annotations

import torch


def label_smoothed_loss(
    logits: torch.Tensor,  # (N, V) or (B, T, V)
    targets: torch.Tensor,  # (N,) or (B, T)
    epsilon: float,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed smoothed loss and summed NLL over non-pad targets.

    The smoothing mass epsilon is spread uniformly over the whole vocabulary (the paper's and
    torch's convention): loss = (1 - eps) * nll + eps * mean_v(-log p_v). Sums, not means, so that
    callers normalise by the token count of the whole (possibly accumulated) batch. One fp32
    log_softmax serves both: at a large vocabulary that pass costs as much as the rest of a step.
    """
    log_probs = logits.reshape(-1, logits.shape[-1]).float().log_softmax(dim=-1)
    targets = targets.reshape(-1)
    real = targets != pad_id
    nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    loss = ((1.0 - epsilon) * nll + epsilon * uniform).masked_fill(~real, 0.0).sum()
    return loss, nll.detach().masked_fill(~real, 0.0).sum()
