"""Mixture-of-linear-experts building blocks: the packed expert heads (over K1) and MoLE's router."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mmts_fast import ops


class MultiExpertHeads(nn.Module):
    """M linear experts ``Y_m = W_m X[L-w_m:L] + b_m`` shared over channels, mixed by gates (K1).

    Parameters are one packed ``weight [M, H, L]`` (expert m's columns right-aligned on its window,
    the rest unused and kept at zero) and ``bias [M, H]``. Each expert is initialised as PyTorch's
    ``nn.Linear(w_m, H)``.
    """

    def __init__(self, lookback: int, horizon: int, n_experts: int, windows: Optional[Sequence[int]] = None):
        super().__init__()
        self.lookback, self.horizon, self.n_experts = lookback, horizon, n_experts
        self.windows = list(windows) if windows is not None else [lookback] * n_experts
        if len(self.windows) != n_experts:
            raise ValueError(f"{len(self.windows)} expert windows given for {n_experts} experts")
        for w in self.windows:
            if not 1 <= w <= lookback:
                raise ValueError(f"expert window {w} is longer than the lookback {lookback} "
                                 f"(each window must be between 1 and the lookback)")
        self.weight = nn.Parameter(torch.zeros(n_experts, horizon, lookback))
        self.bias = nn.Parameter(torch.zeros(n_experts, horizon))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.zero_()
            for m, w in enumerate(self.windows):
                bound = 1.0 / math.sqrt(w)
                self.weight[m, :, self.lookback - w:].uniform_(-bound, bound)
                self.bias[m].uniform_(-bound, bound)

    def forward(self, x: Tensor, gates: Tensor, **kwargs):
        """x ``[B, L, C]``, gates ``[B, C, M]`` or ``[B, M]``; keyword options as ``ops.expert_heads``."""
        return ops.expert_heads(x, self.weight, self.bias, gates, self.windows, **kwargs)

    def extra_repr(self) -> str:
        return f"lookback={self.lookback}, horizon={self.horizon}, experts={self.n_experts}, windows={self.windows}"


def head_dropout(logits: Tensor, p: float, training: bool) -> Tensor:
    """Drop each expert's logit with probability p (training only) by setting it to the most
    negative finite value of its dtype. Softmax of the result never has NaN: if every expert of a
    row drops, the row is uniform (MoLE's public -1e20 overflows to -inf in fp16/bf16 and gives NaN)."""
    if not training or p <= 0:
        return logits
    drop = torch.rand_like(logits, dtype=torch.float32) < p
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


class MoLERouter(nn.Module):
    """MoLE router: time features of the first lookback step -> ``Linear(F, M*C) -> ReLU ->
    Linear(M*C, M*C)`` -> per (sample, channel, expert) logits -> head dropout -> softmax over M."""

    def __init__(self, n_time_features: int, channels: int, n_experts: int, head_dropout: float = 0.0):
        super().__init__()
        self.channels, self.n_experts, self.p = channels, n_experts, head_dropout
        self.net = nn.Sequential(nn.Linear(n_time_features, n_experts * channels), nn.ReLU(),
                                 nn.Linear(n_experts * channels, n_experts * channels))

    def forward(self, x_mark_first: Tensor) -> Tensor:
        logits = self.net(x_mark_first).view(-1, self.channels, self.n_experts)
        logits = head_dropout(logits, self.p, self.training)
        return torch.softmax(logits.float(), dim=-1).to(logits.dtype)
