"""LeMoLE: LLM-enhanced mixture of linear experts (ICLR 2025 submission; builds on MoLE,
arXiv 2312.06786). SPEC section 1.2.

- Experts over different lookback windows ``Y_m = W_m X[L-w_m:L] + b_m`` (K1 with per-expert outputs),
  after RevIN (affine) and dropout.
- ``Y = CNN([Y_1; ...; Y_M])``: two ``Conv1d(kernel 3, padding 1)`` over the horizon, M*C -> C -> C.
- Static prompt embedding ``Z_S`` [d_llm] (dataset description through a frozen LLM) and dynamic
  prompt embeddings ``Z_D`` [L, d_llm] (one per lookback step, AutoTimes-style timestamp text),
  both precomputed and cached (training never runs the LLM).
- FiLM: ``Y'_S = gamma_S Y + beta_S`` with ``[gamma_S, beta_S] = Linear(d_llm -> 2*H*C)(Z_S)``;
  ``Y'_D = gamma_D Y + beta_D`` with ``[gamma_D, beta_D] = Linear(L -> H)`` over ``Linear(d_llm -> 2C)(Z_D)``.
  Gammas are parameterised as ``1 + Linear(...)`` so the FiLM starts as the identity (our choice).
- Output: ``"paper"``: ``CNN_final([Y; Y'_S; Y'_D])``; ``"code"`` (public code): ``CNN_final([Y'_D; Y'_S]) + Y``.
  The public code's scrambled stacking of expert outputs is not copied: experts stack expert-major.

The FiLM here acts on the CNN's output, not on K1's gated mix, so it cannot live in K1's epilogue;
RevIN is fused into K1 whenever input dropout is inactive (eval).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from mmts_fast.models.base import ForecastModel, check_windows, require_fraction, require_positive
from mmts_fast.nn import MultiExpertHeads, RevIN

PUBLIC_WINDOWS_512 = (512, 336, 192, 96, 96)


def default_windows(lookback: int, n_experts: int) -> list[int]:
    """The public code's windows for L=512, [512, 336, 192, 96, 96][:M], scaled to other lookbacks."""
    base = list(PUBLIC_WINDOWS_512) + [96] * max(0, n_experts - len(PUBLIC_WINDOWS_512))
    return [max(1, min(lookback, round(w * lookback / 512))) for w in base[:n_experts]]


@dataclass
class LeMoLEConfig:
    lookback: int = 512
    horizon: int = 96
    channels: int = 7
    n_experts: int = 4
    windows: Optional[list] = None          # default: default_windows(lookback, n_experts)
    d_llm: int = 384                         # width of the text embeddings (384: MiniLM, 576: SmolLM2)
    text_encoder: Optional[str] = None       # the encoder that made the training embeddings (a record;
                                             # the CLI fills it): feed embeddings of the same one
    dropout: float = 0.1
    use_static: bool = True                  # False: no static-prompt FiLM (text ablation)
    use_dynamic: bool = True                 # False: no dynamic-prompt FiLM (text ablation)
    output_form: str = "paper"               # "paper" | "code"
    channel_independent: bool = True         # the CNNs mix experts/branches per channel only (grouped convs);
                                             # False: across all channels, as the paper (overfits ETTh1: RESULTS.md)
    n_time_features: int = 4                 # accepted for TSLib compatibility; LeMoLE does not route on it

    def __post_init__(self):
        require_positive(self, "lookback", "horizon", "channels", "n_experts", "d_llm", "n_time_features")
        require_fraction(self, "dropout")
        if self.output_form not in ("paper", "code"):
            raise ValueError(f"output_form must be 'paper' or 'code', got {self.output_form!r}")
        if self.windows is None:
            self.windows = default_windows(self.lookback, self.n_experts)
        self.windows = check_windows(self.windows, self.n_experts, self.lookback)


def _conv_stack(c_in: int, c_out: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 3, padding=1, groups=groups),
                         nn.Conv1d(c_out, c_out, 3, padding=1, groups=groups))


class LeMoLE(ForecastModel):
    """LeMoLE. ``forward(x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None, *,
    static_emb=None, dynamic_emb=None, dynamic_table=None, dynamic_index=None) -> [B, H, C]`` with
    ``static_emb`` ``[d_llm]`` or ``[B, d_llm]`` and the dynamic prompts (required when the branch is
    enabled) in one of two equal forms:

    - ``dynamic_emb`` ``[B, L, d_llm]``: each window's embeddings (the ONNX export's form);
    - ``dynamic_table`` ``[T, d_llm]`` with ``dynamic_index`` ``[B, L]`` (int64 rows of the table):
      ``dynamic_emb[b, l] = dynamic_table[dynamic_index[b, l]]``. Timestamps are shared by
      overlapping windows, so the projection ``Linear(d_llm -> 2C)`` runs once per distinct row
      instead of once per (window, step): the training loop passes this form (the rows a batch spans).
    """
    model_type: ClassVar[str] = "lemole"
    config_class: ClassVar[type] = LeMoLEConfig
    extra_inputs: ClassVar[tuple] = ("static_emb", "dynamic_emb")

    def __init__(self, config: LeMoLEConfig):
        super().__init__(config)
        L, H, C, M, d = config.lookback, config.horizon, config.channels, config.n_experts, config.d_llm
        self.revin = RevIN(C)
        self.dropout = nn.Dropout(config.dropout)
        self.heads = MultiExpertHeads(L, H, M, config.windows)
        groups = C if config.channel_independent else 1
        self.cnn = _conv_stack(M * C, C, groups)
        n_branches = 1
        if config.use_static:
            self.static_film = nn.Linear(d, 2 * H * C)
            n_branches += 1
        if config.use_dynamic:
            self.dynamic_proj = nn.Linear(d, 2 * C)
            self.dynamic_time = nn.Linear(L, H)
            n_branches += 1
        if config.output_form == "code":
            n_branches -= 1
        self.cnn_final = _conv_stack(n_branches * C, C, groups) if n_branches else None
        for lin in (getattr(self, "static_film", None), getattr(self, "dynamic_time", None)):
            if lin is not None:   # start near the identity FiLM
                nn.init.normal_(lin.weight, std=0.01)
                nn.init.zeros_(lin.bias)

    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None, *,
                static_emb: Optional[Tensor] = None, dynamic_emb: Optional[Tensor] = None,
                dynamic_table: Optional[Tensor] = None, dynamic_index: Optional[Tensor] = None):
        cfg = self.config
        self.check_inputs(x_enc, x_mark_enc)
        B, L, C = x_enc.shape
        H, M = cfg.horizon, cfg.n_experts
        gates = x_enc.new_ones(B, M)           # LeMoLE mixes with the CNN, not with gates
        if self.training and self.dropout.p > 0:
            stats = self.revin.stats(x_enc)
            _, e = self.heads(self.dropout(self.revin.norm(x_enc, stats)), gates, return_experts=True)
        else:                                  # RevIN fused into K1; e is in normalised space
            stats = self.revin.stats(x_enc)
            _, e = self.heads(x_enc, gates, return_experts=True, revin=True, revin_weight=self.revin.weight,
                              revin_bias=self.revin.bias, eps=self.revin.eps)
        if cfg.channel_independent:    # channel-major stacking: group c holds channel c's M experts
            y = self.cnn(e.permute(0, 3, 1, 2).reshape(B, C * M, H))
        else:                          # experts stacked expert-major: [Y_1; ...; Y_M]
            y = self.cnn(e.permute(0, 1, 3, 2).reshape(B, M * C, H))      # [B, C, H]
        film_s = film_d = None
        if cfg.use_dynamic:
            gb = self._dynamic_film(B, L, y.dtype, dynamic_emb, dynamic_table, dynamic_index)  # [B, 2C, H]
            film_d = (1 + gb[:, :C]) * y + gb[:, C:]
        if cfg.use_static:
            if static_emb is None or static_emb.shape[-1] != cfg.d_llm:
                raise ValueError(f"LeMoLE needs static_emb [d_llm] or [B, d_llm] with d_llm={cfg.d_llm}, got "
                                 f"{None if static_emb is None else tuple(static_emb.shape)}; "
                                 f"or build it with use_static=False")
            if static_emb.dim() > 2 or (static_emb.dim() == 2 and static_emb.shape[0] not in (1, B)):
                raise ValueError(f"LeMoLE needs static_emb [d_llm] or [B={B}, d_llm], got {tuple(static_emb.shape)}")
            gb = self.static_film(static_emb.to(y.dtype)).view(-1, 2 * C, H)                   # [B or 1, 2C, H]
            film_s = ((1 + gb[:, :C]) * y + gb[:, C:]).expand(B, C, H)
        if cfg.output_form == "paper":         # CNN_final([Y; Y'_S; Y'_D])
            branches = [t for t in (y, film_s, film_d) if t is not None]
        else:                                  # public code: CNN_final([Y'_D; Y'_S]) + Y
            branches = [t for t in (film_d, film_s) if t is not None]
        out = self.cnn_final(self._stack(branches)) if branches else 0
        if cfg.output_form == "code":
            out = out + y
        return self.revin.denorm(out.transpose(1, 2), stats)

    def export_inputs(self, extra: dict) -> dict:
        """``dynamic_table`` + ``dynamic_index`` -> ``dynamic_emb [B, L, d_llm]``, the ONNX graph's input."""
        extra = dict(extra)
        if "dynamic_table" in extra:
            extra["dynamic_emb"] = extra.pop("dynamic_table")[extra.pop("dynamic_index")]
        return extra

    def _dynamic_film(self, B: int, L: int, dtype, emb, table, index) -> Tensor:
        """``[gamma_D - 1; beta_D]`` as ``[B, 2C, H]``: ``Linear(L -> H)`` over ``Linear(d_llm -> 2C)(Z_D)``."""
        d = self.config.d_llm
        if table is None and index is None:                                   # per-window embeddings
            if emb is None or emb.shape != (B, L, d):
                raise ValueError(f"LeMoLE needs dynamic_emb [B, L, d_llm]=({B}, {L}, {d}) (or dynamic_table + "
                                 f"dynamic_index), got {None if emb is None else tuple(emb.shape)}; "
                                 f"or build it with use_dynamic=False")
            return self.dynamic_time(self.dynamic_proj(emb.to(dtype)).transpose(1, 2))
        if emb is not None:
            raise ValueError("LeMoLE: give dynamic_emb or dynamic_table + dynamic_index, not both")
        if table is None or index is None or table.dim() != 2 or table.shape[1] != d:
            raise ValueError(f"LeMoLE needs dynamic_table [T, d_llm={d}] together with dynamic_index [B, L], "
                             f"got {None if table is None else tuple(table.shape)} and "
                             f"{None if index is None else tuple(index.shape)}")
        if tuple(index.shape) != (B, L) or index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"LeMoLE needs dynamic_index [B, L]=({B}, {L}) of int64 table rows, "
                             f"got {tuple(index.shape)} {index.dtype}")
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= table.shape[0]:
            raise ValueError(f"LeMoLE: dynamic_index reads rows {lo}..{hi} of a dynamic_table with "
                             f"{table.shape[0]} rows")
        if table.shape[0] > 2 * B * L:   # a big table: project only the rows these windows read
            rows, index = torch.unique(index, return_inverse=True)
            table = table.index_select(0, rows)
        # Rows are gathered from the projected table laid out [2C, T], straight into the [2C, B, L]
        # layout Linear(L -> H) reads (no [B, L, 2C] -> [B, 2C, L] copy; the backward is an index_add).
        q = self.dynamic_proj(table.to(dtype)).t().contiguous()                          # [2C, T]
        p = q.index_select(1, index.reshape(-1)).view(q.shape[0], B, L)                   # [2C, B, L]
        return self.dynamic_time(p).permute(1, 0, 2)                                      # [B, 2C, H]

    def _stack(self, branches: list) -> Tensor:
        """``[B, n*C, H]``: branch-major, or channel-major when the CNNs are grouped per channel."""
        if self.config.channel_independent:
            return torch.stack(branches, dim=2).flatten(1, 2)
        return torch.cat(branches, dim=1)
