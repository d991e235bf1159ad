"""Time-LlaMA (Zhang, Zhu, Gao, arXiv 2502.13725; no public code, our reading). SPEC section 1.5.

- RevIN (instance norm, affine) around the model.
- Variate as token: each channel's whole normalised window ``X_i`` in R^L -> MLP
  ``Linear(L -> d) -> GELU -> Linear(d -> d)`` -> one token; C tokens per sample (d = the LLM's hidden size).
- Alignment: multi-head cross-attention (:class:`~mmts_fast.nn.attention.GQAttention`, K3), queries = the
  variate tokens, keys / values = the token embeddings of a text prompt looked up in the LLM's FROZEN input
  embedding table (the prompt never runs through the LLM); residual add.
- Backbone: the first K decoder layers of a Llama-family LLM
  (:func:`~mmts_fast.llm.backbone.load_backbone`, base weights frozen, NF4 optional) plus its final RMSNorm,
  fed the C variate tokens as ``inputs_embeds`` (RoPE positions 0..C-1 in channel order).
- D-LoRA (:func:`~mmts_fast.nn.lora.apply_dlora`): one LoRA on each of the seven projections Q, K, V, O, Gate,
  Up, Down of every kept layer; a per-layer router on the layer input's last token picks the top-n per sample.
  The Switch-style load-balancing loss of the last forward is :meth:`TimeLlaMA.aux_loss`; a trainer adds
  ``config.aux_weight * model.aux_loss()`` to the forecasting loss.
- Head: ``Linear(d -> H)`` per token -> ``[B, H, C]``, then RevIN denorm.

Our choices where the paper is silent:

* Attention across variates: the decoder is used as is, i.e. **causal** over the C variate tokens
  (``causal=True``, default); with causal attention the last token has seen every variate, which is what the
  D-LoRA routers pool. ``causal=False`` gives bidirectional attention (an explicit all-visible 4-D mask).
  Either way the mask is passed as an explicit additive 4-D mask, so the eager and SDPA attention
  implementations agree and the ONNX graph holds no mask-building logic; the one exception is a backbone
  switched to K3 by :func:`~mmts_fast.nn.apply_fast_attention`, outside export: it gets ``attention_mask=None``
  (no padding), which K3 runs from its causal flag: the attention modules' ``is_causal``, which
  ``causal=False`` sets to False in every decoder layer (a 4-D mask would send every layer to the eager
  fallback).
* Prompt: tokenised once at construction (no special tokens, at most ``max_prompt_tokens``); the ids are
  written into ``config.prompt_token_ids`` so a saved model reloads without a tokenizer. The prompt
  embeddings ``[T, d]`` are a non-persistent fp32 buffer looked up at construction; afterwards the embedding
  table is not needed and is dropped from the backbone unless ``keep_embedding_table=True`` (SmolLM2: 28 M of
  the 35 M parameters at K = 2). They are recomputed from the frozen table on reload, so they are not saved.
* Checkpoints hold only what trains (variate MLP, cross-attention, LoRA A/B, routers, head, RevIN affine).
  ``state_dict()`` leaves the frozen backbone weights out and ``load_state_dict()`` does not expect them
  (state-dict hooks) (they come from ``config.backbone``). ``ForecastModel.from_pretrained(dir)`` therefore
  rebuilds the model (reloading the backbone from its source, 4-bit again if it was) and loads the adapters.
* ONNX: export needs dense base weights. A model built with ``load_in_4bit=True`` is turned dense in place by
  :meth:`TimeLlaMA.export_dense` (de-quantised NF4 weights, so the dense model computes what the NF4 one did).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from mmts_fast.models.base import ForecastModel, require_fraction, require_positive
from mmts_fast.nn import RevIN
from mmts_fast.nn.attention import GQAttention

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = ("The input is a multivariate time series. Each token summarises the whole lookback window of "
                  "one variable. Forecast the next values of every variable from its own history and from the "
                  "other variables.")
DLORA_ALL = ("q", "k", "v", "o", "gate", "up", "down")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TimeLlaMAConfig:
    lookback: int = 96
    horizon: int = 96
    channels: int = 7
    backbone: str = "smollm2"               # "smollm2", a Hugging Face model folder or a .gguf file
    n_llm_layers: int = 2                   # K: decoder layers kept (paper: 8 of Llama-2-7B)
    llm_dtype: str = "float32"              # dense dtype of the backbone: float32 | bfloat16 | float16
    load_in_4bit: bool = False              # backbone projections as bitsandbytes NF4
    d_model: Optional[int] = None           # the LLM's hidden size; filled in (or checked) at construction
    n_heads: int = 8                        # cross-attention query heads
    n_kv_heads: Optional[int] = None        # cross-attention key/value heads (GQA); None = n_heads
    prompt: str = DEFAULT_PROMPT            # text whose token embeddings the variates attend to
    prompt_token_ids: Optional[list] = None  # filled at construction; when given, no tokenizer is loaded
    max_prompt_tokens: int = 256
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: list(DLORA_ALL))
    top_n: int = 2                          # D-LoRA modules active per sample and layer
    lora_dropout: float = 0.0
    renormalize_gates: bool = False
    aux_weight: float = 0.01                # for the trainer: loss + aux_weight * model.aux_loss()
    causal: bool = True                     # causal attention over the variate tokens (decoder as is)
    dropout: float = 0.1                    # on the tokens before the head
    revin_affine: bool = True
    keep_embedding_table: bool = False      # keep the backbone's input embedding table after construction
    n_time_features: int = 4                # accepted for TSLib compatibility; not used

    def __post_init__(self):
        require_positive(self, "lookback", "horizon", "channels", "n_llm_layers", "n_heads",
                         "max_prompt_tokens", "lora_rank", "top_n", "n_time_features")
        for name in ("d_model", "n_kv_heads"):
            if getattr(self, name) is not None:
                require_positive(self, name)
        require_fraction(self, "dropout", "lora_dropout")
        if self.llm_dtype not in _DTYPES:
            raise ValueError(f"llm_dtype must be one of {sorted(_DTYPES)}, got {self.llm_dtype!r}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [self.lora_targets]
        self.lora_targets = [str(t) for t in self.lora_targets]
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one projection")
        from mmts_fast.nn.lora import DLORA_TARGETS

        unknown = [t for t in self.lora_targets if t not in DLORA_TARGETS and t not in DLORA_TARGETS.values()]
        if unknown:
            raise ValueError(f"TimeLlaMAConfig.lora_targets: unknown projection(s) {unknown}; use the short names "
                             f"{list(DLORA_TARGETS)} (or their paths {list(DLORA_TARGETS.values())})")
        paths = [DLORA_TARGETS.get(t, t) for t in self.lora_targets]
        if len(set(paths)) != len(paths):
            raise ValueError(f"TimeLlaMAConfig.lora_targets names a projection twice: {self.lora_targets}")
        if self.top_n > len(self.lora_targets):
            raise ValueError(f"top_n={self.top_n} is larger than the {len(self.lora_targets)} D-LoRA targets")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.d_model is not None:
            check_heads(self, self.d_model)
        if self.prompt_token_ids is not None:
            self.prompt_token_ids = [int(i) for i in self.prompt_token_ids]
            if not self.prompt_token_ids:
                raise ValueError("prompt_token_ids is empty: the cross-attention needs at least one prompt token")
        elif not str(self.prompt).strip():
            raise ValueError("prompt is empty: give a text (or prompt_token_ids)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.llm_dtype]


def check_heads(config: "TimeLlaMAConfig", d: int, source: str = "d_model") -> None:
    """The cross-attention splits the LLM width ``d`` (``source`` says where it comes from) into ``n_heads``
    heads of ``d / n_heads``, at most gqa_attention's limit: a ValueError naming the ``n_heads`` that fit."""
    from mmts_fast.kernels.gqa_attention import MAX_HEAD_DIM

    n, kv = config.n_heads, config.n_kv_heads or 1
    if d % n == 0 and d // n <= MAX_HEAD_DIM:
        return
    fits = [h for h in range(1, d + 1) if d % h == 0 and d // h <= MAX_HEAD_DIM and h % kv == 0][:6]
    why = (f"the width {d} ({source}) is not divisible by n_heads={n}" if d % n else
           f"n_heads={n} makes cross-attention heads {d} / {n} = {d // n} wide ({d}: {source}), more than "
           f"gqa_attention supports ({MAX_HEAD_DIM})")
    kv_note = f" (multiples of n_kv_heads={config.n_kv_heads})" if config.n_kv_heads else ""
    raise ValueError(f"TimeLlaMAConfig: {why}; set n_heads to one of {fits}{kv_note}")


def _config_width(backbone: str) -> Optional[int]:
    """The hidden size of a Hugging Face model folder from its ``config.json`` (no weights read), else None."""
    import json
    from pathlib import Path

    from mmts_fast.text.encoders import BUNDLED

    if str(backbone) in BUNDLED:          # a bundled name, not a folder (SmolLM2 is a GGUF file)
        return None
    try:
        return int(json.loads((Path(backbone) / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tokenize_prompt(backbone: str, text: str, max_tokens: int) -> list[int]:
    """Token ids of ``text`` (no special tokens, the first ``max_tokens``) with the tokenizer of ``backbone``
    (same names as :func:`~mmts_fast.llm.backbone.load_backbone`; GGUF files carry their tokenizer)."""
    from mmts_fast.llm.backbone import _resolve, load_tokenizer

    _resolve(backbone)   # an unknown name or missing file is its own error, not "cannot load a tokenizer"
    try:
        tok = load_tokenizer(backbone)
    except Exception as e:   # noqa: BLE001 - say what to do instead
        raise ValueError(f"cannot load a tokenizer for backbone {backbone!r} ({type(e).__name__}: {e}); "
                         f"pass TimeLlaMAConfig.prompt_token_ids instead") from e
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        logger.warning("Time-LlaMA prompt has %d tokens; keeping the first max_prompt_tokens=%d", len(ids), max_tokens)
        ids = ids[:max_tokens]
    if not ids:
        raise ValueError(f"the prompt {text!r} gives no tokens")
    return [int(i) for i in ids]


def _is_linear4bit(m: nn.Module) -> bool:
    return type(m).__name__ == "Linear4bit"


class TimeLlaMA(ForecastModel):
    """Time-LlaMA. ``forward(x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None) -> [B, H, C]``;
    after a forward, :meth:`aux_loss` is the D-LoRA load-balancing loss of that call (summed over layers)."""
    model_type: ClassVar[str] = "time_llama"
    config_class: ClassVar[type] = TimeLlaMAConfig
    extra_inputs: ClassVar[tuple] = ()

    def __init__(self, config: TimeLlaMAConfig):
        super().__init__(config)
        from mmts_fast.llm.backbone import load_backbone
        from mmts_fast.nn.lora import apply_dlora

        L, H, C = config.lookback, config.horizon, config.channels
        width = _config_width(config.backbone)      # a model folder's width, known before loading it
        if width is not None and config.d_model is None:
            check_heads(config, width, "the backbone's hidden size")
        backbone, info = load_backbone(config.backbone, n_layers=config.n_llm_layers, dtype=config.torch_dtype,
                                       load_in_4bit=config.load_in_4bit)
        d = int(info["hidden_size"])
        if config.d_model is not None and int(config.d_model) != d:
            raise ValueError(f"d_model={config.d_model} but the backbone {config.backbone!r} has hidden size {d}")
        check_heads(config, d, "the backbone's hidden size")
        config.d_model = d
        if config.prompt_token_ids is None:
            config.prompt_token_ids = tokenize_prompt(config.backbone, config.prompt, config.max_prompt_tokens)
        table = backbone.get_input_embeddings()
        ids = torch.tensor(config.prompt_token_ids, dtype=torch.long)
        if int(ids.max()) >= table.num_embeddings or int(ids.min()) < 0:
            raise ValueError(f"prompt token ids must lie in [0, {table.num_embeddings}) for {config.backbone!r}")
        with torch.no_grad():
            prompt = table(ids.to(table.weight.device)).float().cpu()
        self.register_buffer("prompt_embeds", prompt, persistent=False)          # [T, d], frozen
        if not config.keep_embedding_table:
            backbone.embed_tokens = None          # only inputs_embeds are ever fed (frees vocab x d weights)
        self.backbone_info = info

        self.revin = RevIN(C, affine=config.revin_affine)
        self.variate_mlp = nn.Sequential(nn.Linear(L, d), nn.GELU(), nn.Linear(d, d))
        self.cross_attn = GQAttention(d, config.n_heads, config.n_kv_heads, d_context=d)
        self.backbone = backbone
        # Bidirectional attention: the attention modules' own flag says so, which K3 reads when it gets no mask
        # (fast attention, outside export); every other path keeps the explicit all-visible 4-D mask.
        layers = list(getattr(backbone, "layers", None) or [])
        flags = [[m for m in layer.modules() if isinstance(getattr(m, "is_causal", None), bool)] for layer in layers]
        self._attention_flagged = bool(flags) and all(flags)       # every decoder layer's attention has the flag
        if not config.causal:
            for m in (m for f in flags for m in f):
                m.is_causal = False
        self.dlora = apply_dlora(backbone, config.lora_targets, rank=config.lora_rank, top_n=config.top_n,
                                 alpha=config.lora_alpha, renormalize=config.renormalize_gates,
                                 dropout=config.lora_dropout)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(d, H)
        self._adapter_keys = self._find_adapter_keys()
        # checkpoints: only what trains (state_dict leaves the frozen backbone out, load_state_dict does not
        # expect it); hooks rather than overrides, so this also holds when the model is a submodule
        self.register_state_dict_post_hook(_drop_frozen_state)
        self.register_load_state_dict_post_hook(_ignore_missing_frozen)

    # ---- forward ------------------------------------------------------------------------
    def _attention_mask(self, C: int, dtype: torch.dtype, device, exporting: bool = False) -> Optional[Tensor]:
        """Additive ``[1, 1, C, C]`` mask: 0 where visible, the dtype's most negative value elsewhere. None when
        the backbone runs K3 (``apply_fast_attention``) and no export is being traced: the pattern is then causal
        or all-visible without padding, which K3 computes from its causal flag (the attention modules'
        ``is_causal``, set at construction; the same result, where a 4-D mask would make every layer fall back
        to eager attention)."""
        from mmts_fast.nn.fast_attention import ATTN_IMPLEMENTATION

        if (not exporting and getattr(self.backbone.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
                and (self.config.causal or self._attention_flagged)):
            return None
        m = torch.zeros(C, C, dtype=dtype, device=device)
        if self.config.causal:
            m = m.masked_fill(torch.ones(C, C, dtype=torch.bool, device=device).triu(1), torch.finfo(dtype).min)
        return m[None, None]

    def forward(self, x_enc, x_mark_enc=None, x_dec=None, x_mark_dec=None, mask=None):
        self.check_inputs(x_enc, x_mark_enc)
        dtype = self.variate_mlp[0].weight.dtype
        if x_enc.dtype != dtype:   # llm_dtype sets the backbone's dtype only, not that of the layers x_enc meets
            raise ValueError(f"TimeLlaMA: x_enc must be {dtype} (the dtype of the model's time-series input layers, "
                             f"variate_mlp; llm_dtype={self.config.llm_dtype!r} applies to the LLM backbone only), "
                             f"got {x_enc.dtype}; pass x_enc.to({dtype})")
        exporting = torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if exporting and self.is_nf4:
            raise RuntimeError("TimeLlaMA: export needs dense backbone weights; call model.export_dense() first "
                               "(or build with load_in_4bit=False)")
        B, L, C = x_enc.shape
        stats = self.revin.stats(x_enc)
        x = self.revin.norm(x_enc, stats)                                      # [B, L, C]
        tok = self.variate_mlp(x.transpose(1, 2))                              # [B, C, d]: one token per variate
        ctx = self.prompt_embeds.to(tok.dtype)[None].expand(B, -1, -1)        # [B, T, d]
        tok = tok + self.cross_attn(tok, ctx)                                  # align to the prompt, residual
        dtype = self.backbone.norm.weight.dtype
        mask = self._attention_mask(C, dtype, tok.device, exporting)
        out = self.backbone(inputs_embeds=tok.to(dtype), attention_mask=mask,
                            use_cache=False).last_hidden_state                # [B, C, d]
        y = self.head(self.dropout(out.to(tok.dtype)))                         # [B, C, H]
        return self.revin.denorm(y.transpose(1, 2), stats)

    def aux_loss(self) -> Tensor:
        """D-LoRA load-balancing loss of the last forward call: sum over layers of ``n_mod * sum_j f_j P_j``
        (0 before any call). Add ``config.aux_weight * model.aux_loss()`` to the training loss."""
        return self.dlora.aux_loss()

    # ---- introspection ------------------------------------------------------------------
    @property
    def is_nf4(self) -> bool:
        return any(_is_linear4bit(m) for m in self.backbone.modules())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def memory_bytes(self) -> dict[str, Any]:
        """Weight memory, from the tensors held (:func:`~mmts_fast.llm.backbone.weight_stats` of the whole model:
        ``n_params``, ``n_trainable``, ``bytes_dense``, ``bytes_4bit`` (NF4 data + quantisation state),
        ``bytes_total``, ``bytes_if_dense``), plus ``bytes_backbone`` (the frozen LLM part, LoRA and routers
        excluded), ``bytes_trainable`` and ``bytes_checkpoint`` (what ``save_pretrained`` writes, weights only)."""
        from mmts_fast.llm.backbone import weight_stats

        st = weight_stats(self)
        frozen = weight_stats(self.backbone)
        adapters = sum(p.numel() * p.element_size() for p in self.backbone.parameters() if p.requires_grad)
        st["bytes_backbone"] = frozen["bytes_total"] - adapters
        st["bytes_trainable"] = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
        st["bytes_checkpoint"] = sum(v.numel() * v.element_size() for v in self.state_dict().values())
        return st

    # ---- dense export -------------------------------------------------------------------
    @torch.no_grad()
    def export_dense(self) -> "TimeLlaMA":
        """Replace every NF4 ``Linear4bit`` of the backbone by an ``nn.Linear`` with its de-quantised weight
        (in the backbone's dtype), in place; returns self. The outputs stay those of the NF4 model (up to the
        rounding of the dense matmul). Needed for ONNX export; ``config.load_in_4bit`` is left as it is, so
        ``from_pretrained`` still rebuilds the NF4 model."""
        from mmts_fast.ops import dequantize_nf4

        for parent in list(self.backbone.modules()):
            for name, child in list(parent.named_children()):
                if not _is_linear4bit(child):
                    continue
                w = dequantize_nf4(child.weight)
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=w.device, dtype=w.dtype)
                lin.weight.copy_(w)
                if child.bias is not None:
                    lin.bias.copy_(child.bias.to(w.dtype))
                lin.requires_grad_(False)
                setattr(parent, name, lin)
        return self

    # ---- persistence: only what trains --------------------------------------------------
    def _find_adapter_keys(self) -> set[str]:
        """State-dict keys under ``backbone.`` that belong to D-LoRA (LoRA factors, routers): saved; every
        other ``backbone.`` key is a frozen base weight that comes from ``config.backbone``."""
        from mmts_fast.nn.lora import DLoRARouter, LoRAMixtureLinear

        keys = set()
        for name, mod in self.backbone.named_modules():
            prefix = f"backbone.{name}." if name else "backbone."
            if isinstance(mod, LoRAMixtureLinear):       # its own tensors, not those of its frozen .base
                keys.update(prefix + k for k, v in mod._parameters.items() if v is not None)
                keys.update(prefix + k for k, v in mod._buffers.items()
                            if v is not None and k not in mod._non_persistent_buffers_set)
            elif isinstance(mod, DLoRARouter):
                keys.update(prefix + k for k in mod.state_dict())
        return keys

    def _is_frozen_key(self, key: str) -> bool:
        return key.startswith("backbone.") and key not in self._adapter_keys


def _frozen_tail(key: str) -> Optional[str]:
    """The part of a (possibly prefixed) state-dict key from ``backbone.`` on, or None."""
    if key.startswith("backbone."):
        return key
    i = key.find(".backbone.")
    return key[i + 1:] if i >= 0 else None


def _drop_frozen_state(module: TimeLlaMA, state_dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: remove the frozen backbone weights (also when the model is a submodule)."""
    for k in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        if module._is_frozen_key(k[len(prefix):]):
            del state_dict[k]


def _ignore_missing_frozen(module: TimeLlaMA, incompatible_keys) -> None:
    """load_state_dict post-hook: frozen backbone weights are not expected (strict checks the rest)."""
    missing = incompatible_keys.missing_keys
    keep = [k for k in missing if not ((t := _frozen_tail(k)) is not None and module._is_frozen_key(t))]
    missing[:] = keep


def _register() -> None:
    """Make ``ForecastModel.from_pretrained`` find this class once the module is imported (a no-op when the
    registry in ``mmts_fast.models`` lists it already, or is still being built)."""
    import sys

    pkg = sys.modules.get("mmts_fast.models")
    registry = getattr(pkg, "MODELS", None)
    if isinstance(registry, dict):
        registry.setdefault(TimeLlaMA.model_type, TimeLlaMA)


_register()

__all__ = ["DEFAULT_PROMPT", "TimeLlaMA", "TimeLlaMAConfig", "tokenize_prompt"]
