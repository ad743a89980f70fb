"""Label-smoothed cross entropy (§5.4, epsilon_ls = 0.1) that ignores padding."""

from __future__ import annotations

import torch


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """Forward: one fp32 log_softmax serves the NLL and the smoothing term. Backward, written out:
    d loss / d logit_v = softmax_v - (1 - eps) [v = target] - eps / V per real target, computed in
    place in the saved log-probabilities. Autograd's own graph (log_softmax, gather, mean and their
    backwards) makes several more passes over the (N, V) logits and allocates for each: 2.3x
    torch's `cross_entropy` alone, 1.08x a whole `small` CPU training step
    (bench/results/step_levers_cpu_2026-12-03.json)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, epsilon: float, pad_id: int):
        log_probs = logits.float().log_softmax(dim=-1)
        real = targets != pad_id
        nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        uniform = -log_probs.mean(dim=-1)
        loss = ((1.0 - epsilon) * nll + epsilon * uniform).masked_fill(~real, 0.0).sum()
        nll_sum = nll.masked_fill(~real, 0.0).sum()
        ctx.mark_non_differentiable(nll_sum)
        ctx.save_for_backward(log_probs, targets, real)
        ctx.epsilon, ctx.logits_dtype, ctx.spent = epsilon, logits.dtype, False
        return loss, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        if ctx.spent:  # the gradient overwrote the saved log-probabilities
            raise RuntimeError("label_smoothed_loss supports one backward pass (no retain_graph)")
        ctx.spent = True
        log_probs, targets, real = ctx.saved_tensors
        epsilon = ctx.epsilon
        scale = (grad_loss * real).unsqueeze(1).to(log_probs.dtype)  # (N, 1): 0 at padding
        grad = log_probs.exp_().sub_(epsilon / log_probs.shape[1])
        grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(scale, epsilon - 1.0))
        return grad.mul_(scale).to(ctx.logits_dtype), None, None, None


def label_smoothed_loss(
    logits: torch.Tensor,  # (N, V) or (B, T, V)
    targets: torch.Tensor,  # (N,) or (B, T)
    epsilon: float,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed smoothed loss and summed NLL (not differentiable) over non-pad targets.

    The smoothing mass epsilon is spread uniformly over the whole vocabulary (the paper's and
    torch's convention): loss = (1 - eps) * nll + eps * mean_v(-log p_v). Sums, not means, so that
    callers normalise by the token count of the whole (possibly accumulated) batch.
    """
    return _LabelSmoothedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), epsilon, pad_id)
