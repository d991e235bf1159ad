"""MoME: Mixture of Modulated Experts (arXiv 2601.21547; public code). SPEC section 1.4.

- Channel-independent patches of length p (end zero-padded) -> ``Linear(p -> d)`` tokens (+ learned positions).
- Each layer: ``x + MoE(LayerNorm(x))``. Router ``Linear(d -> E, no bias)``, softmax in fp32, top-k,
  no renormalisation. Experts: SwiGLU ``down(silu(gate(x)) * up(x))``, d -> d -> d, no bias, run as
  one grouped computation (:mod:`mmts_fast.nn.routed`).
- EiLM (expert modulation from text): instruction tokens ``Ins [B, N_i, d]``; per expert e,
  ``gamma_e = mean_i Linear_e(d -> 1)(Ins_i)`` (a scalar per sample) and ``beta_e = mean_i
  Linear_e(d -> d)(Ins_i)``; ``out = sum_{e in topk} w_e (gamma_e Expert_e(x) + beta_e)``. Batched over
  samples (the public code takes element 0 of the batch: batch size 1 only). The gamma layers start
  at weight ~0, bias 1, so the modulation starts as the identity (our initialisation).
- Optional router modulation: ``logits += mean_i Linear(d -> E)(Ins_i)``.
- Instruction tokens: frozen LLM last hidden states of the text -> ``Linear(d_llm -> d)`` -> N_i learned
  queries attend to them (one head, text padding mask; plus one learned always-visible null token so a
  sample without text is well defined) -> LayerNorm.
- Head: flatten -> ``Linear(P*d -> H)``; RevIN around the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmts_fast.models.base import ForecastModel, require_fraction, require_positive
from mmts_fast.nn import RevIN
from mmts_fast.nn.routed import routed_swiglu


@dataclass
class MoMEConfig:
    lookback: int = 96
    horizon: int = 96
    channels: int = 7
    patch_len: int = 8
    d_model: int = 32
    n_experts: int = 4
    top_k: int = 2
    n_layers: int = 1
    n_instr: int = 3
    d_llm: int = 384
    text_encoder: Optional[str] = None       # the encoder that made the training embeddings (a record;
                                             # the CLI fills it): feed embeddings of the same one
    use_text: bool = True
    router_modulation: bool = True
    dropout: float = 0.1
    n_time_features: int = 4          # accepted for TSLib compatibility; not used

    def __post_init__(self):
        require_positive(self, "lookback", "horizon", "channels", "patch_len", "d_model", "n_experts",
                         "top_k", "n_layers", "n_instr", "d_llm", "n_time_features")
        require_fraction(self, "dropout")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} is larger than n_experts={self.n_experts}")


class ModulatedMoE(nn.Module):
    """One MoME expert layer over tokens ``[R, P, d]`` with optional instruction tokens ``[R, N_i, d]``."""

    def __init__(self, d: int, n_experts: int, top_k: int, router_modulation: bool, use_text: bool):
        super().__init__()
        self.k = top_k
        self.router = nn.Linear(d, n_experts, bias=False)
        scale = 1 / math.sqrt(d)
        self.w_gate = nn.Parameter(torch.randn(n_experts, d, d) * scale)
        self.w_up = nn.Parameter(torch.randn(n_experts, d, d) * scale)
        self.w_down = nn.Parameter(torch.randn(n_experts, d, d) * scale)
        self.use_text = use_text
        if use_text:
            self.gamma = nn.Linear(d, n_experts)                          # Linear_e(d -> 1), stacked over e
            self.beta_w = nn.Parameter(torch.randn(n_experts, d, d) * 0.02)   # Linear_e(d -> d), stacked
            self.beta_b = nn.Parameter(torch.zeros(n_experts, d))
            nn.init.normal_(self.gamma.weight, std=0.02)
            nn.init.ones_(self.gamma.bias)
            self.router_mod = nn.Linear(d, n_experts) if router_modulation else None

    def forward(self, x: Tensor, ins: Optional[Tensor] = None) -> Tensor:
        R, P, d = x.shape
        h = x.reshape(R * P, d)
        row = torch.arange(R, device=x.device).repeat_interleave(P)      # sample row of every token
        logits = self.router(h)
        ins_mean = None
        if self.use_text:
            if ins is None:
                raise ValueError("this MoME layer was built with use_text=True: pass instruction tokens")
            ins_mean = ins.mean(1)                                       # mean_i of an affine map = map of mean_i
            if self.router_mod is not None:
                logits = logits + self.router_mod(ins_mean)[row]
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = probs.topk(self.k, dim=-1)                              # no renormalisation
        out = routed_swiglu(h, idx, self.w_gate, self.w_up, self.w_down)  # [R*P, k, d]
        if ins_mean is not None:                                         # EiLM, batched per sample
            gamma = self.gamma(ins_mean)                                 # [R, E]
            beta = torch.einsum("rd,edf->ref", ins_mean, self.beta_w) + self.beta_b   # [R, E, d]
            out = gamma[row[:, None], idx][..., None] * out + beta[row[:, None], idx]
        return (w.to(out.dtype)[..., None] * out).sum(1).view(R, P, d)


class MoME(ForecastModel):
    """MoME. ``forward(x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None, *,
    text_hidden=None, text_mask=None) -> [B, H, C]`` with ``text_hidden`` ``[B, T, d_llm]`` (frozen LLM
    last hidden states of each sample's text) and ``text_mask`` ``[B, T]`` bool or 0/1 ints (True / 1 = real
    token; any T: the ONNX export keeps T dynamic)."""
    model_type: ClassVar[str] = "mome"
    config_class: ClassVar[type] = MoMEConfig
    extra_inputs: ClassVar[tuple] = ("text_hidden", "text_mask")
    export_dynamic_axes: ClassVar[dict] = {"text_hidden": {1: "text_len"}, "text_mask": {1: "text_len"}}

    def __init__(self, config: MoMEConfig):
        super().__init__(config)
        d, p = config.d_model, config.patch_len
        self.n_patches = math.ceil(config.lookback / p)
        self.revin = RevIN(config.channels)
        self.patch_embed = nn.Linear(p, d)
        self.pos = nn.Parameter(torch.randn(self.n_patches, d) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(config.n_layers))
        self.layers = nn.ModuleList(ModulatedMoE(d, config.n_experts, config.top_k, config.router_modulation,
                                                 config.use_text) for _ in range(config.n_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.n_patches * d, config.horizon)
        if config.use_text:
            self.text_proj = nn.Linear(config.d_llm, d)
            self.queries = nn.Parameter(torch.randn(config.n_instr, d) * 0.02)
            self.null_kv = nn.Parameter(torch.zeros(1, d))
            self.ins_norm = nn.LayerNorm(d)

    def instruction_tokens(self, text_hidden: Tensor, text_mask: Optional[Tensor]) -> Tensor:
        """``[B, T, d_llm]`` (+ mask) -> ``[B, N_i, d]``: learned queries attend to the projected text."""
        B, T, _ = text_hidden.shape
        kv = torch.cat([self.null_kv.expand(B, 1, -1), self.text_proj(text_hidden)], dim=1)   # [B, 1+T, d]
        if text_mask is None:
            text_mask = torch.ones(B, T, dtype=torch.bool, device=text_hidden.device)
        elif tuple(text_mask.shape) != (B, T):
            raise ValueError(f"MoME: text_mask must be [B, T]=({B}, {T}) like text_hidden, got {tuple(text_mask.shape)}")
        text_mask = text_mask.bool()       # a Hugging Face attention_mask (int, 1 = token) works as well
        keep = torch.cat([text_mask.new_ones(B, 1), text_mask], dim=1)                        # [B, 1+T]
        scores = torch.einsum("nd,btd->bnt", self.queries, kv) / math.sqrt(kv.shape[-1])   # one head
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))                      # null token: never all -inf
        return self.ins_norm(torch.softmax(scores, dim=-1) @ kv)

    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None, *,
                text_hidden: Optional[Tensor] = None, text_mask: Optional[Tensor] = None):
        cfg = self.config
        self.check_inputs(x_enc, x_mark_enc)
        B, L, C = x_enc.shape
        ins = None
        if cfg.use_text:
            if text_hidden is None or text_hidden.dim() != 3 or text_hidden.shape[0] != B \
                    or text_hidden.shape[2] != cfg.d_llm:
                raise ValueError(f"MoME needs text_hidden [B={B}, T, d_llm={cfg.d_llm}], got "
                                 f"{None if text_hidden is None else tuple(text_hidden.shape)}; "
                                 f"or build it with use_text=False")
            ins = self.instruction_tokens(text_hidden.to(x_enc.dtype), text_mask)
            ins = ins.repeat_interleave(C, dim=0)                         # one row per (sample, channel)
        stats = self.revin.stats(x_enc)
        x = self.revin.norm(x_enc, stats).transpose(1, 2).reshape(B * C, L)
        x = F.pad(x, (0, self.n_patches * cfg.patch_len - L))             # zero-pad the end
        tok = self.patch_embed(x.view(B * C, self.n_patches, cfg.patch_len)) + self.pos
        for norm, layer in zip(self.norms, self.layers):
            tok = tok + self.dropout(layer(norm(tok), ins))
        y = self.head(tok.flatten(1)).view(B, C, cfg.horizon).transpose(1, 2)
        return self.revin.denorm(y, stats)
