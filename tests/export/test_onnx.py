"""ONNX export of the MoLE models: graph contract, ONNX Runtime parity, dynamic batch, atomic writes."""
import logging

import onnx
import pytest
import torch
from torch import nn

from mmts_fast.export import onnx as onnx_export
from mmts_fast.export.onnx import check_graph, export_onnx, verify_onnx
from mmts_fast.models import (DLinearMoLE, DLinearMoLEConfig, RLinearMoLE, RLinearMoLEConfig, RMLPMoLE,
                              RMLPMoLEConfig)

L, H, C, M, F = 48, 12, 3, 3, 4
ATOL = 1e-4
LOGGER = "mmts_fast.export.onnx"


def make(name):
    torch.manual_seed(0)
    common = dict(lookback=L, horizon=H, channels=C, n_experts=M, n_time_features=F)
    if name == "dlinear":
        return DLinearMoLE(DLinearMoLEConfig(**common, moving_avg=13))
    if name == "rlinear":
        model = RLinearMoLE(RLinearMoLEConfig(**common, windows=[48, 30, 17]))
    else:
        model = RMLPMoLE(RMLPMoLEConfig(**common, windows=[48, 30, 17], mlp_hidden=32))
    with torch.no_grad():   # non-trivial RevIN affine, so that the export of it is really checked
        model.revin.weight.uniform_(0.5, 1.5)
        model.revin.bias.uniform_(-0.5, 0.5)
    return model


def batch(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, C, generator=g) * 3 + 1
    return x, torch.rand(b, L, F, generator=g) - 0.5


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def export_with_log(model, path, **kwargs):
    """export_onnx, returning the messages it logged (module-scoped fixtures cannot use caplog)."""
    logger, records = logging.getLogger(LOGGER), _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        export_onnx(model, path, **kwargs)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return "\n".join(records.messages)


@pytest.fixture(scope="module", params=["dlinear", "rlinear", "rmlp"])
def exported(request, tmp_path_factory):
    model = make(request.param).train()           # export must not depend on (or change) the mode
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    log = export_with_log(model, path)
    # The fallback would hide a dynamo failure: these models must go through dynamo. (It also shows
    # that check_inputs' data-dependent finiteness test is skipped under torch.export.)
    assert "with the dynamo exporter" in log and "falling back" not in log, log
    return model, path


def test_graph_contract(exported):
    model, path = exported
    assert model.training, "export_onnx must restore the training mode"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"], "single file, no temp leftovers"
    proto = check_graph(path)
    graph = proto.graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.output]}
    assert [i.name for i in graph.input] == ["x_enc", "x_mark_enc"]
    assert [o.name for o in graph.output] == ["y"]
    batch_dim = shapes["x_enc"][0]
    assert isinstance(batch_dim, str) and batch_dim, "batch axis must be symbolic"
    assert shapes == {"x_enc": [batch_dim, L, C], "x_mark_enc": [batch_dim, L, F], "y": [batch_dim, H, C]}
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    assert not proto.functions
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in graph.initializer)


@pytest.mark.parametrize("b", [2, 5])
def test_onnxruntime_matches_pytorch(exported, b):
    model, path = exported
    x, xm = batch(b, seed=b)
    err = verify_onnx(model, path, x, xm, atol=ATOL)
    assert err <= ATOL
    assert model.training


def test_verify_catches_mismatch(exported):
    model, path = exported
    changed = make(type(model).model_type.split("_")[0])
    with torch.no_grad():
        changed.heads.bias.add_(0.1)
    with pytest.raises(AssertionError, match="differs from PyTorch"):
        verify_onnx(changed, path, *batch(2))


def test_verify_rejects_custom_ops(exported, tmp_path):
    _, path = exported
    proto = onnx.load(str(path))
    node = proto.graph.node[0]
    node.domain = "mmts_fast"
    proto.opset_import.append(onnx.helper.make_opsetid("mmts_fast", 1))
    bad = tmp_path / "custom.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ValueError, match="non-standard ONNX ops.*mmts_fast::"):
        check_graph(bad)


def _without_dynamo(monkeypatch):
    """torch.onnx.export with the dynamo exporter failing, as it does on some graphs: the fallback runs."""
    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)


def test_fallback_to_torchscript(tmp_path, monkeypatch, caplog):
    _without_dynamo(monkeypatch)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = make("rmlp")
    path = export_onnx(model, tmp_path / "m.onnx")
    assert "simulated dynamo failure" in caplog.text and "with the torchscript exporter" in caplog.text
    for b in (2, 5):
        assert verify_onnx(model, path, *batch(b)) <= ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken(model, args, f, **kwargs):
        with open(f, "wb") as fh:     # a half-written file, then the failure
            fh.write(b"\x08partial")
        raise RuntimeError("simulated export failure")

    monkeypatch.setattr(torch.onnx, "export", broken)
    model = make("rlinear").train()
    with pytest.raises(RuntimeError, match="simulated export failure"):
        export_onnx(model, tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []
    assert model.training

    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"previous model")
    with pytest.raises(RuntimeError, match="simulated export failure"):
        export_onnx(model, existing)
    assert existing.read_bytes() == b"previous model"
    assert list(tmp_path.iterdir()) == [existing]


def test_restores_device_dtype_and_mode():
    model = make("rmlp").double().train()
    with torch.no_grad():   # values that fp32 cannot hold exactly: a round trip through fp32 would move them
        for p in model.parameters():
            p.normal_()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    with onnx_export._reference_mode(model):
        assert not model.training
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(params[n] is p for n, p in model.named_parameters()), "same Parameter objects (optimisers)"
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "same bits, not fp32-rounded"


class _WithText(nn.Module):
    """A forecaster with an extra keyword input, as the text-conditioned models will have."""

    def __init__(self, d_text=8):
        super().__init__()
        self.base = make("rlinear")
        self.config = self.base.config
        self.proj = nn.Linear(d_text, H * C)

    def forward(self, x_enc, x_mark_enc=None, text_emb=None):
        y = self.base(x_enc, x_mark_enc)
        return y + self.proj(text_emb).view(-1, H, C)


def test_extra_inputs(tmp_path):
    model = _WithText()
    path = tmp_path / "m.onnx"
    log = export_with_log(model, path, extra_inputs={"text_emb": torch.randn(2, 8)})
    assert "with the dynamo exporter" in log, log
    graph = check_graph(path).graph
    assert [i.name for i in graph.input] == ["x_enc", "x_mark_enc", "text_emb"]
    for b in (2, 5):
        emb = torch.randn(b, 8)
        assert verify_onnx(model, path, *batch(b), extra_inputs={"text_emb": emb}) <= ATOL
    with pytest.raises(ValueError, match="takes inputs"):
        verify_onnx(model, path, *batch(2))


@pytest.mark.parametrize("windows", [None, [24, 10]])
def test_gate_scaled_form_exports(tmp_path, windows):
    """A long horizon (sum of windows < M*H) takes K1's gate-scaled-input form (a broadcast for equal
    windows, a column gather otherwise); it too must export with a dynamic batch and match in ORT."""
    torch.manual_seed(0)
    model = RLinearMoLE(RLinearMoLEConfig(lookback=24, horizon=40, channels=C, n_experts=2, windows=windows))
    path = export_onnx(model, tmp_path / "long.onnx")
    g = torch.Generator().manual_seed(2)
    x, xm = torch.randn(5, 24, C, generator=g), torch.rand(5, 24, F, generator=g) - 0.5
    assert verify_onnx(model, path, x, xm) <= ATOL


# ---------------------------------------------------------------------------------------------
# Extra inputs in the model's training form, input errors, inputs PyTorch takes but ORT does not
# ---------------------------------------------------------------------------------------------
def _lemole(d=8):
    from mmts_fast.models import LeMoLE, LeMoLEConfig

    torch.manual_seed(0)
    return LeMoLE(LeMoLEConfig(lookback=12, horizon=3, channels=2, n_experts=2, d_llm=d)).eval()


def _table_inputs(b, d=8, seed=0):
    """LeMoLE's table form: a table of T = 12 + b + 2 rows (not the batch) and each window's rows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(12 + b + 2, d, generator=g)
    index = torch.stack([torch.arange(12) + i for i in range(b)])
    return torch.randn(b, 12, 2, generator=g), dict(static_emb=torch.randn(b, d, generator=g),
                                                   dynamic_table=table, dynamic_index=index)


def test_lemole_table_form_exports_through_export_inputs(tmp_path):
    """export_onnx / verify_onnx apply model.export_inputs themselves: the table form (T != B rows) was
    refused, or (T == B) went to the TorchScript exporter and gave a file without x_mark_enc."""
    model = _lemole()
    _, extra = _table_inputs(2)
    path = tmp_path / "lemole.onnx"
    log = export_with_log(model, path, extra_inputs=extra)
    assert "with the dynamo exporter" in log and "falling back" not in log, log
    assert [i.name for i in check_graph(path).graph.input] == ["x_enc", "x_mark_enc", "static_emb", "dynamic_emb"]
    x, extra = _table_inputs(3, seed=1)
    xm = torch.rand(3, 12, F) - 0.5
    assert verify_onnx(model, path, x, xm, extra_inputs=extra) <= ATOL
    # what LeMoLE takes and ORT would not: int32 rows, a static embedding shared by the batch ([d] or [1, d])
    for static in (extra["static_emb"][0], extra["static_emb"][:1]):
        feeds = {**extra, "static_emb": static, "dynamic_index": extra["dynamic_index"].int()}
        assert verify_onnx(model, path, x, xm, extra_inputs=feeds) <= ATOL


def test_fallback_keeps_unused_inputs(tmp_path, monkeypatch, caplog):
    """The TorchScript exporter leaves out inputs the graph never reads (LeMoLE's x_mark_enc); the fallback
    puts them back, so its file takes the same inputs as the dynamo one and runs in ONNX Runtime."""
    _without_dynamo(monkeypatch)
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = _lemole()
    _, extra = _table_inputs(2)
    path = export_onnx(model, tmp_path / "m.onnx", extra_inputs=extra)
    assert "with the torchscript exporter" in caplog.text
    graph = check_graph(path).graph
    assert [i.name for i in graph.input] == ["x_enc", "x_mark_enc", "static_emb", "dynamic_emb"]
    dims = graph.input[1].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [12, F]
    for b in (2, 5):
        x, extra = _table_inputs(b, seed=b)
        assert verify_onnx(model, path, x, torch.rand(b, 12, F) - 0.5, extra_inputs=extra) <= ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_fallback_file_is_checked(tmp_path, monkeypatch):
    """A file the fallback writes is checked like any other, and refused whole (here: the unused input left out)."""
    _without_dynamo(monkeypatch)
    monkeypatch.setattr(onnx_export, "_restore_unused_inputs", lambda *a: None)
    _, extra = _table_inputs(2)
    with pytest.raises(ValueError, match=r"torchscript exporter wrote a graph that breaks the contract .*"
                                         r"expected \['x_enc', 'x_mark_enc'\] first"):
        export_onnx(_lemole(), tmp_path / "m.onnx", extra_inputs=extra)
    assert list(tmp_path.iterdir()) == []


def test_input_errors_come_before_any_exporter(tmp_path, monkeypatch, caplog):
    """A missing text input is the model's own ValueError, raised once, with no exporter run and no
    warning logged (dynamo failed on it, the whole torch.export error was logged, TorchScript ran too)."""
    calls = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(k.get("dynamo")))
    caplog.set_level(logging.INFO, logger=LOGGER)
    with pytest.raises(ValueError, match="LeMoLE needs"):
        export_onnx(_lemole(), tmp_path / "m.onnx")
    assert calls == [] and "falling back" not in caplog.text and list(tmp_path.iterdir()) == []


def test_verify_without_time_features(tmp_path):
    """A model that takes x_mark_enc=None (one expert): PyTorch gets None, ORT zeros of the graph's width
    (was AttributeError: 'NoneType' object has no attribute 'detach')."""
    torch.manual_seed(0)
    model = RLinearMoLE(RLinearMoLEConfig(lookback=L, horizon=H, channels=C, n_experts=1, n_time_features=F))
    path = export_onnx(model, tmp_path / "m.onnx")
    x, _ = batch(3)
    assert verify_onnx(model, path, x, None) <= ATOL
    routed = make("rlinear")
    path = export_onnx(routed, tmp_path / "routed.onnx")
    with pytest.raises(ValueError, match="routes on time features: pass x_mark_enc"):
        verify_onnx(routed, path, x, None)


def test_first_export_of_a_process_says_nothing_the_user_cannot_act_on(tmp_path):
    """A fresh process (the exporter's op registry is built once per process, with a "torchvision is not
    installed" line per torchvision op; torch.export warns about its own pytree API; onnx_ir about an
    empty attribute list in LeMoLE's index_put): the exports' stderr holds none of it, while a warning of the
    user's own still shows."""
    import subprocess
    import sys

    code = f"""
import warnings, torch
from mmts_fast.export.onnx import export_onnx, _quiet_exporter
from mmts_fast.models import RLinearMoLE, RLinearMoLEConfig
from mmts_fast.models.lemole import LeMoLE, LeMoLEConfig
m = RLinearMoLE(RLinearMoLEConfig(lookback=24, horizon=6, channels=2, n_experts=2, n_time_features=4))
export_onnx(m, r"{tmp_path / 'm.onnx'}")
m = LeMoLE(LeMoLEConfig(lookback=24, horizon=6, channels=2, n_experts=2, d_llm=8, n_time_features=4,
                        use_static=False, use_dynamic=False))
export_onnx(m, r"{tmp_path / 'l.onnx'}")
with _quiet_exporter():
    warnings.warn("a warning of the user's own", UserWarning)
    tail = " were assigned during export. Such attributes must be registered as buffers"
    warnings.warn("The tensor attributes self.l.0.q.routed_gates, self.l.1.v.routed_gates" + tail, UserWarning)
    warnings.warn("The tensor attributes self.l.0.q.other_state" + tail, UserWarning)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m.onnx").is_file()
    assert (tmp_path / "l.onnx").is_file()
    for noise in ("torchvision is not installed", "LeafSpec", "Attribute type is ambiguous"):
        assert noise not in res.stderr, res.stderr[-2000:]
    assert "a warning of the user's own" in res.stderr
    assert "routed_gates" not in res.stderr and "self.l.0.q.other_state" in res.stderr   # D-LoRA's gates only
