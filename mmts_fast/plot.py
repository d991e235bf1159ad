"""Forecast plots: what a person would rather look at than read."""
from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def plot_forecasts(model, ds, path, n_windows: int = 4, channel: int = -1) -> Path:
    """PNG of ``n_windows`` evenly spaced test windows: lookback, truth and forecast of one channel
    (the target by default), in the data's original units. ``path``: a file (``.png`` is added when it
    has no extension, as matplotlib would) or a folder (``forecast.png`` in it); returns the file written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmts_fast.train import gather, input_dtype

    C = len(ds.columns)
    if not -C <= channel < C:
        raise ValueError(f"channel {channel} is out of range for the {C} columns {list(ds.columns)}")
    if ds.n_out_channels != C and channel % C != C - 1:   # "MS"/"S": the truth holds the target only
        raise ValueError(f"channel {channel} ({ds.columns[channel]!r}) has no truth to plot: the data's "
                         f"targets are only {ds.columns[-1]!r} (features 'MS'/'S'); use channel=-1")
    was_training = model.training
    model.eval()
    idx = torch.linspace(0, len(ds) - 1, n_windows).round().long()
    x, y, xm, _, kw = gather(ds, idx, next(model.parameters()).device, input_dtype(model))
    try:
        pred = model(x, xm, **kw)
    finally:
        model.train(was_training)
    x, y, pred = (ds.inverse_transform(t.float().cpu()) for t in (x, y[:, -ds.horizon:], pred))
    name = ds.columns[channel]
    fig, axes = plt.subplots(n_windows, 1, figsize=(10, 2.4 * n_windows), squeeze=False)
    L, H = ds.lookback, ds.horizon
    for ax, i in zip(axes[:, 0], range(n_windows)):
        ax.plot(range(-L, 0), x[i, :, channel], color="0.5", lw=1, label="lookback")
        ax.plot(range(H), y[i, :, channel if y.shape[-1] == C else -1], color="k", lw=1.2, label="truth")
        ax.plot(range(H), pred[i, :, channel], color="tab:red", lw=1.2, label="forecast")
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_ylabel(name)
        ax.set_title(f"test window {int(idx[i])}", fontsize=9, loc="left")
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=3)
    axes[-1, 0].set_xlabel("steps relative to the forecast origin")
    fig.tight_layout()
    folder = Path(path).is_dir() or str(path).endswith(("/", "\\"))
    path = Path(path) / "forecast.png" if folder else Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
