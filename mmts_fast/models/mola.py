"""MoLA: mixture of LoRA experts over forecast-step segments (Pan et al., arXiv 2505.17872).
No public code: this is our reading (SPEC section 1.3).

Stage 1 trains a backbone (DLinear/RLinear/RMLP-MoLE) with a ONE-step head ``W_0``. Stage 2 freezes
it and adapts to H steps: the H steps are split into S contiguous segments and segment s uses

    W_s = W_0 (repeated over the segment's steps) + scale * sum_p alpha[s, p] B_p A_p

with P LoRA experts shared by all segments (``A_p [r, L']``, ``B_p [H, r]``, the rows of ``B_p`` for
segment s used there) and per-segment softmax mixing weights ``alpha[s]`` (learned). The LoRA part
is one call of K2's segment variant (``mmts_fast.ops.lora_mixture(..., segments=S)``) on the same
input the backbone's heads read; the frozen one-step heads are broadcast to H steps without copies.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mmts_fast import ops
from mmts_fast.models.base import ForecastModel, require_positive

BACKBONES = {"dlinear": "dlinear_mole", "rlinear": "rlinear_mole", "rmlp": "rmlp_mole"}


@dataclass
class MoLAConfig:
    backbone: dict = field(default_factory=dict)   # the stage-1 backbone's config, with "model_type"
    horizon: int = 96
    segments: int = 4
    n_lora: int = 4          # P shared LoRA experts
    rank: int = 8
    alpha: float = 16.0      # LoRA scale = alpha / rank

    def __post_init__(self):
        require_positive(self, "horizon", "segments", "n_lora", "rank")
        try:
            ok = not isinstance(self.alpha, (bool, str)) and math.isfinite(float(self.alpha))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"MoLAConfig.alpha must be a finite number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.segments > self.horizon:
            raise ValueError(f"segments={self.segments} is more than the horizon {self.horizon}")
        kind = self.backbone.get("model_type") if isinstance(self.backbone, dict) else None
        if kind not in BACKBONES.values():
            raise ValueError(f"MoLA's backbone must be one of the MoLE family {sorted(BACKBONES.values())} "
                             f"(config dict with 'model_type'), got {kind!r}; build MoLA with "
                             f"MoLA.from_backbone(trained_one_step_model, horizon=...)")
        if self.backbone.get("horizon", 1) != 1:
            raise ValueError("MoLA's backbone must be a one-step model (horizon=1, stage 1)")
        # the backbone's full config: fields left out take their defaults, so none is ever missing
        from mmts_fast.models import get_model_class
        from mmts_fast.models.base import build_config

        fields = {k: v for k, v in self.backbone.items() if k != "model_type"}
        fields.setdefault("horizon", 1)
        cfg = build_config(get_model_class(kind).config_class, fields, "MoLAConfig.backbone")
        self.backbone = {"model_type": kind, **dataclasses.asdict(cfg)}

    # the ForecastModel input checks read these
    @property
    def lookback(self) -> int:
        return self.backbone["lookback"]

    @property
    def channels(self) -> int:
        return self.backbone["channels"]

    @property
    def n_time_features(self) -> int:
        return self.backbone["n_time_features"]


class MoLA(ForecastModel):
    """Stage-2 MoLA model around a frozen one-step backbone. Build with :meth:`from_backbone`."""
    model_type: ClassVar[str] = "mola"
    config_class: ClassVar[type] = MoLAConfig

    def __init__(self, config: MoLAConfig):
        from mmts_fast.models import get_model_class

        super().__init__(config)
        bb = dict(config.backbone)
        klass = get_model_class(bb.pop("model_type"))
        self.backbone = klass(klass.config_class(**bb))
        self.backbone.requires_grad_(False)
        d_in = self.backbone.heads.lookback                 # L' (2L for DLinear's [seasonal; trend])
        P, r, H = config.n_lora, config.rank, config.horizon
        self.lora_a = nn.Parameter(torch.empty(P, r, d_in))
        self.lora_b = nn.Parameter(torch.zeros(P, H, r))
        self.alpha_logits = nn.Parameter(torch.zeros(config.segments, P))
        for p in range(P):                                  # A as peft initialises it, B zero: starts at W_0
            nn.init.kaiming_uniform_(self.lora_a[p], a=math.sqrt(5))

    @classmethod
    def from_backbone(cls, backbone: ForecastModel, horizon: int, **kwargs) -> "MoLA":
        """Stage 2 from a trained one-step backbone (its weights are copied in and frozen)."""
        cfg = {"model_type": backbone.model_type, **backbone.config.__dict__}
        model = cls(MoLAConfig(backbone=cfg, horizon=horizon, **kwargs))
        model.backbone.load_state_dict(backbone.state_dict())
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()          # frozen: no dropout, no head dropout in stage 2
        return self

    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None):
        cfg = self.config
        bb = self.backbone
        self.check_inputs(x_enc, x_mark_enc)
        B, _, C = x_enc.shape
        H, M = cfg.horizon, bb.config.n_experts
        x, state = bb.head_input(x_enc)                                     # [B, L', C]
        heads = bb.heads
        base = ops.expert_heads(x, heads.weight.expand(M, H, -1), heads.bias.expand(M, H),
                                bb.gates(x_enc, x_mark_enc), heads.windows)  # W_0 repeated over H steps
        rows = x.transpose(1, 2).reshape(B * C, -1)
        gates = torch.softmax(self.alpha_logits, dim=-1)                     # [S, P]
        delta = ops.lora_mixture(rows, None, None, self.lora_a, self.lora_b, gates, cfg.alpha / cfg.rank,
                                 segments=cfg.segments)                     # [B*C, H]
        return bb.head_output(base + delta.view(B, C, H).transpose(1, 2), state)
