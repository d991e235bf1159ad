"""MoLE: Mixture of Linear Experts (Ni, Lin, Wang, Wang, Wang, Meng, Zhang; "Mixture-of-Linear-Experts
for Long-term Time Series Forecasting", AISTATS 2024, arXiv 2312.06786).

Three variants over the fused multi-expert heads kernel (K1); with ``n_experts=1`` they are the
single-head DLinear (Zeng et al., AAAI 2023) and RLinear (Li et al., 2023) baselines.

- ``DLinearMoLE``: moving-average decomposition; seasonal and trend each through their own
  ``Linear(L -> H*M)``, summed. Fused into ONE K1 call over the concatenated ``[seasonal; trend]``
  (lookback 2L), which is the same sum of two linear maps.
- ``RLinearMoLE``: RevIN (affine) -> dropout -> ``Linear(L -> H*M)`` -> mix -> RevIN denorm.
  Without active dropout (eval, or p=0) RevIN is fused into the K1 call.
- ``RMLPMoLE``: RevIN; ``x = x + MLP(x)`` over time; then as RLinear-MoLE.

Router (SPEC 1.1): time features of the first lookback step -> MLP -> softmax over experts per
(sample, channel), with head dropout during training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from mmts_fast.models.base import ForecastModel, check_windows, require_fraction, require_positive
from mmts_fast.nn import MoLERouter, MultiExpertHeads, RevIN, SeriesDecomp


@dataclass
class MoLEConfig:
    """Shared MoLE settings. ``n_time_features``: 4 for hourly timeF, 5 for minutely (SPEC 3)."""
    lookback: int = 336
    horizon: int = 96
    channels: int = 7
    n_experts: int = 4
    n_time_features: int = 4
    head_dropout: float = 0.0
    windows: Optional[list] = None     # per-expert lookback windows (None: all experts see L)

    def __post_init__(self):
        require_positive(self, "lookback", "horizon", "channels", "n_experts", "n_time_features")
        require_fraction(self, "head_dropout")
        if self.windows is not None:
            self.windows = check_windows(self.windows, self.n_experts, self.lookback)


@dataclass
class DLinearMoLEConfig(MoLEConfig):
    moving_avg: int = 25               # odd moving-average kernel of the decomposition

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, "moving_avg")
        if self.moving_avg % 2 == 0:
            raise ValueError(f"DLinearMoLEConfig.moving_avg must be an odd integer >= 1 (a centred moving "
                             f"average), got {self.moving_avg}")
        if self.windows is not None:
            raise ValueError("DLinearMoLEConfig: DLinearMoLE does not take expert windows (windows=None)")


@dataclass
class RLinearMoLEConfig(MoLEConfig):
    dropout: float = 0.1
    revin_affine: bool = True

    def __post_init__(self):
        super().__post_init__()
        require_fraction(self, "dropout")


@dataclass
class RMLPMoLEConfig(RLinearMoLEConfig):
    mlp_hidden: int = 512

    def __post_init__(self):
        super().__post_init__()
        require_positive(self, "mlp_hidden")


class _MoLEBase(ForecastModel):
    def __init__(self, config: MoLEConfig):
        super().__init__(config)
        self.router = MoLERouter(config.n_time_features, config.channels, config.n_experts, config.head_dropout)

    def gates(self, x_enc: Tensor, x_mark_enc: Optional[Tensor]) -> Tensor:
        """Router weights ``[B, C, M]`` from the first lookback step's time features."""
        cfg = self.config
        if x_mark_enc is None:
            if cfg.n_experts == 1:
                return x_enc.new_ones(x_enc.shape[0], cfg.channels, 1)
            raise ValueError(f"{type(self).__name__} with {cfg.n_experts} experts routes on time features: "
                             f"pass x_mark_enc [B, L, {cfg.n_time_features}]")
        if x_mark_enc.shape[-1] != cfg.n_time_features:
            raise ValueError(f"x_mark_enc has {x_mark_enc.shape[-1]} time features, the model expects "
                             f"n_time_features={cfg.n_time_features}")
        return self.router(x_mark_enc[:, 0].to(x_enc.dtype))

    # The two halves around the linear heads, also used by MoLA to put its adapters on the same input.
    def head_input(self, x_enc: Tensor) -> tuple[Tensor, object]:
        """What the heads read, ``[B, L', C]``, and the state ``head_output`` needs."""
        raise NotImplementedError

    def head_output(self, z: Tensor, state) -> Tensor:
        """The heads' mixed output ``[B, H, C]`` -> the forecast."""
        return z


class DLinearMoLE(_MoLEBase):
    """DLinear-MoLE (``n_experts=1``: DLinear). See the module docstring."""
    model_type: ClassVar[str] = "dlinear_mole"
    config_class: ClassVar[type] = DLinearMoLEConfig

    def __init__(self, config: DLinearMoLEConfig):
        if config.windows is not None:
            raise ValueError("DLinearMoLE does not take expert windows")
        super().__init__(config)
        self.decomp = SeriesDecomp(config.moving_avg)
        L, H, M = config.lookback, config.horizon, config.n_experts
        # Columns [0, L): seasonal weights; [L, 2L): trend weights (two Linear(L -> H*M), one kernel call).
        self.heads = MultiExpertHeads(2 * L, H, M)
        with torch.no_grad():   # initialise each half like its own nn.Linear(L, H)
            self.heads.weight.uniform_(-L ** -0.5, L ** -0.5)
            self.heads.bias.uniform_(-L ** -0.5, L ** -0.5)

    def head_input(self, x_enc):
        seasonal, trend = self.decomp(x_enc)
        return torch.cat([seasonal, trend], dim=1), None

    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None):
        self.check_inputs(x_enc, x_mark_enc)
        return self.heads(self.head_input(x_enc)[0], self.gates(x_enc, x_mark_enc))


class RLinearMoLE(_MoLEBase):
    """RLinear-MoLE (``n_experts=1``: RLinear). See the module docstring."""
    model_type: ClassVar[str] = "rlinear_mole"
    config_class: ClassVar[type] = RLinearMoLEConfig

    def __init__(self, config: RLinearMoLEConfig):
        super().__init__(config)
        self.revin = RevIN(config.channels, affine=config.revin_affine)
        self.dropout = nn.Dropout(config.dropout)
        self.heads = MultiExpertHeads(config.lookback, config.horizon, config.n_experts, config.windows)

    def encode(self, x: Tensor) -> Tensor:
        """What runs between RevIN and the heads (identity here; an MLP in RMLP-MoLE)."""
        return x

    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None):
        self.check_inputs(x_enc, x_mark_enc)
        gates = self.gates(x_enc, x_mark_enc)
        fused = type(self).encode is RLinearMoLE.encode and not (self.training and self.dropout.p > 0)
        if fused:   # RevIN inside the kernel: x read once, normalised on load, output denormalised in place
            return self.heads(x_enc, gates, revin=True, revin_weight=self.revin.weight,
                              revin_bias=self.revin.bias, eps=self.revin.eps)
        x, stats = self.head_input(x_enc)
        return self.head_output(self.heads(x, gates), stats)

    def head_input(self, x_enc):
        stats = self.revin.stats(x_enc)
        return self.dropout(self.encode(self.revin.norm(x_enc, stats))), stats

    def head_output(self, z, stats):
        return self.revin.denorm(z, stats)


class RMLPMoLE(RLinearMoLE):
    """RMLP-MoLE (``n_experts=1``: RMLP). See the module docstring."""
    model_type: ClassVar[str] = "rmlp_mole"
    config_class: ClassVar[type] = RMLPMoLEConfig

    def __init__(self, config: RMLPMoLEConfig):
        super().__init__(config)
        L = config.lookback
        self.mlp = nn.Sequential(nn.Linear(L, config.mlp_hidden), nn.ReLU(), nn.Linear(config.mlp_hidden, L))

    def encode(self, x: Tensor) -> Tensor:
        return x + self.mlp(x.transpose(1, 2)).transpose(1, 2)
