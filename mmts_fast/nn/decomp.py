"""Series decomposition of DLinear (Zeng et al., AAAI 2023)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F


class SeriesDecomp(nn.Module):
    """Moving-average trend (kernel k, stride 1, edges replicated by (k-1)//2 on both sides) and the
    seasonal remainder. Input and outputs ``[B, L, C]``."""

    def __init__(self, kernel_size: int = 25):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"moving-average kernel must be odd and >= 1, got {kernel_size}")
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pad = (self.kernel_size - 1) // 2
        padded = torch.cat([x[:, :1].expand(-1, pad, -1), x, x[:, -1:].expand(-1, pad, -1)], dim=1)
        trend = F.avg_pool1d(padded.transpose(1, 2), self.kernel_size, stride=1).transpose(1, 2)
        return x - trend, trend
