"""MoLE family: shapes, gradients, the single-head special cases, head dropout, persistence, errors."""
import pytest
import torch

from mmts_fast import use_backend
from mmts_fast.models import (DLinearMoLE, DLinearMoLEConfig, ForecastModel, RLinearMoLE, RLinearMoLEConfig,
                              RMLPMoLE, RMLPMoLEConfig, get_model_class)
from mmts_fast.nn import head_dropout

CASES = [(DLinearMoLE, DLinearMoLEConfig, {}), (RLinearMoLE, RLinearMoLEConfig, {"windows": [29, 20, 16]}),
         (RMLPMoLE, RMLPMoLEConfig, {"mlp_hidden": 24})]


def batch(B=4, L=29, C=3, F=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, C, generator=g) * 2 + 1, torch.rand(B, L, F, generator=g) - 0.5


@pytest.mark.parametrize("cls, cfg_cls, extra", CASES)
def test_forward_backward_shapes(cls, cfg_cls, extra):
    torch.manual_seed(0)
    model = cls(cfg_cls(lookback=29, horizon=11, channels=3, n_experts=3, head_dropout=0.3, **extra))
    x, xm = batch()
    y = model(x, xm, None, None)          # TSLib positional signature
    assert y.shape == (4, 11, 3)
    y.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.router.net[0].weight.grad.abs().sum() > 0   # the router learns


@pytest.mark.parametrize("cls, cfg_cls, extra", CASES)
def test_triton_backend_matches_torch(cls, cfg_cls, extra):
    """The models run on K1: the Triton kernels (interpreter on CPU) give the reference's output and grads."""
    torch.manual_seed(1)
    model = cls(cfg_cls(lookback=29, horizon=11, channels=3, n_experts=3, **extra)).eval()
    x, xm = batch()
    outs, grads = [], []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend(backend):
            y = model(x, xm)
        y.sum().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=1e-3)


def test_single_head_is_rlinear():
    """n_experts=1: RevIN -> Linear(L, H) -> RevIN^-1, per channel (RLinear)."""
    torch.manual_seed(2)
    model = RLinearMoLE(RLinearMoLEConfig(lookback=29, horizon=11, channels=3, n_experts=1, dropout=0.0)).eval()
    with torch.no_grad():
        model.revin.weight.uniform_(0.5, 1.5)
        model.revin.bias.uniform_(-0.5, 0.5)
    x, _ = batch()
    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
    xn = (x - mean) / std * model.revin.weight + model.revin.bias
    lin = torch.einsum("hl,blc->bhc", model.heads.weight[0], xn) + model.heads.bias[0][:, None]
    want = (lin - model.revin.bias) / (model.revin.weight + 1e-10) * std + mean
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)   # no time features needed for M=1


def test_single_head_is_dlinear():
    torch.manual_seed(3)
    model = DLinearMoLE(DLinearMoLEConfig(lookback=29, horizon=11, channels=3, n_experts=1)).eval()
    x, _ = batch()
    pad = torch.cat([x[:, :1].repeat(1, 12, 1), x, x[:, -1:].repeat(1, 12, 1)], 1)
    trend = torch.stack([pad[:, i:i + 25].mean(1) for i in range(29)], 1)
    seasonal = x - trend
    W, b = model.heads.weight[0], model.heads.bias[0]
    want = (torch.einsum("hl,blc->bhc", W[:, :29], seasonal) + torch.einsum("hl,blc->bhc", W[:, 29:], trend)
            + b[:, None])
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_fused_and_unfused_revin_paths_agree():
    """Eval runs RevIN inside K1; training with dropout runs it outside. Same function."""
    torch.manual_seed(4)
    model = RLinearMoLE(RLinearMoLEConfig(lookback=29, horizon=11, channels=3, n_experts=3, dropout=0.5))
    with torch.no_grad():
        model.revin.weight.uniform_(0.5, 1.5)
        model.revin.bias.uniform_(-0.5, 0.5)
    x, xm = batch()
    model.train()
    model.dropout.p = 1e-12            # unfused path (training with dropout), dropout practically off
    a = model(x, xm)
    model.eval()                       # fused path
    torch.testing.assert_close(a, model(x, xm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_dropout_never_nan(dtype):
    logits = (torch.randn(64, 3, 4) * 50).to(dtype)
    for p in (0.5, 0.99, 1.0 - 1e-9):
        w = torch.softmax(head_dropout(logits, p, training=True).float(), -1)
        assert torch.isfinite(w).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(64, 3))
    # every expert dropped: a uniform mixture
    all_dropped = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool), torch.finfo(dtype).min)
    torch.testing.assert_close(torch.softmax(all_dropped.float(), -1), torch.full((64, 3, 4), 0.25))
    model = RLinearMoLE(RLinearMoLEConfig(lookback=29, horizon=11, channels=3, n_experts=4,
                                          head_dropout=0.99)).to(dtype).train()
    x, xm = batch()
    assert torch.isfinite(model(x.to(dtype), xm.to(dtype)).float()).all()


@pytest.mark.parametrize("cls, cfg_cls, extra", CASES)
def test_save_and_load(tmp_path, cls, cfg_cls, extra):
    model = cls(cfg_cls(lookback=29, horizon=11, channels=3, n_experts=3, **extra)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = ForecastModel.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded.config == model.config
    x, xm = batch()
    torch.testing.assert_close(loaded(x, xm), model(x, xm))
    assert type(cls.from_pretrained(tmp_path)) is cls


def test_weights_that_do_not_fit_the_config(tmp_path):
    """A model.safetensors from another model (or a patched one) is a ValueError naming the file."""
    from safetensors.torch import save_file
    model = RLinearMoLE(RLinearMoLEConfig(lookback=29, horizon=11, channels=3))
    model.save_pretrained(tmp_path)
    save_file({**model.state_dict(), "extra.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the RLinearMoLE .*extra.weight"):
        ForecastModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ForecastModel.from_pretrained(tmp_path)


def test_saved_files_follow_the_umask(tmp_path):
    """Checkpoints are shareable like any file (mkstemp's 0600 used to make them private)."""
    import os
    old = os.umask(0o022)
    try:
        RLinearMoLE(RLinearMoLEConfig(lookback=29, horizon=11, channels=3)).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == \
        {"config.json": 0o644, "model.safetensors": 0o644}


def test_bad_inputs():
    model = RLinearMoLE(RLinearMoLEConfig(lookback=29, horizon=11, channels=3, n_experts=3))
    x, xm = batch()
    with pytest.raises(ValueError, match="lookback 28"):
        model(x[:, 1:], xm[:, 1:])
    with pytest.raises(ValueError, match="4 channels"):
        model(torch.randn(4, 29, 4), xm)
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x.index_fill(1, torch.tensor([3]), float("nan")), xm)
    with pytest.raises(ValueError, match="pass x_mark_enc"):
        model(x)
    with pytest.raises(ValueError, match="time features"):
        model(x, xm[..., :3])
    with pytest.raises(ValueError, match="longer than the lookback"):
        RLinearMoLEConfig(lookback=29, n_experts=2, windows=[29, 40])
    with pytest.raises(ValueError, match=r"must be >= 1, got \[29, 0\]"):
        RLinearMoLEConfig(lookback=29, n_experts=2, windows=[29, 0])
    with pytest.raises(ValueError, match="must be integers"):
        RLinearMoLEConfig(lookback=29, n_experts=2, windows=[29, 7.5])      # was truncated to 7
    with pytest.raises(ValueError, match="lookback must be an integer >= 1, got 29.5"):
        RLinearMoLEConfig(lookback=29.5)
    # inputs the model cannot take: clear errors, not a raw matmul dtype error or a NaN forecast
    with pytest.raises(ValueError, match="x_enc is torch.float64 but the model's weights are torch.float32"):
        model(x.double(), xm)
    with pytest.raises(ValueError, match="x_enc must be a floating-point tensor"):
        model(x.long(), xm)
    with pytest.raises(ValueError, match="x_mark_enc contains NaN"):
        model(x, xm.index_fill(1, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match="unknown model 'patchtst'; known models: dlinear_mole"):
        get_model_class("patchtst")
    assert get_model_class("RLinear-MoLE") is RLinearMoLE


def test_numpy_and_float_config_values_become_ints(tmp_path):
    """Validated fields are stored as Python ints (numpy ints broke config.json, 5.0 broke tensor shapes)."""
    np = pytest.importorskip("numpy")
    cfg = RLinearMoLEConfig(lookback=np.int64(12), horizon=5.0, channels=np.int32(2), n_experts=2.0,
                            windows=[np.int64(12), 6.0], head_dropout=np.float32(0.25))
    assert [type(v) for v in (cfg.lookback, cfg.horizon, cfg.channels, cfg.n_experts)] == [int] * 4
    assert cfg.windows == [12, 6] and type(cfg.head_dropout) is float
    model = RLinearMoLE(cfg)
    x, xm = batch(B=2, L=12, C=2)
    assert model(x, xm).shape == (2, 5, 2)
    model.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(ForecastModel.from_pretrained(tmp_path / "ck")(x, xm), model.eval()(x, xm))
    with pytest.raises(ValueError, match="horizon must be an integer >= 1, got 5.5"):
        RLinearMoLEConfig(horizon=5.5)


def test_save_writes_nothing_when_the_config_cannot_be_saved(tmp_path):
    """A config JSON cannot hold is refused before any file is written (it left new weights beside an old
    config, or a folder with weights only)."""
    np = pytest.importorskip("numpy")
    old = RLinearMoLE(RLinearMoLEConfig(lookback=12, horizon=3, channels=2))
    old.save_pretrained(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    new = RLinearMoLE(RLinearMoLEConfig(lookback=12, horizon=3, channels=2))
    new.config.revin_affine = np.bool_(True)       # set after validation: not JSON
    with pytest.raises(ValueError, match=r"config field\(s\) \['revin_affine'\] cannot be written"):
        new.save_pretrained(tmp_path / "ck")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    with pytest.raises(ValueError, match="revin_affine"):
        new.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("make, match", [
    (lambda: RLinearMoLEConfig(dropout=1.0), r"RLinearMoLEConfig.dropout must be a number in \[0, 1\), got 1.0"),
    (lambda: RLinearMoLEConfig(dropout=-0.1), "dropout must be a number"),
    (lambda: RMLPMoLEConfig(dropout="0.1"), "dropout must be a number"),
    (lambda: DLinearMoLEConfig(head_dropout=1.5), "head_dropout must be a number"),
    (lambda: DLinearMoLEConfig(moving_avg=24), "moving_avg must be an odd integer"),
    (lambda: DLinearMoLEConfig(moving_avg=0), "moving_avg must be an integer >= 1"),
    (lambda: DLinearMoLEConfig(lookback=12, n_experts=1, windows=[12]), "does not take expert windows"),
    (lambda: RMLPMoLEConfig(mlp_hidden=0), "mlp_hidden must be an integer >= 1"),
])
def test_config_errors_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("model_type"), r"config.json has no 'model_type' key"),
    (lambda c: c.update(bogus=1), r"config.json: unknown key\(s\) \['bogus'\] for RLinearMoLEConfig"),
    (lambda c: c.update(model_type="nope"), "config.json: unknown model 'nope'"),
    (lambda c: c.update(lookback=0), "config.json: RLinearMoLEConfig.lookback must be an integer"),
])
def test_hand_edited_config_json(tmp_path, edit, match):
    import json

    RLinearMoLE(RLinearMoLEConfig(lookback=12, horizon=3, channels=2)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        ForecastModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        RLinearMoLE.from_pretrained(tmp_path)
