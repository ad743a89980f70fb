"""Dropout (§5.4) whose CPU path is not dominated by drawing its mask.

On a CPU, `F.dropout` draws one random number per element (`bernoulli_`), some 40x the cost of
the multiply that applies the mask: 8% of a `small` training step (torch's profiler). Here each
64-bit draw of the same generator gives four 16-bit uniform integers, each element kept when its
integer is at or above round(p x 65536): dropout with probability p rounded to 1/65536 (0.1
becomes 0.1000061), the rest scaled by exactly 1 / (1 - that). Accelerators (fused kernels) and
compiled graphs (inductor generates its own) keep `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LEVELS = 1 << 16  # the values of one 16-bit integer


def _keep_mask(shape: torch.Size, drop_levels: int) -> torch.Tensor:
    """True with probability 1 - drop_levels / 65536, one element per 16 bits of a 64-bit draw."""
    count = shape.numel()
    bits = torch.randint(-(1 << 63), (1 << 63) - 1, (-(-count // 4),), dtype=torch.int64)
    return (bits.view(torch.int16)[:count] >= drop_levels - _LEVELS // 2).view(shape)


class _PackedMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, drop_levels: int) -> torch.Tensor:
        keep = _keep_mask(x.shape, drop_levels)
        ctx.save_for_backward(keep)
        ctx.scale = _LEVELS / (_LEVELS - drop_levels)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keep, = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each element with probability `p` and scale the rest by 1 / (1 - p) while training."""
    if not training or p == 0.0:
        return x
    drop_levels = round(p * _LEVELS)
    if x.device.type != "cpu" or drop_levels >= _LEVELS or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _PackedMaskDropout.apply(x, drop_levels)
