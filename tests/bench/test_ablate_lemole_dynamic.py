"""Smoke test of the LeMoLE dynamic-prompt ablation script: every variant trains one epoch end to end on
a toy domain (fake encoder) and changes what it says it changes; the package is restored afterwards."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import mmts_fast.text.conditioning as conditioning
import mmts_fast.text.prompts as prompts
from mmts_fast.models import lemole

REPO = Path(__file__).resolve().parents[2]


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_text = _load("tests/text/test_conditioning.py", "_text_conditioning_helpers")   # FakeEncoder, toy_domain
FakeEncoder, toy_domain = _text.FakeEncoder, _text.toy_domain
SCRIPT = "bench/ablate_lemole_dynamic.py"


@pytest.mark.parametrize("variant", ["dropout:0.5", "pca:2", "no-year", "lr-scale:0.1", "plain-gamma+span:3"])
def test_variant_trains_and_changes_the_dynamic_branch(tmp_path, monkeypatch, variant):
    # the script patches the package in place: register the originals so monkeypatch restores them
    monkeypatch.setattr(lemole.LeMoLE, "__init__", lemole.LeMoLE.__init__)
    monkeypatch.setattr(conditioning, "_lemole_extras", conditioning._lemole_extras)
    monkeypatch.setattr(prompts, "DATE_FORMAT", prompts.DATE_FORMAT)
    monkeypatch.setattr(lemole.LeMoLE, "_dynamic_film", lemole.LeMoLE._dynamic_film)
    monkeypatch.setattr(conditioning, "dynamic_prompts", conditioning.dynamic_prompts)
    monkeypatch.setattr(conditioning, "make_encoder", lambda spec: FakeEncoder())
    seen = {}
    extras = conditioning._lemole_extras

    def spy(split, static, dyn, r0):                     # the table the model is fed (after the script's patch)
        seen["table"] = dyn
        return extras(split, static, dyn, r0)
    monkeypatch.setattr(conditioning, "_lemole_extras", spy)

    out = tmp_path / "run"
    d = toy_domain(tmp_path, n=150)
    _load(SCRIPT, "_bench_ablate").main([variant, "--data", str(d), "--lookback", "12", "--horizon", "4", "--epochs", "1", "--quiet",
                  "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert json.loads((out / "metrics.json").read_text())["test"]["mse"] > 0
    state = json.loads((out / "config.json").read_text())
    assert state["use_dynamic"] is True
    if variant == "pca:2":     # rank-2 around the training rows' mean
        s = torch.linalg.svdvals((seen["table"] - seen["table"].mean(0)).double())
        assert s[2] < 1e-5 * s[0]
    if variant == "no-year":
        assert prompts.DATE_FORMAT == "%m-%d %H:%M"
    if variant == "plain-gamma+span:3":   # each prompt ends 2 steps after its step; gamma = the Linear's output
        import datetime
        d0 = datetime.datetime(2020, 1, 1)
        texts = conditioning.dynamic_prompts([d0 + datetime.timedelta(hours=i) for i in range(4)])
        assert texts[0] == "This is Time Series from 2020-01-01 00:00 to 2020-01-01 02:00", texts
        m = lemole.LeMoLE(lemole.LeMoLEConfig(lookback=12, horizon=4, channels=2, d_llm=8))
        with torch.no_grad():
            for lin in (m.static_film, m.dynamic_proj, m.dynamic_time):
                lin.weight.zero_(), lin.bias.zero_()
            gb = m.static_film(torch.randn(1, 8)).view(-1, 4, 4)
            assert torch.equal(gb[0, :2], -torch.ones(2, 4)) and torch.equal(gb[0, 2:], torch.zeros(2, 4))
            gd = m._dynamic_film(3, 12, torch.float32, torch.randn(3, 12, 8), None, None)
            assert torch.equal(gd[:, :2], -torch.ones(3, 2, 4)) and torch.equal(gd[:, 2:], torch.zeros(3, 2, 4))
    if variant == "lr-scale:0.1":
        m = lemole.LeMoLE(lemole.LeMoLEConfig(lookback=12, horizon=4, channels=2, d_llm=8))
        assert hasattr(m.dynamic_time, "parametrizations")


def test_unknown_variant_is_an_error(monkeypatch):
    monkeypatch.setattr(lemole.LeMoLE, "__init__", lemole.LeMoLE.__init__)
    with pytest.raises(SystemExit, match="unknown variant"):
        _load(SCRIPT, "_bench_ablate").main(["bogus:1"])
