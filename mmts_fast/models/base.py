"""What every model shares: a dataclass config, input checks and Hugging Face style
``save_pretrained`` / ``from_pretrained`` (``config.json`` + ``model.safetensors``, written atomically)."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from mmts_fast._files import plain_file_mode

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        plain_file_mode(tmp)   # readable by others as the umask allows, like any saved file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _is_int(v) -> bool:
    try:
        return not isinstance(v, bool) and int(v) == v
    except (TypeError, ValueError):
        return False


def require_positive(config, *names: str) -> None:
    """Config validation shared by every model: each named field must be an integer >= 1."""
    for name in names:
        v = getattr(config, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be an integer >= 1, got {v!r}")


def check_windows(windows, n_experts: int, lookback: int) -> list[int]:
    """Per-expert lookback windows as ints: one per expert, each an integer in [1, lookback]."""
    if not all(_is_int(w) for w in windows):
        raise ValueError(f"expert windows must be integers, got {list(windows)}")
    windows = [int(w) for w in windows]
    if len(windows) != n_experts:
        raise ValueError(f"{len(windows)} windows for {n_experts} experts (one window per expert)")
    if any(w < 1 for w in windows):
        raise ValueError(f"expert windows must be >= 1, got {windows}")
    if any(w > lookback for w in windows):
        raise ValueError(f"expert windows {[w for w in windows if w > lookback]} are longer than the lookback "
                         f"{lookback}")
    return windows


def load_weights(model: nn.Module, directory: Path, map_location="cpu") -> None:
    """``model.safetensors`` into ``model``; weights that do not fit the model its ``config.json`` builds
    (a file from another version or a patched model) are a ValueError naming the folder."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}: not a saved mmts_fast model")
    try:
        model.load_state_dict(load_file(str(path), device=str(map_location)))
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the {type(model).__name__} that {CONFIG_NAME} describes: "
                         f"{' '.join(str(e).split())[:400]}") from e


class ForecastModel(nn.Module):
    """Base class. Subclasses set ``model_type`` and ``config_class`` and implement ``forward``
    with the Time-Series-Library signature ``forward(x_enc, x_mark_enc=None, x_dec=None,
    x_mark_dec=None, mask=None) -> [B, H, C]``."""

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type] = None
    # extra keyword inputs' axes, besides the batch axis, that an ONNX export keeps dynamic: {name: {axis: name}}
    export_dynamic_axes: ClassVar[dict] = {}

    def __init__(self, config):
        super().__init__()
        self.config = config

    # ---- input checks -------------------------------------------------------------------
    def check_inputs(self, x_enc: Tensor, x_mark_enc: Optional[Tensor] = None) -> None:
        """Shapes always; finiteness too unless tracing (compile / export), where it cannot run."""
        cfg = self.config
        if x_enc.dim() != 3:
            raise ValueError(f"{type(self).__name__}: x_enc must be [B, L, C], got shape {tuple(x_enc.shape)}")
        if x_enc.shape[1] != cfg.lookback:
            raise ValueError(f"{type(self).__name__}: x_enc has lookback {x_enc.shape[1]} but the model was "
                             f"built for lookback={cfg.lookback}")
        if x_enc.shape[2] != cfg.channels:
            raise ValueError(f"{type(self).__name__}: x_enc has {x_enc.shape[2]} channels but the model was "
                             f"built for channels={cfg.channels}")
        if x_mark_enc is not None and (x_mark_enc.dim() != 3 or x_mark_enc.shape[:2] != x_enc.shape[:2]):
            raise ValueError(f"{type(self).__name__}: x_mark_enc must be [B, L, F] matching x_enc "
                             f"{tuple(x_enc.shape[:2])}, got {tuple(x_mark_enc.shape)}")
        for name, t in (("x_enc", x_enc), ("x_mark_enc", x_mark_enc)):
            if t is not None and not t.is_floating_point():
                raise ValueError(f"{type(self).__name__}: {name} must be a floating-point tensor, got {t.dtype}")
        if not any(p.dtype == x_enc.dtype for p in self.parameters() if p.is_floating_point()):
            dtypes = sorted({str(p.dtype) for p in self.parameters() if p.is_floating_point()})
            raise ValueError(f"{type(self).__name__}: x_enc is {x_enc.dtype} but the model's weights are "
                             f"{', '.join(dtypes)}; convert one of them (x_enc.to(...) or model.to(...))")
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            for name, t in (("x_enc", x_enc), ("x_mark_enc", x_mark_enc)):
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"{type(self).__name__}: {name} contains NaN or inf")

    # ---- persistence --------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (each atomically)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        cfg = {"model_type": self.model_type, **dataclasses.asdict(self.config)}
        _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
        _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "ForecastModel":
        """Loads a model saved by ``save_pretrained``, in eval mode; on the base class the right
        subclass is picked from ``config.json``'s ``model_type``."""
        from mmts_fast.models import get_model_class

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved mmts_fast model")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        klass = get_model_class(cfg.pop("model_type"))
        if cls is not ForecastModel and not issubclass(klass, cls):
            raise ValueError(f"{directory} holds a {klass.__name__}, not a {cls.__name__}")
        model = klass(klass.config_class(**cfg))
        load_weights(model, directory, map_location)
        return model.eval()   # as in Hugging Face: loaded for inference; call .train() to fine-tune

    # ---- export -------------------------------------------------------------------------
    def export_inputs(self, extra: dict) -> dict:
        """The extra keyword inputs in the batch-first form the ONNX graph takes (``extra_inputs``).
        The identity, except for models that also take a more compact form in training (LeMoLE)."""
        return dict(extra)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
