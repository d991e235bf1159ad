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

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def require_positive(config, *names: str) -> None:
    """Config validation shared by every model: each named field must be an integer >= 1."""
    for name in names:
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be >= 1, got {getattr(config, name)}")


class ForecastModel(nn.Module):
    """Base class. Subclasses set ``model_type`` and ``config_class`` and implement ``forward``
    with the Time-Series-Library signature ``forward(x_enc, x_mark_enc=None, x_dec=None,
    x_mark_dec=None, mask=None) -> [B, H, C]``."""

    model_type: ClassVar[str] = ""
    config_class: ClassVar[type] = None

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
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            if not torch.isfinite(x_enc).all():
                raise ValueError(f"{type(self).__name__}: x_enc contains NaN or inf")

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
        from safetensors.torch import load_file

        from mmts_fast.models import get_model_class

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved mmts_fast model")
        cfg = json.loads((directory / CONFIG_NAME).read_text())
        klass = get_model_class(cfg.pop("model_type"))
        if cls is not ForecastModel and not issubclass(klass, cls):
            raise ValueError(f"{directory} holds a {klass.__name__}, not a {cls.__name__}")
        model = klass(klass.config_class(**cfg))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=str(map_location)))
        return model.eval()   # as in Hugging Face: loaded for inference; call .train() to fine-tune

    # ---- export -------------------------------------------------------------------------
    def export_inputs(self, extra: dict) -> dict:
        """The extra keyword inputs in the batch-first form the ONNX graph takes (``extra_inputs``).
        The identity, except for models that also take a more compact form in training (LeMoLE)."""
        return dict(extra)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
