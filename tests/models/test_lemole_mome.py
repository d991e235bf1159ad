"""LeMoLE and MoME: shapes, gradients, text ablations, batched EiLM, grouped experts, ONNX parity."""
import pytest
import torch

from mmts_fast.export import export_onnx, verify_onnx
from mmts_fast.models import ForecastModel, LeMoLE, LeMoLEConfig, MoME, MoMEConfig
from mmts_fast.nn.routed import dense_swiglu, grouped_swiglu

B, L, H, C, D = 4, 45, 12, 3, 20


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, L, C, generator=g) * 2 + 1, static=torch.randn(B, D, generator=g),
                dynamic=torch.randn(B, L, D, generator=g), hidden=torch.randn(B, 7, D, generator=g),
                mask=torch.rand(B, 7, generator=g) > 0.3)


@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("static, dynamic", [(True, True), (True, False), (False, False)])
def test_lemole_shapes_and_grads(form, static, dynamic):
    torch.manual_seed(0)
    m = LeMoLE(LeMoLEConfig(lookback=L, horizon=H, channels=C, d_llm=D, output_form=form,
                            use_static=static, use_dynamic=dynamic))
    t = inputs()
    y = m(t["x"], static_emb=t["static"], dynamic_emb=t["dynamic"])
    assert y.shape == (B, H, C)
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if static:
        assert m.static_film.weight.grad.abs().sum() > 0
    # the static embedding may be shared by the batch ([d_llm])
    m.eval()
    torch.testing.assert_close(m(t["x"], static_emb=t["static"][0], dynamic_emb=t["dynamic"]),
                               m(t["x"], static_emb=t["static"][:1].expand(B, D), dynamic_emb=t["dynamic"]))


@pytest.mark.parametrize("spread", [1, 40])   # overlapping windows (whole table) / far apart (distinct rows)
def test_lemole_dynamic_table_equals_per_window_embeddings(spread):
    """dynamic_table[dynamic_index] and dynamic_emb are the same input: same output, same gradients."""
    g = torch.Generator().manual_seed(5)
    table = torch.randn(L + spread * B, D, generator=g)
    index = (torch.arange(B) * spread)[:, None] + torch.arange(L)              # window b starts at row b*spread
    x, s = torch.randn(B, L, C, generator=g), torch.randn(D, generator=g)
    grads = []
    for kw in ({"dynamic_emb": table[index]}, {"dynamic_table": table, "dynamic_index": index}):
        torch.manual_seed(0)
        m = LeMoLE(LeMoLEConfig(lookback=L, horizon=H, channels=C, d_llm=D)).eval()
        y = m(x, static_emb=s, **kw)
        y.backward(torch.ones_like(y))
        grads.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        if "dynamic_table" in kw:
            torch.testing.assert_close(m.export_inputs({"static_emb": s, **kw})["dynamic_emb"], table[index])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], msg=n)


def test_lemole_errors_and_windows():
    m = LeMoLE(LeMoLEConfig(lookback=L, horizon=H, channels=C, d_llm=D))
    t = inputs()
    with pytest.raises(ValueError, match="needs dynamic_emb"):
        m(t["x"], static_emb=t["static"])
    with pytest.raises(ValueError, match="needs static_emb"):
        m(t["x"], dynamic_emb=t["dynamic"])
    table, index = t["dynamic"][0], torch.arange(L).expand(B, L)
    with pytest.raises(ValueError, match="together with dynamic_index"):
        m(t["x"], static_emb=t["static"], dynamic_table=table)
    with pytest.raises(ValueError, match="not both"):
        m(t["x"], static_emb=t["static"], dynamic_emb=t["dynamic"], dynamic_table=table, dynamic_index=index)
    with pytest.raises(ValueError, match="dynamic_index"):
        m(t["x"], static_emb=t["static"], dynamic_table=table, dynamic_index=index[:, :-1])
    with pytest.raises(ValueError, match=f"reads rows 1..{L} of a dynamic_table with {L} rows"):
        m(t["x"], static_emb=t["static"], dynamic_table=table, dynamic_index=index + 1)
    with pytest.raises(ValueError, match="reads rows -1"):
        m(t["x"], static_emb=t["static"], dynamic_table=table, dynamic_index=index - 1)
    with pytest.raises(ValueError, match="longer than the lookback"):
        LeMoLEConfig(lookback=96, n_experts=2, windows=[96, 192])
    assert LeMoLEConfig(lookback=512).windows == [512, 336, 192, 96]   # the public code's windows


def test_grouped_experts_equal_dense():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(61, 16, generator=g, requires_grad=True)
    idx = torch.randint(0, 5, (61, 2), generator=g)
    ws = [torch.randn(5, 16, 16, generator=g, requires_grad=True) for _ in range(3)]
    a, b = grouped_swiglu(x, idx, *ws), dense_swiglu(x, idx, *ws)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    up = torch.randn_like(a)
    ga = torch.autograd.grad((a * up).sum(), [x, *ws])
    gb = torch.autograd.grad((b * up).sum(), [x, *ws])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_grouped_experts_skip_unselected():
    """An expert no token selects is never multiplied: NaN weights there leave the output finite."""
    x = torch.randn(30, 16)
    idx = torch.stack([torch.zeros(30, dtype=torch.long), torch.ones(30, dtype=torch.long)], 1)
    ws = [torch.randn(4, 16, 16) for _ in range(3)]
    for w in ws:
        w[2:] = float("nan")
    assert torch.isfinite(grouped_swiglu(x, idx, *ws)).all()


def test_mome_shapes_grads_and_batched_eilm():
    torch.manual_seed(2)
    m = MoME(MoMEConfig(lookback=L, horizon=H, channels=C, d_llm=D, patch_len=8, n_layers=2))
    t = inputs()
    t["mask"][0] = False                      # a sample without any text stays finite (null token)
    y = m(t["x"], text_hidden=t["hidden"], text_mask=t["mask"])
    assert y.shape == (B, H, C) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    m.eval()
    batched = m(t["x"], text_hidden=t["hidden"], text_mask=t["mask"])
    single = torch.cat([m(t["x"][i:i + 1], text_hidden=t["hidden"][i:i + 1], text_mask=t["mask"][i:i + 1])
                        for i in range(B)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    # the text changes the forecast (EiLM and router modulation are wired in)
    other = m(t["x"], text_hidden=torch.randn_like(t["hidden"]), text_mask=t["mask"])
    assert (other - batched).abs().max() > 1e-4


def test_mome_without_text_and_errors():
    m = MoME(MoMEConfig(lookback=L, horizon=H, channels=C, use_text=False))
    assert m(inputs()["x"]).shape == (B, H, C)
    m2 = MoME(MoMEConfig(lookback=L, horizon=H, channels=C, d_llm=D))
    with pytest.raises(ValueError, match="needs text_hidden"):
        m2(inputs()["x"])
    with pytest.raises(ValueError, match="top_k=5 is larger"):
        MoMEConfig(n_experts=4, top_k=5)
    t = inputs()
    with pytest.raises(ValueError, match=r"text_mask must be \[B, T\]=\(4, 7\)"):
        m2(t["x"], text_hidden=t["hidden"], text_mask=t["mask"][:, :5])


def test_lemole_static_emb_batch_mismatch():
    m = LeMoLE(LeMoLEConfig(lookback=L, horizon=H, channels=C, d_llm=D, use_dynamic=False))
    t = inputs()
    with pytest.raises(ValueError, match=r"static_emb \[d_llm\] or \[B=4, d_llm\], got \(3, 20\)"):
        m(t["x"], static_emb=t["static"][:3])


@pytest.mark.parametrize("kind", ["lemole", "mome"])
def test_onnx_parity_with_text_inputs(tmp_path, kind):
    torch.manual_seed(3)
    t = inputs()
    xm = torch.rand(B, L, 4) - 0.5
    if kind == "lemole":
        m = LeMoLE(LeMoLEConfig(lookback=L, horizon=H, channels=C, d_llm=D)).eval()
        extra = {"static_emb": t["static"], "dynamic_emb": t["dynamic"]}
    else:
        m = MoME(MoMEConfig(lookback=L, horizon=H, channels=C, d_llm=D)).eval()
        extra = {"text_hidden": t["hidden"], "text_mask": t["mask"]}
    path = export_onnx(m, tmp_path / f"{kind}.onnx", extra_inputs={k: v[:2] for k, v in extra.items()})
    err = verify_onnx(m, path, t["x"], xm, extra_inputs=extra, atol=1e-4)
    assert err <= 1e-4
    m.save_pretrained(tmp_path / kind)
    loaded = ForecastModel.from_pretrained(tmp_path / kind)
    torch.testing.assert_close(loaded(t["x"], **extra), m(t["x"], **extra))
    if kind == "mome":   # the text length is a dynamic axis too (exported with T=7): T=11, HF-style int mask
        g = torch.Generator().manual_seed(5)
        longer = {"text_hidden": torch.randn(B, 11, D, generator=g),
                  "text_mask": (torch.rand(B, 11, generator=g) > 0.3).long()}
        assert verify_onnx(m, path, t["x"], xm, extra_inputs={**longer, "text_mask": longer["text_mask"].bool()},
                           atol=1e-4) <= 1e-4
        torch.testing.assert_close(m(t["x"], **longer), m(t["x"], text_hidden=longer["text_hidden"],
                                                         text_mask=longer["text_mask"].bool()))


@pytest.mark.parametrize("make", [lambda **kw: LeMoLEConfig(**kw), lambda **kw: MoMEConfig(**kw)])
def test_text_model_configs_check_dropout_and_int_fields(make):
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match=r"Config.dropout must be a number in \[0, 1\)"):
            make(dropout=bad)
    cfg = make(lookback=48.0, horizon=12.0, channels=3, dropout=0)
    assert type(cfg.lookback) is int and type(cfg.horizon) is int and type(cfg.dropout) is float
