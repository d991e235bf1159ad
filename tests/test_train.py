"""The training loop, evaluation and plots (mmts_fast/train.py, mmts_fast/plot.py)."""
import math

import pytest
import torch
from torch import nn

from mmts_fast.data import ForecastDataset, synthetic_table
from mmts_fast.models import RLinearMoLE, RLinearMoLEConfig
from mmts_fast.train import TrainConfig, evaluate, fit


def _splits(features="M", n_rows=700):
    table = synthetic_table(n_rows=n_rows, n_channels=3)
    return [ForecastDataset(table, s, lookback=24, horizon=8, features=features) for s in ("train", "val", "test")]


def _model(C=3):
    torch.manual_seed(0)
    return RLinearMoLE(RLinearMoLEConfig(lookback=24, horizon=8, channels=C, n_experts=2))


@pytest.mark.parametrize("kw,match", [
    ({"grad_clip": -1.0}, "grad_clip must be a positive number"),     # a negative clip ascends the gradient
    ({"grad_clip": math.nan}, "grad_clip must be a positive number"),
    ({"epochs": 2.5}, "epochs must be an integer"),
    ({"patience": 1.5}, "patience must be an integer"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
    ({"seed": 2 ** 33}, r"seed must be in \[0, 2\*\*32\)"),
    ({"lr_schedule": "type1"}, "lr_schedule must be 'every' or 'tslib'"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_fit_and_evaluate_a_float64_model():
    """A model moved with .double() trains and evaluates through the package's loop (batches are cast to
    its dtype; the data are float32), with the same metrics as the float32 model up to rounding."""
    train, val, test = _splits()
    cfg = TrainConfig(epochs=1, batch_size=32, progress=False, device="cpu")
    m32 = fit(_model(), train, val, test, cfg, log=lambda *a: None)
    m64 = fit(_model().double(), train, val, test, cfg, log=lambda *a: None)
    assert m64["test"]["mse"] == pytest.approx(m32["test"]["mse"], rel=1e-4)


class _NaNWhenEvaluating(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _model()

    def forward(self, x, xm, **kw):
        y = self.inner(x, xm)
        return y if self.training else y * math.nan


def test_non_finite_validation_is_a_clear_error():
    train, val, test = _splits()
    cfg = TrainConfig(epochs=2, batch_size=32, progress=False, device="cpu")
    with pytest.raises(FloatingPointError, match="validation MSE became nan at epoch 1"):
        fit(_NaNWhenEvaluating(), train, val, test, cfg, log=lambda *a: None)


def test_plot_restores_training_mode_and_checks_the_channel(tmp_path):
    pytest.importorskip("matplotlib")
    from mmts_fast.plot import plot_forecasts

    _, _, test = _splits("MS")
    model = _model().train()
    assert plot_forecasts(model, test, tmp_path / "ms.png").exists()      # the target (channel -1)
    assert model.training                                                 # as it was
    assert plot_forecasts(model, test, tmp_path / "ms2.png", channel=2).exists()   # the target by index
    with pytest.raises(ValueError, match="has no truth to plot"):          # MS: only the target has a truth
        plot_forecasts(model, test, tmp_path / "x.png", channel=0)
    with pytest.raises(ValueError, match="out of range"):
        plot_forecasts(model, test, tmp_path / "x.png", channel=3)
    assert plot_forecasts(model.double(), test, tmp_path / "f64.png").exists()
    assert evaluate(model, test)["mse"] > 0


@pytest.mark.parametrize("schedule,want", [("every", [0.005, 0.0025, 0.00125]), ("tslib", [0.005, 0.005, 0.0025])])
def test_lr_schedules(schedule, want):
    """'every' halves after each epoch (SPEC 1.1); 'tslib' is TSLib's type1 as its loop calls it
    (adjust_learning_rate(epoch + 1) after each epoch: the base lr for two epochs)."""
    train, val, test = _splits()
    cfg = TrainConfig(epochs=3, patience=10, batch_size=64, progress=False, device="cpu", lr_schedule=schedule)
    history = fit(_model(), train, val, None, cfg, log=lambda *a: None)["history"]
    assert [row["lr"] for row in history] == pytest.approx(want)
