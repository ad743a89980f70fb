"""Label-smoothed cross entropy (§5.4, epsilon_ls = 0.1) that ignores padding."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def _sums(nll: torch.Tensor, uniform: torch.Tensor, real: torch.Tensor, epsilon: float):
    """(smoothed loss summed over the real targets, each target's NLL with 0 at padding), from each
    row's NLL and mean -log p."""
    loss = ((1.0 - epsilon) * nll + epsilon * uniform).masked_fill(~real, 0.0).sum()
    return loss, nll.masked_fill(~real, 0.0)


def _logsumexp_sums(logits: torch.Tensor, targets: torch.Tensor, real: torch.Tensor, epsilon: float):
    """The compiled forward: (loss, each row's NLL, each row's log-sum-exp) from reductions over
    the logits as they are (bf16 read, fp32 summed), without writing any (N, V) tensor."""
    x = logits.float()
    lse = x.logsumexp(dim=-1)
    nll = lse - x.gather(1, targets.unsqueeze(1)).squeeze(1)
    return *_sums(nll, lse - x.mean(dim=-1), real, epsilon), lse


def _logsumexp_gradient(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
                        scale: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The compiled backward: softmax - eps / V - (1 - eps) [v = target], times each row's scale,
    in the logits' dtype; one elementwise kernel (no gather or scatter to split it)."""
    vocab = logits.shape[1]
    grad = (logits.float() - lse.unsqueeze(1)).exp() - epsilon / vocab
    is_target = torch.arange(vocab, device=logits.device) == targets.unsqueeze(1)
    return (torch.where(is_target, grad + (epsilon - 1.0), grad) * scale).to(logits.dtype)


@functools.cache
def _compiled(function: Callable) -> Callable:
    """`function` torch.compile'd once per process; token-budget batches change N every step."""
    return torch.compile(function, dynamic=True)


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """d loss / d logit_v = softmax_v - (1 - eps) [v = target] - eps / V per real target, written
    out: autograd's own graph (log_softmax, gather, mean and their backwards) makes several more
    passes over the (N, V) logits and allocates for each: 2.3x torch's `cross_entropy` alone, 1.08x
    a whole `small` CPU training step (bench/results/step_levers_cpu_2026-12-03.json).

    Eager, one fp32 log_softmax serves the NLL and the smoothing term, and the gradient is computed
    in place in those saved log-probabilities (a fresh (N, V) buffer costs the CPU its page faults).
    Compiled (with a compiled model), the logits themselves and each row's log-sum-exp are saved,
    and the forward and the backward are one fused pass each over the logits in their own dtype:
    on a GPU in bf16 that moves ~8 bytes per logit where the eager path moves ~48."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, epsilon: float, pad_id: int, compiled: bool,
                groups: torch.Tensor | None, group_count: int):
        real = targets != pad_id
        if compiled:
            loss, nll, lse = _compiled(_logsumexp_sums)(logits, targets, real, epsilon)
            ctx.save_for_backward(logits, lse, targets, real)
        else:
            log_probs = logits.float().log_softmax(dim=-1)
            loss, nll = _sums(-log_probs.gather(1, targets.unsqueeze(1)).squeeze(1), -log_probs.mean(dim=-1), real,
                              epsilon)
            ctx.save_for_backward(log_probs, targets, real)
        nll_sum = nll.sum() if groups is None else nll.new_zeros(group_count).index_add_(0, groups, nll)
        ctx.mark_non_differentiable(nll_sum)
        ctx.epsilon, ctx.logits_dtype, ctx.compiled, ctx.spent = epsilon, logits.dtype, compiled, False
        return loss, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        if ctx.spent and not ctx.compiled:  # the gradient overwrote the saved log-probabilities
            raise RuntimeError("label_smoothed_loss supports one backward pass (no retain_graph)")
        ctx.spent, epsilon = True, ctx.epsilon
        *kept, real = ctx.saved_tensors
        scale = (grad_loss * real).unsqueeze(1).float()  # (N, 1): 0 at padding
        if ctx.compiled:
            logits, lse, targets = kept
            return _compiled(_logsumexp_gradient)(logits, lse, targets, scale, epsilon), None, None, None, None, None, None
        log_probs, targets = kept
        grad = log_probs.exp_().sub_(epsilon / log_probs.shape[1])
        grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(scale, epsilon - 1.0))
        return grad.mul_(scale).to(ctx.logits_dtype), None, None, None, None, None, None


def label_smoothed_loss(
    logits: torch.Tensor,  # (N, V) or (B, T, V)
    targets: torch.Tensor,  # (N,) or (B, T)
    epsilon: float,
    pad_id: int,
    *,
    compiled: bool = False,
    groups: torch.Tensor | None = None,
    group_count: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed smoothed loss and summed NLL (not differentiable) over non-pad targets.

    The smoothing mass epsilon is spread uniformly over the whole vocabulary (the paper's and
    torch's convention): loss = (1 - eps) * nll + eps * mean_v(-log p_v). Sums, not means, so that
    callers normalise by the token count of the whole (possibly accumulated) batch. `compiled`:
    torch.compile the loss's two passes (inductor), as training does when it compiles the model.
    `groups` (one integer below `group_count` per target, on the logits' device): the NLL is then
    summed per group, a (group_count,) tensor, as a mixture's loss per corpus.
    """
    return _LabelSmoothedCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            epsilon, pad_id, compiled, groups, group_count)
