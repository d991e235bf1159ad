"""LoRA mixtures over frozen linear layers (K2), D-LoRA for Llama-family models, peft-format adapters.

* :class:`LoRAMixtureLinear`: a frozen ``nn.Linear`` or bitsandbytes NF4 ``Linear4bit`` plus M LoRA
  experts of rank r, mixed per token or per sample by gates (SPEC 2, K2), computed by
  :func:`mmts_fast.ops.lora_mixture`; ``amr=True`` is LoRA-AMR (SPEC 1.6, :func:`mmts_fast.ops.lora_amr`).
  One expert with gate 1 is exactly peft's LoRA (same init, same ``scale = alpha / r``).
* :func:`apply_lora`: plain (router-less) injection into any model, by module-name suffix.
* :func:`apply_dlora`: D-LoRA (SPEC 1.5, Time-LlaMA) for Hugging Face Llama-family models: one LoRA
  expert on each of the selected projections of every decoder layer, and a per-layer router (a forward
  pre-hook) that picks the top-n projections per sample. :class:`DLoRAState` gives the load-balancing loss.
* :func:`save_adapters` / :func:`load_adapters`: ``adapter_model.safetensors`` + ``adapter_config.json``
  in peft's format (``peft.PeftModel.from_pretrained`` reads them), plus ``mmts_extra.safetensors`` for
  what peft has no place for (D-LoRA routers, LoRA-AMR's factors).

Adapter naming (peft): expert 0 of a module is the adapter ``"default"``, expert m > 0 the adapter
``"expert{m}"`` (:func:`expert_adapter_names`). In memory (``to_peft_state_dict``) the keys carry the adapter
name (``<module>.lora_A.<adapter>.weight``, as ``PeftModel.state_dict()`` has them); on disk, peft's layout:
adapter ``default`` in ``dir/`` and adapter ``expertM`` in ``dir/expertM/``, keys without the adapter name
(``base_model.model.<module>.lora_A.weight``).
"""
from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmts_fast import ops

__all__ = [
    "LoRAMixtureLinear", "DLoRARouter", "DLoRAState", "apply_lora", "apply_dlora", "save_adapters",
    "load_adapters", "expert_adapter_names", "DLORA_TARGETS",
]

#: D-LoRA target short names -> attribute path inside a Llama decoder layer
DLORA_TARGETS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXTRA_WEIGHTS = "mmts_extra.safetensors"


def expert_adapter_names(n_experts: int) -> list[str]:
    """peft adapter name of each expert: ``["default", "expert1", "expert2", ...]``."""
    return ["default"] + [f"expert{m}" for m in range(1, n_experts)]


def _is_linear4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _unpack_cpu_format(lin: nn.Module) -> None:
    """Keep a ``Linear4bit`` in bitsandbytes' standard NF4 layout (the one K2 reads).

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in inference (eval mode, input without grad) repacks its
    weight once into a CPU-only layout (nibbles reordered per 32 rows, absmax de-nested, transposed, in bf16).
    Undo that in place with :func:`mmts_fast.kernels.lora_mixture.nf4_unpack_cpu_format` (the one helper that
    ``dequantize_nf4`` uses too) and switch the repacking off for this layer. The codes come back exactly; the
    absmax stays what the repacked layer holds: bf16 values (the repack rounded them, which cannot be undone),
    kept as fp32 and not nested again (re-nesting, as bitsandbytes' own inverse does, would add a second
    quantisation error). The layer then computes ``code[nibble] * bf16(absmax)`` exactly, the weights its
    repacked forward used."""
    if hasattr(lin, "support_avx512bf16_for_cpu"):
        lin.support_avx512bf16_for_cpu = False
    w = lin.weight
    qs = getattr(w, "quant_state", None)
    if not getattr(qs, "packing_format_for_cpu", False):
        return
    from mmts_fast.kernels.lora_mixture import nf4_unpack_cpu_format

    flat, absmax, dtype = nf4_unpack_cpu_format(w.data, qs)
    data = flat.reshape(getattr(qs, "original_qshape", (flat.numel(), 1)))
    storage = getattr(qs, "original_storage_type", None)
    if storage is not None and storage != torch.uint8:
        data = data.view(storage)
    # the QuantState object is updated in place: the module may hold it too (Linear4bit.quant_state)
    qs.absmax, qs.dtype, qs.nested, qs.offset, qs.state2 = absmax, dtype, False, None, None
    qs.packing_format_for_cpu = False
    qs.original_nested = False
    w.data = data


def _kaiming_like_peft(t: Tensor) -> Tensor:
    """peft's LoRA A init (``nn.Linear``'s default): kaiming-uniform with a = sqrt(5) on a 2-D [out, in]."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


# ------------------------------------------------------------------------------------------
# LoRAMixtureLinear
# ------------------------------------------------------------------------------------------
class LoRAMixtureLinear(nn.Module):
    """``y = base(x) + scale * sum_m g[row, m] * (x A_m^T) B_m^T`` with the base frozen.

    Args:
        base: ``nn.Linear`` (any float dtype) or a quantised bitsandbytes NF4 ``Linear4bit``; frozen here.
        n_experts: M LoRA experts.
        rank: r; ``alpha``: ``scale = alpha / r`` (peft's default; ``use_rslora``: ``alpha / sqrt(r)``).
        dropout: dropout on the LoRA input only (as peft's ``lora_dropout``); when active (training and
            > 0) the base runs as its own call.
        amr: LoRA-AMR (SPEC 1.6): ``A_m = C_m D`` with ``D [r', d_in]`` (r' = r // 2) and ``B [M, d_out, r]``
            frozen buffers, only ``C [M, r, r']`` trained; backward keeps ``D x`` ([T, r']) instead of x.
            Init (our choice): D and B kaiming-uniform like peft's A (so gradients reach C), C zeros
            (the output starts equal to the base's).

    Parameters: ``lora_A [M, r, d_in]`` (kaiming-uniform per expert, like peft) and ``lora_B [M, d_out, r]``
    (zeros); in AMR mode ``lora_C`` (parameter) and ``lora_D``, ``lora_B`` (buffers). fp32 by default
    (as peft keeps adapters), cast to x's dtype inside the op.

    ``forward(x, gates=None)``: x ``[..., d_in]``; gates ``[T, M]`` per token (T = rows of x), x's leading
    dims + ``[M]``, or ``[B, M]`` per sample (x ``[B, S, d_in]``; broadcast over the sample's tokens).
    Zero gates mark unselected experts (no work is done for them). ``gates=None``: the gates a router
    stored in :attr:`routed_gates` (D-LoRA), else gate 1 for the single expert (M == 1 only).
    """

    def __init__(self, base: nn.Module, n_experts: int = 1, rank: int = 8, alpha: float = 16.0, *,
                 dropout: float = 0.0, amr: bool = False, use_rslora: bool = False,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        is4 = _is_linear4bit(base)
        if not (isinstance(base, nn.Linear) or is4):
            raise TypeError(f"LoRAMixtureLinear wraps nn.Linear or bitsandbytes Linear4bit, got {type(base).__name__}")
        if n_experts < 1 or rank < 1:
            raise ValueError(f"n_experts and rank must be >= 1, got n_experts={n_experts}, rank={rank}")
        if amr and rank < 2:
            raise ValueError(f"LoRA-AMR needs rank >= 2 (r' = r // 2), got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        base.requires_grad_(False)
        if is4:
            _unpack_cpu_format(base)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n_experts, self.rank, self.alpha = n_experts, rank, float(alpha)
        self.use_rslora, self.amr = use_rslora, amr
        self.scale = float(alpha) / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.routed_gates: Optional[Tensor] = None      # set by a router (D-LoRA); read when gates is None
        device = self._base_weight().device
        dtype = dtype or torch.float32
        M, r, d_in, d_out = n_experts, rank, self.in_features, self.out_features
        if amr:
            r2 = r // 2
            self.rank_inner = r2
            self.lora_C = nn.Parameter(torch.zeros(M, r, r2, device=device, dtype=dtype))
            self.register_buffer("lora_D", _kaiming_like_peft(torch.empty(r2, d_in, device=device, dtype=dtype)))
            b = torch.empty(M, d_out, r, device=device, dtype=dtype)
            for m in range(M):
                _kaiming_like_peft(b[m])
            self.register_buffer("lora_B", b)
        else:
            a = torch.empty(M, r, d_in, device=device, dtype=dtype)
            for m in range(M):                       # per expert: fan_in = d_in, as peft's [r, d_in] Linear
                _kaiming_like_peft(a[m])
            self.lora_A = nn.Parameter(a)
            self.lora_B = nn.Parameter(torch.zeros(M, d_out, r, device=device, dtype=dtype))

    # -------------------------------------------------------------------------------- helpers
    def _base_weight(self):
        return self.base.weight

    def _op_weight(self):
        """The base weight as the op takes it: a dense tensor or a quantised Params4bit."""
        w = self.base.weight
        if _is_linear4bit(self.base):
            if getattr(w, "quant_state", None) is None:
                raise RuntimeError("the Linear4bit base is not quantised yet: move it to a device first "
                                   "(bitsandbytes quantises on .to(device))")
            _unpack_cpu_format(self.base)
        return w

    @property
    def is_nf4(self) -> bool:
        return _is_linear4bit(self.base)

    def effective_lora_a(self) -> Tensor:
        """``A [M, r, d_in]`` (AMR: ``C_m D``)."""
        if self.amr:
            return self.lora_C @ self.lora_D
        return self.lora_A

    def delta_weight(self, expert: int = 0) -> Tensor:
        """``scale * B_m A_m`` ``[d_out, d_in]`` (fp32): what merging expert m with gate 1 adds to W."""
        return self.scale * (self.lora_B[expert].float() @ self.effective_lora_a()[expert].float())

    def __getstate__(self):
        """For deepcopy / pickle: the router's last gates (a tensor in that forward's autograd graph) are
        not copied; the next forward sets them again."""
        state = dict(super().__getstate__())
        state["routed_gates"] = None
        return state

    def expand_gates(self, gates: Optional[Tensor], x: Tensor) -> Tensor:
        """Gates as ``[T, M]`` for x ``[..., d_in]`` (see the class docstring)."""
        lead = tuple(x.shape[:-1])
        T, M = math.prod(lead), self.n_experts
        if gates is None:
            gates = self.routed_gates
        if gates is None:
            if M != 1:
                raise ValueError(f"gates are required with {M} experts (gates=None means gate 1 for one expert)")
            return x.new_ones(T, 1, dtype=torch.float32)
        if gates.shape[-1] != M:
            raise ValueError(f"gates must end in M={M}, got shape {tuple(gates.shape)}")
        if gates.dim() == 2 and gates.shape[0] == T:
            return gates
        if tuple(gates.shape[:-1]) == lead:
            return gates.reshape(T, M)
        if gates.dim() == 2 and len(lead) >= 2 and gates.shape[0] == lead[0]:   # per sample -> per token
            return gates[:, None, :].expand(lead[0], T // lead[0], M).reshape(T, M)
        raise ValueError(f"gates of shape {tuple(gates.shape)} do not fit x of shape {tuple(x.shape)}: "
                         f"use [T={T}, M], x's leading dims + [M], or [B={lead[0]}, M] per sample")

    # -------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, gates: Optional[Tensor] = None) -> Tensor:
        if x.dim() == 1:   # unbatched [d_in], as nn.Linear takes it; gates then [M] (or [1, M])
            return self.forward(x[None], gates if gates is None else gates.reshape(1, -1))[0]
        g = self.expand_gates(gates, x)
        split = self.training and isinstance(self.dropout, nn.Dropout)
        weight = None if split else self._op_weight()
        bias = None if split else self.base.bias
        xl = self.dropout(x) if split else x
        if self.amr and not torch.compiler.is_compiling() and not bool(g.ne(0).any()):
            # no token selects this module: the base alone (lora_amr's torch backward cannot take an
            # empty selection); D and B (frozen buffers) only stand in for A and B, with zero gates.
            # (Not while tracing for export: a data-dependent branch; the traced path has no backward.)
            M, r2 = self.n_experts, self.rank_inner
            y = ops.lora_mixture(xl, weight, bias, self.lora_D.expand(M, r2, self.in_features),
                                 self.lora_B[:, :, :r2], g, self.scale)
        elif self.amr:
            y = ops.lora_amr(xl, weight, bias, self.lora_C, self.lora_D, self.lora_B, g, self.scale)
        else:
            y = ops.lora_mixture(xl, weight, bias, self.lora_A, self.lora_B, g, self.scale)
        if split:
            y = y + self.base(x)
        return y

    def extra_repr(self) -> str:
        kind = "nf4" if self.is_nf4 else str(self.base.weight.dtype).removeprefix("torch.")
        return (f"in={self.in_features}, out={self.out_features}, experts={self.n_experts}, r={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, base={kind}" + (", amr" if self.amr else ""))

    # ------------------------------------------------------------------------------ peft format
    def to_peft_state_dict(self, prefix: str = "", adapter_names: Optional[Sequence[str]] = None) -> dict:
        """``{<prefix>.lora_A.<adapter>.weight: [r, d_in], <prefix>.lora_B.<adapter>.weight: [d_out, r]}`` for
        every expert (adapter names: :func:`expert_adapter_names` unless given). AMR: ``A_m = C_m D``."""
        names = list(adapter_names or expert_adapter_names(self.n_experts))
        if len(names) != self.n_experts:
            raise ValueError(f"{len(names)} adapter names for {self.n_experts} experts")
        p = f"{prefix}." if prefix else ""
        A = self.effective_lora_a().detach()
        out = {}
        for m, name in enumerate(names):
            out[f"{p}lora_A.{name}.weight"] = A[m].contiguous()
            out[f"{p}lora_B.{name}.weight"] = self.lora_B[m].detach().contiguous()
        return out

    @torch.no_grad()
    def load_peft_state_dict(self, state_dict: dict, prefix: str = "",
                             adapter_names: Optional[Sequence[str]] = None, experts: Optional[Sequence[int]] = None,
                             strict: bool = True) -> list[int]:
        """Copy peft LoRA weights into the experts. Keys ``<prefix>.lora_A.<adapter>.weight`` (in memory) or,
        for expert 0 / a single adapter, ``<prefix>.lora_A.weight`` (peft's saved layout). ``experts``: which
        experts to fill (default all). Returns the experts loaded; ``strict``: raise when one is missing.
        AMR modules cannot take a general A (it must factor as C D): use :func:`load_adapters` with the
        ``mmts_extra.safetensors`` file that :func:`save_adapters` writes."""
        if self.amr:
            raise ValueError("a LoRA-AMR module cannot load a peft A matrix (A = C D with D frozen); "
                             "its C, D and B travel in mmts_extra.safetensors (save_adapters/load_adapters)")
        names = list(adapter_names or expert_adapter_names(self.n_experts))
        p = f"{prefix}." if prefix else ""
        loaded = []
        for m in (experts if experts is not None else range(self.n_experts)):
            name = names[m]
            cands = [(f"{p}lora_A.{name}.weight", f"{p}lora_B.{name}.weight")]
            if m == 0 or len(names) == 1:
                cands.append((f"{p}lora_A.weight", f"{p}lora_B.weight"))
            hit = next(((ka, kb) for ka, kb in cands if ka in state_dict and kb in state_dict), None)
            if hit is None:
                if strict:
                    raise KeyError(f"no peft LoRA weights for expert {m} (adapter {name!r}) under {prefix!r}: "
                                   f"looked for {[c[0] for c in cands]}")
                continue
            a, b = state_dict[hit[0]], state_dict[hit[1]]
            if tuple(a.shape) != (self.rank, self.in_features) or tuple(b.shape) != (self.out_features, self.rank):
                raise ValueError(f"{prefix}: peft shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                                 f"r={self.rank}, d_in={self.in_features}, d_out={self.out_features}")
            self.lora_A[m].copy_(a)
            self.lora_B[m].copy_(b)
            loaded.append(m)
        return loaded


# ------------------------------------------------------------------------------------------
# Injection
# ------------------------------------------------------------------------------------------
def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, child: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, last, child)


def _is_target_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or _is_linear4bit(m)


def apply_lora(model: nn.Module, targets: Iterable[str], rank: int = 8, alpha: float = 16.0, *,
               n_experts: int = 1, amr: bool = False, dropout: float = 0.0,
               freeze: bool = True) -> dict[str, LoRAMixtureLinear]:
    """Replace every ``nn.Linear`` / ``Linear4bit`` whose qualified name equals a target or ends in
    ``"." + target`` (peft's ``target_modules`` rule) by a :class:`LoRAMixtureLinear`. ``freeze``: all of
    the model's other parameters stop requiring grad. Returns ``{name: module}``."""
    targets = list(targets)
    if freeze:
        model.requires_grad_(False)
    found = {}
    for name, mod in list(model.named_modules()):
        if _is_target_linear(mod) and any(name == t or name.endswith("." + t) for t in targets):
            new = LoRAMixtureLinear(mod, n_experts, rank, alpha, dropout=dropout, amr=amr)
            _set(model, name, new)
            found[name] = new
    if not found:
        raise ValueError(f"no nn.Linear/Linear4bit matches targets {targets}")
    return found


class DLoRARouter(nn.Module):
    """Per-layer D-LoRA router (SPEC 1.5): the layer input's last (non-padding) token, RMS-normalised
    (our choice, so the logits do not scale with the residual stream), ``Linear(d -> n_mod)``, softmax in
    fp32, the top-n modules per sample keep their probability as gate (no renormalisation unless asked)."""

    def __init__(self, hidden: int, n_mod: int, top_n: int, renormalize: bool = False) -> None:
        super().__init__()
        if not 1 <= top_n <= n_mod:
            raise ValueError(f"top_n must be in [1, {n_mod}], got {top_n}")
        self.proj = nn.Linear(hidden, n_mod)
        self.n_mod, self.top_n, self.renormalize = n_mod, top_n, renormalize

    def forward(self, hidden: Tensor, last_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """hidden ``[B, S, d]`` -> (gates ``[B, n_mod]`` zero outside the top-n, probs, aux loss)."""
        B, S = hidden.shape[0], hidden.shape[1]
        idx = last_index if last_index is not None else torch.full((B,), S - 1, device=hidden.device)
        pooled = hidden[torch.arange(B, device=hidden.device), idx].float()
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6)
        w = self.proj.weight.float()
        b = self.proj.bias.float() if self.proj.bias is not None else None
        probs = torch.softmax(F.linear(pooled, w, b), dim=-1)
        top = probs.topk(self.top_n, dim=-1).indices
        mask = torch.zeros_like(probs).scatter_(1, top, 1.0)
        gates = probs * mask
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        # Switch-style balance (SPEC 1.5): n_mod * sum_j f_j P_j; f_j = fraction of samples routing to j
        # (top-n: sum_j f_j = n, so a perfectly balanced router gives top_n), P_j = mean probability.
        aux = self.n_mod * (mask.mean(0) * probs.mean(0)).sum()
        return gates, probs, aux


class DLoRAState:
    """What :func:`apply_dlora` installed: ``modules[layer][target]`` (LoRAMixtureLinear), ``routers[layer]``
    (also registered as ``<decoder layer>.dlora_router``, so they are model parameters), the hooks.

    After a forward: :meth:`aux_loss` (sum over layers of the per-layer balance loss) and :attr:`last_gates`
    (``[B, n_mod]`` per layer). Routing is recomputed at every forward call from that call's layer input
    (with a KV cache, decoding steps route on the newest token)."""

    def __init__(self, targets: list[str], top_n: int) -> None:
        self.targets, self.top_n = targets, top_n
        self.modules: list[dict[str, LoRAMixtureLinear]] = []
        self.routers: list[DLoRARouter] = []
        self.layers: list[nn.Module] = []
        self.last_gates: list[Optional[Tensor]] = []
        self.last_probs: list[Optional[Tensor]] = []
        self._aux: list[Optional[Tensor]] = []
        self._mask: Optional[Tensor] = None          # the model call's 2-D attention mask, if any
        self._handles: list = []
        self._restore: list[tuple[nn.Module, str, nn.Module]] = []

    @property
    def n_mod(self) -> int:
        return len(self.targets)

    def aux_loss(self) -> Tensor:
        """Sum over layers of ``n_mod * sum_j f_j P_j`` from the last forward (0 before any)."""
        losses = [a for a in self._aux if a is not None]
        if not losses:
            dev = self.routers[0].proj.weight.device if self.routers else None
            return torch.zeros((), device=dev)
        return torch.stack(losses).sum()

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for r in self.routers for p in r.parameters()]
        for mods in self.modules:
            for m in mods.values():
                params += [p for p in m.parameters() if p.requires_grad]
        return params

    def remove(self) -> None:
        """Remove the hooks, the routers and the LoRA modules (the original projections come back)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for parent, attr, original in self._restore:
            if attr == "dlora_router":
                delattr(parent, attr)
            else:
                _set(parent, attr, original)
        self._restore.clear()

    # hooks ---------------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor):
            mask = args[1]
        self._mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _last_index(self, hidden: Tensor) -> Optional[Tensor]:
        mask = self._mask
        if mask is None or mask.shape[0] != hidden.shape[0] or mask.shape[1] < hidden.shape[1]:
            return None
        S = hidden.shape[1]
        cur = mask[:, -S:].to(torch.long)                       # with a KV cache: the new positions only
        last = S - 1 - cur.flip(1).argmax(1)
        return torch.where(cur.any(1), last, torch.full_like(last, S - 1))

    def _layer_hook(self, i: int):
        # A partial of a bound method, not a closure: copy.deepcopy and pickle (torch.save of the whole
        # model) then copy this state with the model, so a copy's hooks route the copy's modules.
        return functools.partial(self._route_layer, i)

    def _route_layer(self, i: int, layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        gates, probs, aux = self.routers[i](hidden, self._last_index(hidden))
        for j, t in enumerate(self.targets):
            self.modules[i][t].routed_gates = gates[:, j:j + 1]      # [B, 1] per sample
        self.last_gates[i], self.last_probs[i], self._aux[i] = gates, probs, aux

    def __getstate__(self):
        """For deepcopy / pickle: the last forward's gates, losses and mask (tensors in that call's autograd
        graph, which deepcopy refuses) are not copied; a copy starts as before any forward."""
        state = dict(self.__dict__)
        n = len(self.layers)
        state.update(last_gates=[None] * n, last_probs=[None] * n, _aux=[None] * n, _mask=None)
        return state


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(base model that takes attention_mask, its decoder layers) of a Llama-family model."""
    from mmts_fast.text.encoders import _layer_list

    base = getattr(model, "base_model", model)
    found = _layer_list(base) or _layer_list(model)
    if found is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    parent, attr = found
    return base, getattr(parent, attr)


def apply_dlora(model: nn.Module, targets: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down"),
                rank: int = 8, top_n: int = 2, alpha: float = 16.0, amr: bool = False, *,
                renormalize: bool = False, dropout: float = 0.0) -> DLoRAState:
    """Inject D-LoRA (SPEC 1.5) into a Hugging Face Llama-family model (``LlamaForCausalLM``, ``LlamaModel``,
    a trimmed SmolLM2; NF4 ``Linear4bit`` projections too), in place.

    Every decoder layer: each target projection (short names of :data:`DLORA_TARGETS`, or the attribute
    paths themselves) becomes a :class:`LoRAMixtureLinear` with ONE expert (rank, alpha, ``amr``); a
    :class:`DLoRARouter` (``layer.dlora_router``) runs as a forward pre-hook on the layer, reads the layer
    input's last non-padding token (from the model call's 2-D ``attention_mask`` when given) and stores
    each module's per-sample gate (its probability if in the sample's top-n, else 0) where the module
    reads it. All base weights are frozen; LoRA A/B (AMR: C) and the routers train.
    """
    tmap = {t: DLORA_TARGETS.get(t, t) for t in targets}
    if len(set(tmap.values())) != len(tmap):
        raise ValueError(f"duplicate targets: {list(targets)}")
    base, layers = _decoder_layers(model)
    model.requires_grad_(False)
    state = DLoRAState(list(tmap), top_n)
    for i, layer in enumerate(layers):
        mods = {}
        for t, path in tmap.items():
            lin = _get(layer, path)
            if not _is_target_linear(lin):
                raise TypeError(f"layer {i}: {path} is a {type(lin).__name__}, not nn.Linear/Linear4bit")
            new = LoRAMixtureLinear(lin, 1, rank, alpha, amr=amr, dropout=dropout)
            _set(layer, path, new)
            state._restore.append((layer, path, lin))
            mods[t] = new
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{type(model).__name__} has no config.hidden_size (the router's input size)")
        dev = next(iter(mods.values()))._base_weight().device
        router = DLoRARouter(hidden, len(tmap), top_n, renormalize).to(dev)
        layer.dlora_router = router
        state._restore.append((layer, "dlora_router", router))
        state.modules.append(mods)
        state.routers.append(router)
        state.layers.append(layer)
        state.last_gates.append(None)
        state.last_probs.append(None)
        state._aux.append(None)
        state._handles.append(layer.register_forward_pre_hook(state._layer_hook(i), with_kwargs=True))
    state._handles.append(base.register_forward_pre_hook(state._model_pre_hook, with_kwargs=True))
    return state


# ------------------------------------------------------------------------------------------
# peft-format save / load
# ------------------------------------------------------------------------------------------
def _lora_modules(model: nn.Module) -> dict[str, LoRAMixtureLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAMixtureLinear)}


def _peft_config(mods: dict[str, LoRAMixtureLinear], model: nn.Module, dropout: float):
    from peft import LoraConfig

    ranks = {n: m.rank for n, m in mods.items()}
    alphas = {n: m.alpha for n, m in mods.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    rslora = {m.use_rslora for m in mods.values()}
    if len(rslora) > 1:
        raise ValueError("save_adapters: modules mix use_rslora True and False (peft has one flag)")
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return LoraConfig(
        r=r0, lora_alpha=a0, target_modules=sorted(mods), lora_dropout=dropout, bias="none",
        use_rslora=rslora.pop(), base_model_name_or_path=name,
        # pattern keys are regexes to peft (and load_adapters): the module names, escaped
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != a0})


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's LoRA adapters in peft's format: expert 0 of every :class:`LoRAMixtureLinear` as
    adapter ``default`` (``dir/adapter_model.safetensors`` + ``dir/adapter_config.json``), expert m > 0 as
    adapter ``expertM`` in ``dir/expertM/``; AMR modules as their ``A = C D``. Keys are peft's
    ``base_model.model.<module path>.lora_{A,B}.weight`` with module paths relative to ``model`` (load with
    ``peft.PeftModel.from_pretrained(<same architecture>, dir)``). Also ``dir/mmts_extra.safetensors`` with
    the D-LoRA routers and the AMR factors (C, D, B), which peft does not know (peft applies the adapters
    ungated). Returns the folder."""
    from safetensors.torch import save_file

    mods = _lora_modules(model)
    if not mods:
        raise ValueError("save_adapters: the model has no LoRAMixtureLinear modules")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    dropouts = {m.dropout.p for m in mods.values() if isinstance(m.dropout, nn.Dropout)}
    config = _peft_config(mods, model, max(dropouts) if dropouts else 0.0)
    M = max(m.n_experts for m in mods.values())
    names = expert_adapter_names(M)
    for e, adapter in enumerate(names):
        sd = {}
        for n, mod in mods.items():
            if e < mod.n_experts:
                for k, v in mod.to_peft_state_dict(PEFT_PREFIX + n, names[:mod.n_experts]).items():
                    if f".{adapter}.weight" in k:
                        sd[k.replace(f".{adapter}.weight", ".weight")] = v.float().contiguous()
        folder = out if e == 0 else out / adapter
        folder.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        cfg = config
        if e > 0:       # only the modules that have this expert
            have = sorted(n for n, m in mods.items() if e < m.n_experts)
            cfg = _peft_config({n: mods[n] for n in have}, model, config.lora_dropout)
        cfg.save_pretrained(str(folder))
    extra = {}
    for n, m in model.named_modules():
        if isinstance(m, DLoRARouter):
            extra.update({f"{n}.{k}": v.detach().contiguous() for k, v in m.state_dict().items()})
        if isinstance(m, LoRAMixtureLinear) and m.amr:
            extra.update({f"{n}.{k}": getattr(m, k).detach().contiguous() for k in ("lora_C", "lora_D", "lora_B")})
    if extra:
        save_file(extra, str(out / EXTRA_WEIGHTS), metadata={"format": "pt"})
    elif (out / EXTRA_WEIGHTS).exists():
        (out / EXTRA_WEIGHTS).unlink()
    return out


def _strip(sd: dict) -> dict:
    return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in sd.items()}


def _pattern_key(keys: Sequence[str], name: str) -> str:
    """peft's ``rank_pattern`` / ``alpha_pattern`` rule (``peft.utils.other.get_pattern_key``): the keys are
    regular expressions matched against the end of the module name at a ``.`` boundary,
    ``re.match(rf"(.*\\.)?({key})$", name)``; the first key that matches wins, and without a match the name
    itself is looked up."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _pattern(pattern: dict, name: str, default):
    """The value ``pattern`` (peft's ``rank_pattern`` / ``alpha_pattern``) gives module ``name``, else default."""
    if not pattern:
        return default
    try:     # the installed peft's own rule when it has one, else the same rule, copied
        from peft.utils.other import get_pattern_key
    except ImportError:  # pragma: no cover - older peft
        get_pattern_key = _pattern_key
    return pattern.get(get_pattern_key(list(pattern), name), default)


@torch.no_grad()
def load_adapters(model: nn.Module, directory: str | Path, strict: bool = True) -> dict:
    """Load adapters saved by :func:`save_adapters` or by peft (``PeftModel.save_pretrained``: keys
    ``base_model.model.<path>.lora_{A,B}.weight``) into the model's :class:`LoRAMixtureLinear` modules: adapter
    ``default`` -> expert 0, ``dir/expertM`` -> expert M. Each module's ``scale`` is set from the config
    (``lora_alpha / r``, ``rank_pattern``/``alpha_pattern``, ``use_rslora``). Then ``mmts_extra.safetensors``
    (routers, AMR factors) if present. ``strict``: every plain module must find its expert-0 weights and no
    adapter weight may be left unused. Returns ``{"loaded": [...], "unused": [...]}``."""
    from safetensors.torch import load_file

    folder = Path(directory)
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("load_adapters: the model has no LoRAMixtureLinear modules")
    loaded, unused = [], []
    M = max(m.n_experts for m in mods.values())
    for e, adapter in enumerate(expert_adapter_names(M)):
        sub = folder if e == 0 else folder / adapter
        if not (sub / ADAPTER_WEIGHTS).is_file():
            if e == 0 and any(not m.amr for m in mods.values()) and strict:
                raise FileNotFoundError(f"{sub / ADAPTER_WEIGHTS} not found")
            continue
        cfg = json.loads((sub / ADAPTER_CONFIG).read_text()) if (sub / ADAPTER_CONFIG).is_file() else {}
        if cfg.get("use_dora") or cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
            raise ValueError(f"{sub}: DoRA / LoRA biases are not supported")
        sd = {}      # saved layout (no adapter name) -> in-memory layout with this folder's adapter name
        for k, v in _strip(load_file(str(sub / ADAPTER_WEIGHTS))).items():
            k = re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{adapter}.weight", k)
            sd[k] = v
        used = set()
        for n, mod in mods.items():
            if mod.amr:      # its peft entry is the materialised C D; C, D, B come from mmts_extra
                used.update({f"{n}.lora_A.{adapter}.weight", f"{n}.lora_B.{adapter}.weight"})
                continue
            if e >= mod.n_experts:
                continue
            got = mod.load_peft_state_dict(sd, n, experts=[e], strict=False)
            if got:
                used.update({f"{n}.lora_A.{adapter}.weight", f"{n}.lora_B.{adapter}.weight"})
                loaded.append((n, e))
                if cfg and e == 0:
                    r = _pattern(cfg.get("rank_pattern"), n, cfg.get("r", mod.rank))
                    alpha = _pattern(cfg.get("alpha_pattern"), n, cfg.get("lora_alpha", mod.alpha))
                    if r != mod.rank:
                        raise ValueError(f"{n}: config rank {r} != module rank {mod.rank}")
                    mod.alpha = float(alpha)
                    mod.use_rslora = bool(cfg.get("use_rslora", False))
                    mod.scale = mod.alpha / (math.sqrt(r) if mod.use_rslora else r)
            elif e == 0 and strict:
                raise KeyError(f"{sub / ADAPTER_WEIGHTS}: no LoRA weights for module {n}")
        unused += [f"{adapter}:{k}" for k in sd if k not in used]
    if (folder / EXTRA_WEIGHTS).is_file():
        extra = load_file(str(folder / EXTRA_WEIGHTS))
        own = {}
        for n, m in model.named_modules():
            if isinstance(m, DLoRARouter):
                own.update({f"{n}.{k}": v for k, v in m.state_dict().items()})
            if isinstance(m, LoRAMixtureLinear) and m.amr:
                own.update({f"{n}.{k}": getattr(m, k) for k in ("lora_C", "lora_D", "lora_B")})
        for k, v in extra.items():
            if k in own:
                own[k].copy_(v)
                loaded.append(k)
            else:
                unused.append(k)
        missing = [k for k in own if k not in extra]
        if missing and strict:
            raise KeyError(f"{folder / EXTRA_WEIGHTS}: missing {missing[:5]}")
    elif strict and any(m.amr for m in mods.values()):
        raise FileNotFoundError(f"{folder / EXTRA_WEIGHTS} not found (the model has LoRA-AMR modules)")
    if unused and strict:
        raise KeyError(f"adapter weights that match no module: {unused[:5]}")
    return {"loaded": loaded, "unused": unused}
