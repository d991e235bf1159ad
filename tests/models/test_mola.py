"""MoLA (our reading of arXiv 2505.17872): stage-2 model around a frozen one-step backbone."""
import pytest
import torch

from mmts_fast.cli import main
from mmts_fast.models import (DLinearMoLE, DLinearMoLEConfig, ForecastModel, MoLA, MoLAConfig, RLinearMoLE,
                              RLinearMoLEConfig)

L, H, C = 40, 12, 3


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, L, C, generator=g) * 2 + 1, torch.rand(4, L, 4, generator=g) - 0.5


@pytest.mark.parametrize("cls, cfg", [(RLinearMoLE, RLinearMoLEConfig), (DLinearMoLE, DLinearMoLEConfig)])
def test_mola_starts_at_the_one_step_head_and_trains_only_adapters(cls, cfg):
    torch.manual_seed(0)
    bb = cls(cfg(lookback=L, horizon=1, channels=C, n_experts=2)).eval()
    m = MoLA.from_backbone(bb, horizon=H, segments=3, n_lora=4, rank=4)
    x, xm = data()
    m.eval()
    torch.testing.assert_close(m(x, xm), bb(x, xm).expand(4, H, C))      # B = 0: W_s = W_0
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == ["alpha_logits", "lora_a", "lora_b"]
    m.train()
    m(x, xm).square().mean().backward()
    assert m.lora_b.grad.abs().sum() > 0 and all(p.grad is None for p in m.backbone.parameters())


def test_mola_segments_literal():
    """Segment s of the forecast uses W_0 + scale * sum_p alpha[s, p] B_p[seg s] A_p (SPEC 1.3)."""
    torch.manual_seed(1)
    bb = RLinearMoLE(RLinearMoLEConfig(lookback=L, horizon=1, channels=C, n_experts=1, dropout=0.0)).eval()
    m = MoLA.from_backbone(bb, horizon=H, segments=3, n_lora=2, rank=4).eval()
    with torch.no_grad():
        m.lora_b.normal_()
        m.alpha_logits.normal_()
    x, _ = data()
    xin, stats = bb.head_input(x)
    alpha = torch.softmax(m.alpha_logits, -1)
    W0, b0 = bb.heads.weight[0, 0], bb.heads.bias[0, 0]
    outs = []
    for s, steps in enumerate(torch.arange(H).tensor_split(3)):
        W = W0.expand(len(steps), L) + m.config.alpha / m.config.rank * sum(alpha[s, p] * m.lora_b[p, steps] @ m.lora_a[p] for p in range(2))
        outs.append(torch.einsum("hl,blc->bhc", W, xin) + b0)
    want = bb.head_output(torch.cat(outs, 1), stats)
    torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)


def test_mola_config_errors_and_persistence(tmp_path):
    with pytest.raises(ValueError, match="one-step"):
        MoLAConfig(backbone={"model_type": "rlinear_mole", "lookback": L, "horizon": 5, "channels": C})
    with pytest.raises(ValueError, match="MoLE family .* got None; build MoLA with MoLA.from_backbone"):
        MoLAConfig()                 # was a bare KeyError: 'model_type' when the model was built
    from mmts_fast.models import LeMoLE, LeMoLEConfig
    with pytest.raises(ValueError, match="got 'lemole'"):   # was an AttributeError at the first forward
        MoLA.from_backbone(LeMoLE(LeMoLEConfig(lookback=L, horizon=1, channels=C, d_llm=8)), horizon=H)
    bb = RLinearMoLE(RLinearMoLEConfig(lookback=L, horizon=1, channels=C, n_experts=2))
    m = MoLA.from_backbone(bb, horizon=H)
    m.save_pretrained(tmp_path)
    x, xm = data()
    torch.testing.assert_close(ForecastModel.from_pretrained(tmp_path)(x, xm), m.eval()(x, xm))


def test_mola_partial_backbone_dict_gets_its_defaults():
    """A backbone dict with only some fields is completed from its config class (the forward raised
    KeyError: 'lookback' from MoLAConfig.lookback); invalid fields are a ValueError at construction."""
    m = MoLA(MoLAConfig(backbone={"model_type": "rlinear_mole", "horizon": 1, "channels": C}, horizon=4))
    d = RLinearMoLEConfig()
    assert m.config.lookback == d.lookback and m.config.channels == C and m.config.n_time_features == 4
    assert m.config.backbone["dropout"] == d.dropout and m.config.backbone["model_type"] == "rlinear_mole"
    g = torch.Generator().manual_seed(0)
    assert m(torch.randn(2, d.lookback, C, generator=g), torch.rand(2, d.lookback, 4, generator=g)).shape == (2, 4, C)
    assert MoLAConfig(backbone={"model_type": "dlinear_mole"}, horizon=4).backbone["horizon"] == 1
    with pytest.raises(ValueError, match=r"MoLAConfig.backbone: unknown key\(s\) \['bogus'\]"):
        MoLAConfig(backbone={"model_type": "rlinear_mole", "horizon": 1, "bogus": 3}, horizon=4)
    with pytest.raises(ValueError, match="MoLAConfig.backbone: RLinearMoLEConfig.lookback must be an integer"):
        MoLAConfig(backbone={"model_type": "rlinear_mole", "horizon": 1, "lookback": 0}, horizon=4)


def test_mola_settings_must_be_integers():
    bb = RLinearMoLE(RLinearMoLEConfig(lookback=L, horizon=1, channels=C, n_experts=2))
    with pytest.raises(ValueError, match="MoLAConfig.rank must be an integer >= 1, got '2'"):
        MoLA.from_backbone(bb, horizon=5, rank="2")      # was TypeError: '<' between str and int
    with pytest.raises(ValueError, match="MoLAConfig.horizon must be an integer >= 1, got 5.5"):
        MoLA.from_backbone(bb, horizon=5.5)
    with pytest.raises(ValueError, match="MoLAConfig.alpha must be a finite number"):
        MoLA.from_backbone(bb, horizon=5, alpha="16")
    cfg = MoLA.from_backbone(bb, horizon=6.0, segments=3.0).config
    assert type(cfg.horizon) is int and type(cfg.segments) is int


def test_mola_cli(tmp_path):
    out = tmp_path / "mola"
    main(["train", "--model", "mola", "--backbone", "dlinear", "--lookback", "48", "--horizon", "12",
          "--epochs", "1", "--batch-size", "32", "--quiet", "--out", str(out)])
    assert (out / "stage1" / "model.safetensors").exists() and (out / "metrics.json").exists()
    main(["export", str(out)])
    with pytest.raises(SystemExit, match="unknown MoLA backbone"):
        main(["train", "--model", "mola", "--backbone", "patchtst", "--out", str(tmp_path / "x"), "--quiet"])


def test_mola_exports_with_dynamo(tmp_path, caplog):
    """The segment mixture keeps every expert under export (no data-dependent shapes): the dynamo exporter
    takes it (it used to fail on the used-expert selection and fall back to TorchScript), and the file
    matches PyTorch in ONNX Runtime."""
    import logging

    from mmts_fast.export.onnx import export_onnx, verify_onnx
    torch.manual_seed(0)
    bb = RLinearMoLE(RLinearMoLEConfig(lookback=L, horizon=1, channels=C, n_experts=2))
    m = MoLA.from_backbone(bb, horizon=H, segments=3, n_lora=4, rank=4).eval()
    with torch.no_grad():
        m.lora_b.normal_()
    caplog.set_level(logging.INFO, logger="mmts_fast.export.onnx")
    path = export_onnx(m, tmp_path / "mola.onnx")
    assert "with the dynamo exporter" in caplog.text and "falling back" not in caplog.text
    assert verify_onnx(m, path, *data(1)) <= 1e-4
