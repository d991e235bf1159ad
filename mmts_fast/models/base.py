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
    _atomic_write_all([(path, write)])


def _atomic_write_all(files) -> None:
    """``[(path, write)]``: every file is written to a temporary file in its folder first; only when all of
    them are complete are they renamed into place, in order (a failure leaves every target as it was)."""
    tmps = []
    try:
        for path, write in files:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmps.append(tmp)
            write(tmp)
            plain_file_mode(tmp)   # readable by others as the umask allows, like any saved file
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def _is_int(v) -> bool:
    try:
        return not isinstance(v, bool) and int(v) == v
    except (TypeError, ValueError, OverflowError):
        return False


def tracing() -> bool:
    """Compiling, exporting or JIT tracing: data-dependent checks (a value read on the host) cannot run."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def require_positive(config, *names: str) -> None:
    """Config validation shared by every model: each named field must be an integer >= 1; it is stored
    back as a Python ``int`` (a numpy integer or ``5.0`` would break JSON or tensor shapes later)."""
    for name in names:
        v = getattr(config, name)
        if not _is_int(v) or v < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be an integer >= 1, got {v!r}")
        setattr(config, name, int(v))


def require_fraction(config, *names: str) -> None:
    """Config validation of dropout probabilities: each named field must be a number in [0, 1); it is
    stored back as a Python ``float``."""
    for name in names:
        v = getattr(config, name)
        try:
            ok = not isinstance(v, (bool, str)) and 0.0 <= float(v) < 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{type(config).__name__}.{name} must be a number in [0, 1), got {v!r}")
        setattr(config, name, float(v))


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


def config_json(model) -> str:
    """``config.json``'s text for ``model`` (``model_type`` + the config's fields); a field JSON cannot hold
    is a ValueError naming it (raised before anything is written)."""
    cfg = {"model_type": model.model_type, **dataclasses.asdict(model.config)}
    try:
        return json.dumps(cfg, indent=2)
    except (TypeError, ValueError) as e:
        bad = []
        for k, v in cfg.items():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                bad.append(k)
        raise ValueError(f"{type(model).__name__}.save_pretrained: config field(s) {bad} cannot be written to "
                         f"{CONFIG_NAME} ({e}); nothing was written") from e


def write_checkpoint(directory, state: dict, config_text: str) -> None:
    """``model.safetensors`` (``state``) and ``config.json`` into ``directory``: both files are complete on
    disk before either replaces an old one (the config last)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_all([(directory / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"})),
                       (directory / CONFIG_NAME, lambda p: Path(p).write_text(config_text))])


def read_config(directory) -> tuple[str, dict, Path]:
    """``(model_type, the other fields, path)`` of ``directory/config.json``; a file that is not a saved
    model's config (bad JSON, no ``model_type``) is a ValueError naming it."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved mmts_fast model")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    kind = cfg.pop("model_type", None)
    if not isinstance(kind, str):
        raise ValueError(f"{path} has no 'model_type' key (a string such as \"rlinear_mole\"), "
                         f"got {kind!r}: not a saved mmts_fast model's config")
    return kind, cfg, path


def build_config(config_class: type, cfg: dict, path):
    """``config_class(**cfg)`` for ``cfg`` read from ``path``: unknown keys and invalid values are a
    ValueError naming the file."""
    known = [f.name for f in dataclasses.fields(config_class) if f.init]
    unknown = [k for k in cfg if k not in known]
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} for {config_class.__name__} "
                         f"(its keys: {', '.join(known)})")
    try:
        return config_class(**cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


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
        if not tracing():
            for name, t in (("x_enc", x_enc), ("x_mark_enc", x_mark_enc)):
                if t is not None and not torch.isfinite(t).all():
                    raise ValueError(f"{type(self).__name__}: {name} contains NaN or inf")

    # ---- persistence --------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Writes ``config.json`` and ``model.safetensors`` into ``directory`` (both complete before either
        replaces an old file; a config JSON cannot hold is a ValueError before anything is written)."""
        text = config_json(self)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_checkpoint(directory, state, text)

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "ForecastModel":
        """Loads a model saved by ``save_pretrained``, in eval mode; on the base class the right
        subclass is picked from ``config.json``'s ``model_type``."""
        from mmts_fast.models import get_model_class

        directory = Path(directory)
        kind, cfg, path = read_config(directory)
        try:
            klass = get_model_class(kind)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if cls is not ForecastModel and not issubclass(klass, cls):
            raise ValueError(f"{directory} holds a {klass.__name__}, not a {cls.__name__}")
        model = klass(build_config(klass.config_class, cfg, path))
        load_weights(model, directory, map_location)
        return model.eval()   # as in Hugging Face: loaded for inference; call .train() to fine-tune

    # ---- export -------------------------------------------------------------------------
    def export_inputs(self, extra: dict) -> dict:
        """The extra keyword inputs in the batch-first form the ONNX graph takes (``extra_inputs``).
        The identity, except for models that also take a more compact form in training (LeMoLE)."""
        return dict(extra)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
