"""Training and evaluation loop, Time-Series-Library style (MSE loss, early stopping on validation
MSE, learning rate halved every epoch, metrics on scaled data, last test batch kept)."""
from __future__ import annotations

import copy
import json
import math
import numbers
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from mmts_fast.data import ForecastDataset
from mmts_fast.models.base import _atomic_write


@dataclass
class TrainConfig:
    """Defaults are MoLE's published recipe (SPEC 1.1): Adam, lr 0.005 halved every epoch, batch 8,
    up to 40 epochs, early stopping with patience 6 on validation MSE."""
    lr: float = 0.005
    epochs: int = 40
    batch_size: int = 8
    patience: int = 6
    lr_decay: float = 0.5          # lr multiplied by this after every epoch (SPEC 1.1: "halved every epoch")
    lr_schedule: str = "every"     # "every": epoch e trains at lr * decay**(e-1); "tslib": Time-Series-Library's
                                   # "type1" as its loop calls it (the base lr for epochs 1 and 2, then decayed)
    optimizer: str = "adam"        # "adam" | "adamw"
    grad_clip: Optional[float] = None   # max gradient norm (MoME's recipe: 1.0)
    fused_optimizer: bool = False  # PyTorch's fused Adam/AdamW kernel (faster, esp. on CPU; rounding differs
                                   # slightly, so off by default to keep RESULTS.md runs reproducible)
    seed: int = 2021
    device: str = "auto"
    eval_batch_size: int = 256
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience", "eval_batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            setattr(self, name, int(v))
            if name != "seed" and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, numbers.Real)
                                               and math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.lr_decay > 0:
            raise ValueError(f"lr_decay must be > 0, got {self.lr_decay}")
        if self.lr_schedule not in ("every", "tslib"):
            raise ValueError(f"lr_schedule must be 'every' or 'tslib', got {self.lr_schedule!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the device named, checked to exist here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available to this PyTorch "
                             f"(torch.cuda.is_available() is False); use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype to feed ``model``: float32 (the data's) when some of its weights are float32, else its
    weights' dtype (a model moved with ``.double()``, ``.half()`` or ``.to(torch.bfloat16)``)."""
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return torch.float32 if not dtypes or torch.float32 in dtypes else dtypes[0]


def iterate(ds: ForecastDataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
            generator: Optional[torch.Generator] = None, device=None, dtype=None) -> Iterator[tuple]:
    """Batches ``(x, y, x_mark, y_mark, extras)`` as TSLib's DataLoader gives them, gathered in one
    step each and moved to ``device``. ``extras`` is a dict of keyword inputs for the model (text
    embeddings, ...) from ``ds.extras(indices)`` when the dataset has it, else empty. ``dtype``: the
    model's inputs (x, x_mark and floating extras) are cast to it; the targets stay float32."""
    n = len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield gather(ds, order[i:i + batch_size], device, dtype)


def gather(ds: ForecastDataset, idx: torch.Tensor, device=None, dtype=None) -> tuple:
    """The windows ``idx`` of ``ds`` as one batch ``(x, y, x_mark, y_mark, extras)`` on ``device``, the
    model's inputs (x, x_mark and floating extras) cast to ``dtype`` when given (see :func:`iterate`)."""
    x, y, xm, ym = (t.to(device) for t in ds.batch(idx)[:4])   # Time-MMD adds text indices
    extras = getattr(ds, "extras", None)
    kw = {k: v.to(device) for k, v in extras(idx).items()} if extras is not None else {}
    if dtype is not None:
        x, xm = x.to(dtype), xm.to(dtype)
        kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kw.items()}
    return x, y, xm, ym, kw


@torch.no_grad()
def evaluate(model: nn.Module, ds: ForecastDataset, batch_size: int = 256, device=None) -> dict:
    """MSE and MAE over every window of ``ds`` (the last partial batch included), on scaled data."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sq = ab = 0.0
    count = 0
    for x, y, xm, _, kw in iterate(ds, batch_size, device=device, dtype=input_dtype(model)):
        pred = model(x, xm, **kw).float()
        target = y[:, -ds.horizon:]
        if ds.n_out_channels != pred.shape[-1]:    # "MS": all channels in, the target out
            pred = pred[..., -ds.n_out_channels:]
        sq += (pred - target).pow(2).sum().item()
        ab += (pred - target).abs().sum().item()
        count += target.numel()
    model.train(was_training)
    return {"mse": sq / count, "mae": ab / count}


def fit(model: nn.Module, train_ds: ForecastDataset, val_ds: ForecastDataset, test_ds: Optional[ForecastDataset],
        cfg: TrainConfig, out_dir=None, log=print, on_save=None, before_save=None) -> dict:
    """Trains with early stopping on validation MSE. The best model is kept in memory and, when
    ``out_dir`` is given, saved there (``save_pretrained``, files written atomically) each time it
    improves, then ``on_save()`` is called (the CLI writes its data spec beside the checkpoint).
    ``before_save()`` is called once, just before the first file is written to ``out_dir`` (the CLI's
    ``--overwrite`` removes the previous run's files there, so a run that fails earlier leaves them).
    Returns the metrics (also written to ``out_dir/metrics.json``); the model ends with
    the best weights loaded."""
    from tqdm.auto import tqdm

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_class([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                    **({"fused": True} if cfg.fused_optimizer else {}))
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:   # checked before out_dir is made: a run that cannot train leaves nothing behind
        raise ValueError(f"the train split has {len(train_ds)} windows, fewer than one batch of {cfg.batch_size}")
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    pending = [before_save] if before_save is not None else []

    def first_write():
        while pending:
            pending.pop()()

    best = {"val_mse": math.inf, "epoch": 0, "state": None}
    history = []
    bad_epochs = 0
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        lr = cfg.lr * cfg.lr_decay ** (epoch - 1 if cfg.lr_schedule == "every" else max(epoch - 2, 0))
        for group in opt.param_groups:
            group["lr"] = lr
        total, te = 0.0, time.perf_counter()
        bar = tqdm(iterate(train_ds, cfg.batch_size, shuffle=True, drop_last=True, generator=gen, device=device,
                           dtype=input_dtype(model)),
                   total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress, mininterval=0.5)
        for x, y, xm, _, kw in bar:
            y = y[:, -train_ds.horizon:]
            pred = model(x, xm, **kw)
            if train_ds.n_out_channels != pred.shape[-1]:
                pred = pred[..., -train_ds.n_out_channels:]
            loss = nn.functional.mse_loss(pred.float(), y)
            if hasattr(model, "aux_loss"):   # routers' load-balancing loss (Time-LlaMA's D-LoRA)
                loss = loss + getattr(model.config, "aux_weight", 0.0) * model.aux_loss()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}; "
                                         f"try a lower learning rate (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.item()
        val = evaluate(model, val_ds, cfg.eval_batch_size, device)
        if not math.isfinite(val["mse"]):
            raise FloatingPointError(f"validation MSE became {val['mse']} at epoch {epoch} (the model's "
                                     f"evaluation forward gives NaN/inf); try a lower learning rate (now {lr:g})")
        row = {"epoch": epoch, "lr": lr, "train_mse": total / steps_per_epoch, "val_mse": val["mse"],
               "val_mae": val["mae"], "epoch_s": time.perf_counter() - te}
        history.append(row)
        improved = val["mse"] < best["val_mse"]
        if improved:
            best = {"val_mse": val["mse"], "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
            bad_epochs = 0
            if out_dir is not None and hasattr(model, "save_pretrained"):
                first_write()
                model.save_pretrained(out_dir)
                if on_save is not None:
                    on_save()
        else:
            bad_epochs += 1
        log(f"epoch {epoch:3d}  lr {lr:.2e}  train {row['train_mse']:.4f}  val {val['mse']:.4f}"
            f"{'  *' if improved else ''}  ({row['epoch_s']:.1f}s)")
        if bad_epochs >= cfg.patience:
            log(f"early stopping: no validation improvement for {cfg.patience} epochs")
            break
    model.load_state_dict(best["state"])
    metrics = {"best_epoch": best["epoch"], "epochs_run": len(history), "train_time_s": time.perf_counter() - t0,
               "val": evaluate(model, val_ds, cfg.eval_batch_size, device),
               "train_config": asdict(cfg), "history": history}
    if test_ds is not None:
        metrics["test"] = evaluate(model, test_ds, cfg.eval_batch_size, device)
    if out_dir is not None:
        first_write()
        write_json(out_dir / "metrics.json", metrics)
    return metrics


def write_json(path: Path, obj) -> None:
    _atomic_write(Path(path), lambda p: Path(p).write_text(json.dumps(obj, indent=2)))
