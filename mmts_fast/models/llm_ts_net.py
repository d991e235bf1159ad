"""LLM-TS Net (arXiv 2408.14387), no public code: *our reading* (SPEC section 1.6).

Series branch (all per sample; RevIN around the model, SPEC 1.1):

- RevIN (affine); each channel cut into patches of length p (end zero-padded; ``patch_len=1`` is a
  per-step embedding) -> ``Linear(p -> d)`` + learned positions: tokens ``z [B, C, P, d]``.
- Dynamic prompt pool: W learnable (key ``[d]``, value ``[prompt_len, d]``) pairs. The series query of
  each (sample, channel) is the mean of its patch tokens; additive (Bahdanau) attention scores it against
  every key, ``s_w = v^T tanh(W_q q + W_k k_w)``, ``p = softmax(s)`` over W; the top-K pairs are picked by
  ``topk`` + gather (both plain ONNX ops). The selected values are weighted so the selection trains:
  ``"straight_through"`` (default) uses weight ``1 + p_k - stopgrad(p_k)`` (exactly the values in the
  forward pass, the gradient of ``p`` in the backward pass); ``"weighted"`` uses ``p_k`` itself.
  ``pool_mode="prepend"``: the K*prompt_len value tokens are prepended to the channel's tokens and dropped
  before the head; ``"add"``: their mean is added to every patch token.
- ``n_layers`` pre-norm blocks: grouped-query attention (:class:`~mmts_fast.nn.GQAttention`, K3,
  ``n_kv_heads < n_heads``) over time within each channel (intra-series), then over the channels at each
  token position (inter-series), then a GELU MLP; each a residual branch.
- Cross-modal fusion (``use_text``): every series token attends to ``H_text`` (GQAttention, queries from
  the series, keys/values from the text), residual add.
- Head: per channel, flatten the patch tokens -> ``Linear(P*d -> H)`` -> RevIN denorm -> ``[B, H, C]``.

Text branch (``use_text=True``): the text aligned to each window (Time-MMD report/search text, or the
window's timestamp description: :func:`mmts_fast.text.tokens.window_texts`) as token-level inputs, then
attention pooling: ``n_text_tokens`` learned queries attend (GQAttention, text padding mask) to the
token states -> LayerNorm -> ``H_text [B, n_text_tokens, d]``. A sample without any real token gets the
pooling of no key (K3 gives zeros: a constant ``H_text``, never NaN). Two ways in:

- ``text_lm`` set (the paper's path): ``text_ids [B, T]`` + ``text_mask [B, T]`` run through the first
  ``text_lm_layers`` decoder layers of a small LM (:func:`mmts_fast.llm.load_backbone`; ``"smollm2"`` or
  a Hugging Face folder) fine-tuned with LoRA-AMR (``apply_lora(..., amr=True)`` on ``lora_targets``):
  every base LM weight is frozen, only the LoRA-AMR ``C`` factors (plus pooling and the rest of the
  model) train. Cost: every training step runs the LM forward AND backward (C in layer i needs the
  gradient through layers > i) for B*T tokens; SmolLM2 (d 576, 9/3 heads, MLP 1536) costs about 7 MFLOP
  per token and layer forward, ~3x that for forward + backward, i.e. ~85 GFLOP per step at B=32, T=64,
  K=2 layers. Measured on one CPU thread (L=96, C=7, H=96, defaults): ~1.1-1.4 s per training step
  against ~0.08 s with precomputed ``text_hidden`` (~15x), plus ~14 s to load SmolLM2 (GGUF) whenever
  the model is built or reloaded; 448 trainable LoRA-AMR C values (2 layers x 7 projections x 8 x 4)
  next to ~190k model parameters, out of 35.6M in all (the frozen embedding table dominates). LoRA-AMR keeps only
  ``D x`` (r/2 values per token) for the adapters' backward, but the frozen layers' own activations
  are still kept. Saved models hold the LoRA-AMR factors (C, D, B) but never the frozen base LM
  weights: :meth:`LLMTSNet.from_pretrained` reloads those from ``config.text_lm`` (which must still
  be there). Its ONNX export includes the LM's K layers and embedding table (inputs ``text_ids``,
  ``text_mask``).
- ``text_lm=None``: precomputed frozen hidden states ``text_hidden [B, T, d_llm]`` + ``text_mask``
  (e.g. :class:`~mmts_fast.text.TextEncoder` token states, cached): only the pooling trains.

``use_text=False`` is the same model without the text branch and without the fusion (ablation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmts_fast.models.base import (ForecastModel, build_config, config_json, load_weights, read_config, require_fraction,
                                   require_positive, tracing, write_checkpoint)
from mmts_fast.nn import GQAttention, RevIN

__all__ = ["LLMTSNetConfig", "LLMTSNet", "PromptPool"]

#: the seven linear projections of a Llama decoder layer (peft-style name suffixes)
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: names of the LoRA-AMR tensors that a saved model keeps from inside the LM
_LM_KEEP = ("lora_C", "lora_D", "lora_B")


@dataclass
class LLMTSNetConfig:
    lookback: int = 96
    horizon: int = 96
    channels: int = 7
    patch_len: int = 16                # 1: per-step embedding
    d_model: int = 64
    n_heads: int = 4                   # Hq
    n_kv_heads: int = 2                # Hkv (< Hq: grouped-query attention)
    n_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    # dynamic prompt pool
    pool_size: int = 8                 # W
    pool_top_k: int = 2                # K
    prompt_len: int = 1                # tokens per value
    pool_mode: str = "prepend"         # "prepend" | "add"
    pool_selection: str = "straight_through"   # "straight_through" | "weighted"
    # text branch
    use_text: bool = True
    d_llm: int = 576                   # width of text_hidden / of the LM (set from the LM when text_lm is given)
    text_encoder: Optional[str] = None       # the encoder that made the training embeddings (a record;
                                             # the CLI fills it): feed embeddings of the same one
    n_text_tokens: int = 4             # pooled H_text tokens
    text_lm: Optional[str] = None      # None: take text_hidden; else "smollm2" / HF folder / .gguf: take text_ids
    text_lm_layers: int = 2            # first K decoder layers of the LM
    lora_rank: int = 8                 # LoRA-AMR r (r' = r // 2)
    lora_alpha: float = 16.0
    lora_targets: tuple = LLAMA_PROJECTIONS
    n_time_features: int = 4           # accepted for TSLib compatibility; not used

    def __post_init__(self):
        require_positive(self, "lookback", "horizon", "channels", "patch_len", "d_model", "n_heads",
                         "n_kv_heads", "n_layers", "d_ff", "pool_size", "pool_top_k", "prompt_len", "d_llm",
                         "n_text_tokens", "text_lm_layers", "lora_rank")
        if self.pool_top_k > self.pool_size:
            raise ValueError(f"pool_top_k={self.pool_top_k} is larger than pool_size={self.pool_size}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.pool_mode not in ("prepend", "add"):
            raise ValueError(f"pool_mode must be 'prepend' or 'add', got {self.pool_mode!r}")
        if self.pool_selection not in ("straight_through", "weighted"):
            raise ValueError(f"pool_selection must be 'straight_through' or 'weighted', got {self.pool_selection!r}")
        if self.text_lm is not None and self.lora_rank < 2:
            raise ValueError(f"LoRA-AMR needs lora_rank >= 2 (r' = r // 2), got {self.lora_rank}")
        require_fraction(self, "dropout")
        self.lora_targets = tuple(self.lora_targets)
        if self.text_lm is not None:
            self.text_lm = str(self.text_lm)


class PromptPool(nn.Module):
    """Dynamic prompt pool: W (key ``[d]``, value ``[prompt_len, d]``) pairs, additive-attention scores
    ``s_w = v^T tanh(W_q q + W_k k_w)``, top-K selection by ``topk`` + gather (exports as ONNX TopK/Gather).

    ``forward(query [N, d]) -> (prompts [N, K*prompt_len, d], idx [N, K], probs [N, W])``; the prompts are
    the selected values times their weight (see the module docstring: straight-through or weighted)."""

    def __init__(self, d: int, pool_size: int, top_k: int, prompt_len: int = 1, selection: str = "straight_through"):
        super().__init__()
        self.k, self.selection = top_k, selection
        self.keys = nn.Parameter(torch.randn(pool_size, d) * 0.02 * math.sqrt(d))   # unit-ish norm keys
        self.values = nn.Parameter(torch.randn(pool_size, prompt_len, d) * 0.02)
        self.w_query = nn.Linear(d, d)
        self.w_key = nn.Linear(d, d, bias=False)
        self.score = nn.Linear(d, 1, bias=False)

    def scores(self, query: Tensor) -> Tensor:
        """Additive-attention scores ``[N, W]``."""
        h = torch.tanh(self.w_query(query)[:, None, :] + self.w_key(self.keys)[None])   # [N, W, d]
        return self.score(h).squeeze(-1)

    def forward(self, query: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        N = query.shape[0]
        probs = torch.softmax(self.scores(query).float(), dim=-1).to(query.dtype)       # [N, W]
        p_sel, idx = probs.topk(self.k, dim=-1)                                          # [N, K]
        if self.selection == "straight_through":
            w = 1.0 + p_sel - p_sel.detach()
        else:
            w = p_sel
        vals = self.values[idx]                                                          # gather: [N, K, Lp, d]
        prompts = (w[..., None, None] * vals).reshape(N, -1, vals.shape[-1])
        return prompts, idx, probs


class SeriesBlock(nn.Module):
    """Pre-norm block over tokens ``[B, C, S, d]``: GQA over time (per channel), GQA over channels (per token
    position), GELU MLP; each a residual branch."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.norm_t, self.attn_t = nn.LayerNorm(d), GQAttention(d, n_heads, n_kv_heads)
        self.norm_v, self.attn_v = nn.LayerNorm(d), GQAttention(d, n_heads, n_kv_heads)
        self.norm_f = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, z: Tensor) -> Tensor:
        B, C, S, d = z.shape
        t = z.reshape(B * C, S, d)
        t = t + self.drop(self.attn_t(self.norm_t(t)))                     # intra-series
        v = t.reshape(B, C, S, d).transpose(1, 2).reshape(B * S, C, d)
        v = v + self.drop(self.attn_v(self.norm_v(v)))                     # inter-series
        z = v.reshape(B, S, C, d).transpose(1, 2)
        return z + self.drop(self.ff(self.norm_f(z)))


class LLMTSNet(ForecastModel):
    """LLM-TS Net. ``forward(x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None, *,
    text_hidden=None, text_ids=None, text_mask=None) -> [B, H, C]``.

    With ``config.text_lm=None``: ``text_hidden [B, T, d_llm]`` (frozen LM token states) and optional
    ``text_mask [B, T]`` bool (True = real token). With ``config.text_lm`` set: ``text_ids [B, T]`` (token
    ids of the LM's tokenizer) and ``text_mask``. With ``use_text=False``: neither. The instance attribute
    :attr:`extra_inputs` names the inputs that this configuration takes (the class attribute lists all).
    """
    model_type: ClassVar[str] = "llm_ts_net"
    config_class: ClassVar[type] = LLMTSNetConfig
    extra_inputs: ClassVar[tuple] = ("text_hidden", "text_ids", "text_mask")
    export_dynamic_axes: ClassVar[dict] = {n: {1: "text_len"} for n in ("text_hidden", "text_ids", "text_mask")}

    def __init__(self, config: LLMTSNetConfig):
        super().__init__(config)
        cfg = config
        d, p = cfg.d_model, cfg.patch_len
        self.n_patches = math.ceil(cfg.lookback / p)
        self.revin = RevIN(cfg.channels)
        self.patch_embed = nn.Linear(p, d)
        self.pos = nn.Parameter(torch.randn(self.n_patches, d) * 0.02)
        self.prompt_pool = PromptPool(d, cfg.pool_size, cfg.pool_top_k, cfg.prompt_len, cfg.pool_selection)
        self.blocks = nn.ModuleList(SeriesBlock(d, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.n_patches * d, cfg.horizon)
        self.text_lm = None
        if cfg.use_text:
            if cfg.text_lm is not None:
                self.text_lm = self._build_lm(cfg)
                self.extra_inputs = ("text_ids", "text_mask")      # instance attribute: what this one takes
            else:
                self.extra_inputs = ("text_hidden", "text_mask")
            self.text_queries = nn.Parameter(torch.randn(cfg.n_text_tokens, d) * 0.02)
            self.text_pool = GQAttention(d, cfg.n_heads, cfg.n_kv_heads, d_context=cfg.d_llm)
            self.text_norm = nn.LayerNorm(d)
            self.fuse_norm = nn.LayerNorm(d)
            self.fuse_attn = GQAttention(d, cfg.n_heads, cfg.n_kv_heads)
        else:
            self.extra_inputs = ()

    # ---- text --------------------------------------------------------------------------
    @staticmethod
    def _build_lm(cfg: LLMTSNetConfig) -> nn.Module:
        """The first ``text_lm_layers`` decoder layers of ``cfg.text_lm`` (frozen) with LoRA-AMR injected;
        sets ``cfg.d_llm`` to the LM's hidden size."""
        from mmts_fast.llm import load_backbone
        from mmts_fast.nn.lora import apply_lora

        lm, info = load_backbone(cfg.text_lm, n_layers=cfg.text_lm_layers)
        cfg.d_llm = int(info["hidden_size"])
        apply_lora(lm, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha, amr=True, freeze=True)
        return lm

    def text_states(self, text_hidden: Optional[Tensor], text_ids: Optional[Tensor],
                    text_mask: Optional[Tensor], batch: int) -> tuple[Tensor, Tensor]:
        """``(token states [B, T, d_llm], mask [B, T] bool)`` from whichever input this configuration takes."""
        cfg = self.config
        if self.text_lm is not None:
            if text_ids is None or text_ids.dim() != 2 or text_ids.shape[0] != batch:
                raise ValueError(f"LLMTSNet (text_lm={cfg.text_lm!r}) needs text_ids [B={batch}, T], got "
                                 f"{None if text_ids is None else tuple(text_ids.shape)}"
                                 + ("; text_hidden is for text_lm=None" if text_hidden is not None else ""))
            if text_ids.is_floating_point() or text_ids.dtype == torch.bool:
                raise ValueError(f"LLMTSNet: text_ids must be integer token ids, got {text_ids.dtype}")
            vocab = self.text_lm.get_input_embeddings().num_embeddings
            if not tracing() and text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= vocab):
                raise ValueError(f"LLMTSNet: text_ids hold ids {int(text_ids.min())}..{int(text_ids.max())}, outside "
                                 f"the vocabulary of text_lm={cfg.text_lm!r} ([0, {vocab})): use its tokenizer")
            T = text_ids.shape[1]
            mask = torch.ones(batch, T, dtype=torch.bool, device=text_ids.device) if text_mask is None \
                else self._check_mask(text_mask, batch, T, "text_ids")
            # the LM itself never sees a row without any token (pooling still uses the true mask)
            lm_mask = mask.clone()
            lm_mask[:, 0] |= ~mask.any(1)
            hidden = self.text_lm(input_ids=text_ids.long(), attention_mask=lm_mask.long()).last_hidden_state
            return hidden, mask
        if text_hidden is None or text_hidden.dim() != 3 or text_hidden.shape[0] != batch \
                or text_hidden.shape[2] != cfg.d_llm:
            raise ValueError(f"LLMTSNet needs text_hidden [B={batch}, T, d_llm={cfg.d_llm}], got "
                             f"{None if text_hidden is None else tuple(text_hidden.shape)}; or build it with "
                             f"use_text=False" + ("; text_ids need config.text_lm" if text_ids is not None else ""))
        T = text_hidden.shape[1]
        mask = torch.ones(batch, T, dtype=torch.bool, device=text_hidden.device) if text_mask is None \
            else self._check_mask(text_mask, batch, T, "text_hidden")
        return text_hidden, mask

    @staticmethod
    def _check_mask(text_mask: Tensor, batch: int, T: int, like: str) -> Tensor:
        """``text_mask`` as bool, after checking it is ``[B, T]`` like the text input it masks."""
        if tuple(text_mask.shape) != (batch, T):
            raise ValueError(f"LLMTSNet: text_mask must be [B, T]=({batch}, {T}) like {like}, "
                             f"got {tuple(text_mask.shape)}")
        return text_mask.bool()

    def pool_text(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Attention pooling ``[B, T, d_llm]`` -> ``H_text [B, n_text_tokens, d]``."""
        B = hidden.shape[0]
        q = self.text_queries.to(hidden.dtype).expand(B, -1, -1)
        return self.text_norm(self.text_pool(q, hidden, key_padding_mask=mask))

    # ---- forward -----------------------------------------------------------------------
    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None, *,
                text_hidden: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None):
        cfg = self.config
        self.check_inputs(x_enc, x_mark_enc)
        B, L, C = x_enc.shape
        h_text = None
        if cfg.use_text:
            hidden, tmask = self.text_states(text_hidden, text_ids, text_mask, B)
            h_text = self.pool_text(hidden.to(x_enc.dtype), tmask)                  # [B, N_t, d]
        stats = self.revin.stats(x_enc)
        x = self.revin.norm(x_enc, stats).transpose(1, 2).reshape(B * C, L)
        x = F.pad(x, (0, self.n_patches * cfg.patch_len - L))                      # zero-pad the end
        tok = self.patch_embed(x.reshape(B * C, self.n_patches, cfg.patch_len)) + self.pos   # [B*C, P, d]
        prompts, _, _ = self.prompt_pool(tok.mean(1))                              # query: pooled series
        if cfg.pool_mode == "prepend":
            tok = torch.cat([prompts, tok], dim=1)                                 # [B*C, K*Lp + P, d]
        else:
            tok = tok + prompts.mean(1, keepdim=True)
        S, d = tok.shape[1], tok.shape[2]
        z = self.dropout(tok).reshape(B, C, S, d)
        for block in self.blocks:
            z = block(z)
        if h_text is not None:                                                     # cross-modal fusion
            s = z.reshape(B, C * S, d)
            s = s + self.dropout(self.fuse_attn(self.fuse_norm(s), h_text))
            z = s.reshape(B, C, S, d)
        z = self.norm(z[:, :, S - self.n_patches:])                                # the patch tokens
        y = self.head(self.dropout(z.reshape(B, C, self.n_patches * d))).transpose(1, 2)   # [B, H, C]
        return self.revin.denorm(y, stats)

    # ---- persistence: never the frozen base LM --------------------------------------------
    def _is_frozen_lm_key(self, key: str) -> bool:
        return key.startswith("text_lm.") and key.rsplit(".", 1)[-1] not in _LM_KEEP

    def save_pretrained(self, directory) -> None:
        """As :meth:`ForecastModel.save_pretrained`, minus the frozen base LM weights (``text_lm.*`` other
        than the LoRA-AMR C, D, B): those come back from ``config.text_lm`` on load."""
        text = config_json(self)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not self._is_frozen_lm_key(k)}
        write_checkpoint(directory, state, text)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``strict`` tolerates missing frozen base LM weights (the LM was loaded from its source) and
        nothing else."""
        if self.text_lm is not None:
            own = super().state_dict()
            missing = [k for k in own if k not in state_dict]
            if strict and any(not self._is_frozen_lm_key(k) for k in missing):
                bad = [k for k in missing if not self._is_frozen_lm_key(k)]
                raise RuntimeError(f"LLMTSNet.load_state_dict: missing keys {bad[:8]}")
            state_dict = {**{k: own[k] for k in missing}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "LLMTSNet":
        """Loads a model saved by :meth:`save_pretrained` (the LM path reloads the frozen LM from
        ``config.text_lm``), in eval mode."""
        directory = Path(directory)
        kind, cfg, path = read_config(directory)
        if kind != cls.model_type:
            raise ValueError(f"{directory} holds a {kind!r} model, not {cls.model_type!r}")
        model = cls(build_config(cls.config_class, cfg, path))
        load_weights(model, directory, map_location)
        return model.eval()
