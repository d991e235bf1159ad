"""RevIN (Kim et al., ICLR 2022): reversible instance normalisation over time, per sample and channel."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mmts_fast.kernels.expert_heads import revin_denorm, revin_norm, revin_stats


class RevIN(nn.Module):
    """``norm(x)`` stores the statistics of ``x`` ([B, L, C]); ``denorm(y)`` undoes it on ``y`` ([B, H, C]).

    Statistics are detached and computed in fp32: ``std = sqrt(biased var + eps)``. The math is the
    same function the K1 kernel reference uses, so the fused and unfused paths agree.
    """

    def __init__(self, channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine else None

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return revin_stats(x, self.eps)

    def norm(self, x: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        return revin_norm(x, *stats, self.weight, self.bias)

    def denorm(self, y: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        return revin_denorm(y, *stats, self.weight, self.bias)
