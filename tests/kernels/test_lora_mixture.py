"""K2 (grouped LoRA / D-LoRA mixture matmul): Triton kernels against the eager reference.

On CPU-only machines the Triton path runs under TRITON_INTERPRET=1 (set in conftest), so shapes stay
small. Every case: fresh random inputs, odd sizes, poisoned outputs, an fp64 reference, every gradient.
"""
import pytest
import torch

from conftest import DEVICE, assert_matches_reference, nan_strided
from mmts_fast.kernels import _common
from mmts_fast import use_backend
from mmts_fast.kernels import lora_mixture as lm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SCALE = 0.75
# The odd shape: d_in=72, d_out=40, r=8, M=5, top-2 per row, T=37 rows.
ODD = dict(T=37, d_in=72, d_out=40, r=8, M=5, top=2)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def top_n_gates(T, M, n, gen, zero_rows=()):
    """Softmax over each row's top-n logits, scattered into zeros: [T, M] with n nonzeros per row."""
    logits = torch.randn(T, M, generator=gen, dtype=torch.float64)
    idx = logits.topk(n, dim=1).indices
    gates = torch.zeros(T, M, dtype=torch.float64).scatter(1, idx, torch.softmax(logits.gather(1, idx), 1))
    gates[list(zero_rows)] = 0.0
    return gates


def make_inputs(T, d_in, d_out, r, M, top, *, lead=None, segments=None, zero_rows=(), noncontig=False,
                bias=True, seed=0):
    """fp64 masters on DEVICE (cast per run). noncontig: x stored transposed (strides (1, T))."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rnd(d_in, T).t() if noncontig else rnd(T, d_in)
    gates = torch.softmax(rnd(segments, M), -1) if segments else top_n_gates(T, M, top, g, zero_rows)
    if lead is not None:
        x = x.reshape(*lead, d_in)
        if not segments:
            gates = gates.reshape(*lead, M)
    inp = dict(x=x, weight=rnd(d_out, d_in, scale=d_in ** -0.5), bias=rnd(d_out, scale=0.1) if bias else None,
               lora_a=rnd(M, r, d_in, scale=d_in ** -0.5), lora_b=rnd(M, d_out, r, scale=r ** -0.5), gates=gates)
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in inp.items()}


def run(backend, inp, *, dtype=None, scale=SCALE, segments=None, weight=None, strided_bias=False):
    """Forward and backward through one backend; returns (y, grads dict). strided_bias: the bias as a
    stride-2 view (NaN between its values)."""
    leaves = {}
    for k in ("x", "bias", "lora_a", "lora_b", "gates"):
        if inp[k] is not None:
            t = inp[k].to(dtype) if dtype is not None else inp[k]      # .to keeps x's strides
            if k == "bias" and strided_bias:
                t = nan_strided(t)
            leaves[k] = t.detach().requires_grad_(True)
    w = inp["weight"] if weight is None else weight
    if isinstance(w, torch.Tensor) and w.is_floating_point() and dtype is not None:
        w = w.to(dtype)
    with use_backend(backend):
        y = lm.lora_mixture(leaves["x"], w, leaves.get("bias"), leaves["lora_a"], leaves["lora_b"],
                            leaves["gates"], scale, segments=segments)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    (y.double() * up).sum().backward()
    return y, {k: v.grad for k, v in leaves.items()}


def check_case(*, dtype=torch.float32, segments=None, scale=SCALE, **shape):
    inp = make_inputs(**shape, segments=segments)
    if dtype is not None and shape.get("noncontig"):
        assert inp["x"].to(dtype).stride() == inp["x"].stride()
    strided = bool(shape.get("noncontig"))
    y_k, g_k = run("triton", inp, dtype=dtype, scale=scale, segments=segments, strided_bias=strided)
    y_r, g_r = run("torch", inp, dtype=dtype, scale=scale, segments=segments, strided_bias=strided)
    y_64, g_64 = run("torch", inp, dtype=torch.float64, scale=scale, segments=segments)
    assert y_k.dtype == dtype
    assert_matches_reference(y_k, y_r, y_64, name="y")
    for k in g_64:
        assert g_k[k] is not None, f"no gradient for {k}"
        if g_64[k] is None:    # the reference never used it (nothing routed): the kernel's must be 0
            assert (g_k[k] == 0).all(), f"d{k}"
            continue
        assert_matches_reference(g_k[k], g_r[k], g_64[k], name=f"d{k}")
    if segments is None:   # the routing (zero pattern) is a constant: no gradient at unselected gates
        assert (g_k["gates"][inp["gates"] == 0] == 0).all()
    return inp, g_k


@pytest.mark.parametrize("noncontig", [False, True])
def test_odd_shapes(noncontig):
    check_case(**ODD, noncontig=noncontig, zero_rows=(3, 36))


def test_single_row_no_bias():
    check_case(**{**ODD, "T": 1}, bias=False, scale=2.0, seed=1)


def test_all_zero_rows_only_base():
    """Every row unrouted: y = x W^T + b, the LoRA gradients are exactly zero."""
    _, g = check_case(**{**ODD, "T": 5}, zero_rows=range(5), seed=2)
    assert (g["lora_a"] == 0).all() and (g["lora_b"] == 0).all()


def test_3d_x():
    check_case(**{**ODD, "T": 39}, lead=(3, 13), seed=3)


def test_mixed_dtypes_round_like_the_reference():
    """fp32 x with bf16 adapters: both paths use the adapters in x's dtype (no rounding of x A^T to bf16),
    and the adapters' gradients come back in their own dtype."""
    inp = make_inputs(**ODD)
    bf = {k: inp[k].to(torch.bfloat16).double() for k in ("lora_a", "lora_b")}    # the adapters' values
    res = {}
    for name, backend, dtype in (("k", "triton", torch.float32), ("r", "torch", torch.float32),
                                 ("64", "torch", torch.float64)):
        leaves = {"x": inp["x"].to(dtype).requires_grad_(True),
                  **{k: (v.to(torch.bfloat16) if dtype == torch.float32 else v).requires_grad_(True)
                     for k, v in bf.items()}}
        with use_backend(backend):
            y = lm.lora_mixture(leaves["x"], inp["weight"].to(dtype), None, leaves["lora_a"], leaves["lora_b"],
                                inp["gates"].to(dtype), SCALE)
        up = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (y.double() * up.to(DEVICE)).sum().backward()
        res[name] = (y, {k: v.grad for k, v in leaves.items()})
    assert_matches_reference(res["k"][0], res["r"][0], res["64"][0], name="y")
    assert_matches_reference(res["k"][1]["x"], res["r"][1]["x"], res["64"][1]["x"], name="dx")
    for k in ("lora_a", "lora_b"):
        assert res["k"][1][k].dtype == torch.bfloat16
        torch.testing.assert_close(res["k"][1][k], res["r"][1][k])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    check_case(**ODD, dtype=dtype, zero_rows=(5,), seed=4)


def test_top_one_and_top_all():
    """n = 1 (one slot) and n = M (every expert, five slots)."""
    check_case(**{**ODD, "top": 1, "T": 20}, seed=5)
    check_case(**{**ODD, "top": 5, "T": 20}, seed=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments(dtype):
    """MoLA: 3 segments of d_out=40 (14, 13, 13 columns)."""
    check_case(**ODD, segments=3, dtype=dtype, seed=7)


def test_segments_unused_expert_and_3d():
    inp = make_inputs(**{**ODD, "T": 39}, lead=(3, 13), segments=4, seed=8)
    inp["gates"][:, 2] = 0.0                     # no segment uses expert 2
    inp["lora_a"][2] = float("nan")
    y_k, g_k = run("triton", inp, dtype=torch.float32, segments=4)
    y_r, g_r = run("torch", inp, dtype=torch.float32, segments=4)
    y_64, g_64 = run("torch", inp, dtype=torch.float64, segments=4)
    assert_matches_reference(y_k, y_r, y_64, name="y")
    for k in g_64:
        assert_matches_reference(g_k[k], g_r[k], g_64[k], name=f"d{k}")
    assert (g_k["gates"][:, 2] == 0).all()


# ---------------------------------------------------------------------------------------------
# The reference against the spec written literally
# ---------------------------------------------------------------------------------------------
def dense_formula(x, W, b, A, B, g, scale):
    """y = x W^T + b + scale * sum over ALL m of g[:, m] (x A_m^T) B_m^T."""
    y = x @ W.T + b
    for m in range(A.shape[0]):
        y = y + scale * g[:, m:m + 1] * ((x @ A[m].T) @ B[m].T)
    return y


def test_token_reference_equals_dense_formula():
    inp = make_inputs(**ODD, zero_rows=(3,))
    names = ("x", "bias", "lora_a", "lora_b", "gates")
    a = {k: inp[k].detach().clone().requires_grad_(True) for k in names}
    b = {k: inp[k].detach().clone().requires_grad_(True) for k in names}
    y = lm.lora_mixture_reference(a["x"], inp["weight"], a["bias"], a["lora_a"], a["lora_b"], a["gates"], SCALE)
    want = dense_formula(b["x"], inp["weight"], b["bias"], b["lora_a"], b["lora_b"], b["gates"], SCALE)
    torch.testing.assert_close(y, want)
    up = torch.randn(y.shape, dtype=torch.float64, device=DEVICE)
    (y * up).sum().backward()
    (want * up).sum().backward()
    for k in names:
        expect = b[k].grad * (inp["gates"] != 0) if k == "gates" else b[k].grad   # routing is a constant
        torch.testing.assert_close(a[k].grad, expect, msg=lambda m: f"d{k}: {m}")


def test_segment_reference_equals_literal_loop():
    S = 3
    inp = make_inputs(**ODD, segments=S)
    x, W, b, A, B, g = (inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "gates"))
    y = lm.lora_mixture_reference(x, W, b, A, B, g, SCALE, segments=S)
    for s, cols in enumerate(torch.tensor_split(torch.arange(W.shape[0], device=DEVICE), S)):
        want = x @ W[cols].T + b[cols]
        for m in range(A.shape[0]):
            want = want + SCALE * g[s, m] * (x @ A[m].T) @ B[m][cols].T
        torch.testing.assert_close(y[:, cols], want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unselected_experts_are_not_computed(backend):
    """Experts 1 and 3 are selected by no row and have NaN weights: nothing may touch them."""
    inp = make_inputs(**ODD, zero_rows=(4,), seed=9)
    g = inp["gates"]
    g[:, 1] = 0.0
    g[:, 3] = 0.0
    for m in (1, 3):
        inp["lora_a"][m] = float("nan")
        inp["lora_b"][m] = float("nan")
    y, grads = run(backend, inp, dtype=torch.float32)
    assert torch.isfinite(y).all()
    for k, v in grads.items():
        assert torch.isfinite(v).all(), f"d{k} not finite"
    assert (grads["lora_a"][[1, 3]] == 0).all() and (grads["lora_b"][[1, 3]] == 0).all()


# ---------------------------------------------------------------------------------------------
# NF4 base weights (bitsandbytes layout)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 72), (37, 64), (37, 63), (130, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_nf4_bitwise(shape, dtype, nested):
    """Both implementations equal bitsandbytes' dequantize_4bit bit for bit (blocksize 64; 37x63 has an
    odd element count; 130x130 has more than 256 blocks, so double quantisation uses several scales)."""
    bf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(DEVICE, dtype)
    packed, qs = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    want = bf.dequantize_4bit(packed, qs)
    for backend in ("triton", "torch"):
        with use_backend(backend):
            got = lm.dequantize_nf4(packed, qs)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32)), backend


def _bf16_absmax_reference(packed, qs):
    """bitsandbytes' own dequantize_4bit of the standard layout with the absmax rounded to bf16 (de-nested, as
    bitsandbytes' CPU repack stores it): the NF4 tensor a repacked layer holds."""
    bf = pytest.importorskip("bitsandbytes.functional")
    absmax = bf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    held = bf.QuantState(absmax=absmax.to(torch.bfloat16).float(), shape=qs.shape, code=qs.code,
                         blocksize=qs.blocksize, quant_type="nf4", dtype=qs.dtype)
    return bf.dequantize_4bit(packed, held)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_nf4_cpu_layout(dtype, blocksize, nested):
    """bitsandbytes' CPU-only layout (what Linear4bit.forward makes of the weight in inference on AVX512-BF16
    CPUs; made here with bitsandbytes' own conversion, on any CPU): read as the NF4 tensor it holds, i.e. the
    same codes with the absmax in bf16, bit for bit; the arguments are left as they are. It was read as the
    standard layout before (IndexError, or wrong weights)."""
    bf = pytest.importorskip("bitsandbytes.functional")
    convert = getattr(bf, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU repacking (_convert_weight_packed_for_cpu)")
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(blocksize + nested)).to(dtype)
    packed, qs = bf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    want = _bf16_absmax_reference(packed, qs)
    before = bf.dequantize_4bit(packed, qs)
    cpu_packed, cpu_qs = convert(*bf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                   compress_statistics=nested))
    assert cpu_qs.packing_format_for_cpu and cpu_qs.dtype == torch.bfloat16 and cpu_packed.shape == (96, 128)
    kept = cpu_packed.clone()
    flat, absmax, out_dtype = lm.nf4_unpack_cpu_format(cpu_packed, cpu_qs)
    assert torch.equal(flat, packed.reshape(-1)) and out_dtype == dtype       # the codes come back exactly
    for backend in ("triton", "torch"):
        with use_backend(backend):
            got = lm.dequantize_nf4(cpu_packed, cpu_qs)
        assert got.dtype == dtype and got.shape == (96, 256)
        assert torch.equal(got, want), backend
    assert torch.equal(cpu_packed, kept) and cpu_qs.packing_format_for_cpu and cpu_qs.absmax.dtype == torch.bfloat16
    if dtype == torch.float32:      # the repack's bf16 absmax: at most 2^-8 relative per block
        blk_max = before.reshape(-1, blocksize).abs().amax(1, keepdim=True)
        assert ((got - before).reshape(-1, blocksize).abs() <= 2 ** -8 * blk_max).all()


@pytest.mark.parametrize("form", ["params4bit", "pair_nested_bf16"])
def test_nf4_weight(form):
    """NF4 base in the kernel (tiles dequantised on load, also transposed for dx) against the same
    forward/backward with the weight dequantised by bitsandbytes."""
    bnb = pytest.importorskip("bitsandbytes")
    inp = make_inputs(**ODD, zero_rows=(2,), seed=10)
    if form == "params4bit":
        weight = bnb.nn.Params4bit(inp["weight"].float(), requires_grad=False, quant_type="nf4",
                                   blocksize=64).to(DEVICE)
        w_deq = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        weight = bnb.functional.quantize_4bit(inp["weight"].to(torch.bfloat16), blocksize=64, quant_type="nf4",
                                              compress_statistics=True)
        w_deq = bnb.functional.dequantize_4bit(*weight)
    y_k, g_k = run("triton", inp, dtype=torch.float32, weight=weight)
    y_r, g_r = run("torch", inp, dtype=torch.float32, weight=weight)
    y_d, g_d = run("torch", inp, dtype=torch.float32, weight=w_deq.float())
    assert torch.equal(y_r, y_d)                  # the reference dequantises exactly as bnb does
    y_64, g_64 = run("torch", inp, dtype=torch.float64, weight=w_deq.double())
    assert_matches_reference(y_k, y_d, y_64, name="y")
    for k in g_64:
        assert_matches_reference(g_k[k], g_d[k], g_64[k], name=f"d{k}")


# ---------------------------------------------------------------------------------------------
# LoRA-AMR
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_amr(backend, monkeypatch):
    T, d_in, d_out, r, rp, M = 37, 72, 40, 8, 4, 5
    gen = torch.Generator().manual_seed(11)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE)

    master = dict(x=rnd(T, d_in), weight=rnd(d_out, d_in, scale=d_in ** -0.5), bias=rnd(d_out, scale=0.1),
                  lora_c=rnd(M, r, rp, scale=rp ** -0.5), lora_d=rnd(rp, d_in, scale=d_in ** -0.5),
                  lora_b=rnd(M, d_out, r, scale=r ** -0.5), gates=top_n_gates(T, M, 2, gen, (6,)).to(DEVICE))
    trained = ("x", "bias", "lora_c", "lora_b", "gates")
    up = rnd(T, d_out)

    def amr(dtype):
        t = {k: v.to(dtype) for k, v in master.items()}
        leaves = {k: t[k].requires_grad_(True) for k in trained}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            with use_backend(backend):
                y = lm.lora_amr(t["x"], t["weight"], t["bias"], t["lora_c"], t["lora_d"], t["lora_b"],
                                t["gates"], SCALE)
        (y.double() * up).sum().backward()     # outside the block: the forward's backend runs it
        return y, {k: v.grad for k, v in leaves.items()}, saved, t

    calls = []
    for fn in ("_bwd_triton", "_base_triton"):
        orig = getattr(lm, fn)
        monkeypatch.setattr(lm, fn, lambda *a, _f=orig, _n=fn, **k: calls.append(_n) or _f(*a, **k))

    def plain(dtype):
        """The formula with A_m = C_m D, through plain autograd (which keeps x for backward)."""
        t = {k: v.to(dtype) for k, v in master.items()}
        leaves = {k: t[k].requires_grad_(True) for k in trained}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            A = torch.einsum("mrk,kd->mrd", t["lora_c"], t["lora_d"])
            y = dense_formula(t["x"], t["weight"], t["bias"], A, t["lora_b"], t["gates"], SCALE)
        (y.double() * up).sum().backward()
        grads = {k: v.grad for k, v in leaves.items()}
        grads["gates"] = grads["gates"] * (master["gates"] != 0)          # routing is a constant
        return y, grads, saved

    y_k, g_k, saved, t = amr(torch.float32)
    # Triton: forward base + LoRA, backward LoRA + the transposed base; torch: no kernel at all
    assert calls == (["_base_triton", "_bwd_triton", "_base_triton"] if backend == "triton" else [])
    y_r, g_r, _ = plain(torch.float32)
    y_64, g_64, saved_plain = plain(torch.float64)
    assert_matches_reference(y_k, y_r, y_64, name="y")
    for k in trained:
        assert_matches_reference(g_k[k], g_r[k], g_64[k], name=f"d{k}")
    # what backward keeps: z = D x [T, r'] and the gates besides the weights; never x
    params = {t[k].data_ptr() for k in ("weight", "lora_c", "lora_d", "lora_b")}
    assert all(s.data_ptr() != t["x"].data_ptr() and s.shape != t["x"].shape for s in saved)
    activation_bytes = sum(s.numel() * s.element_size() for s in saved if s.data_ptr() not in params)
    assert activation_bytes == (T * rp + T * M) * 4
    assert any(s.shape == master["x"].shape for s in saved_plain)                # the plain formula keeps x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_amr_is_not_twice_differentiable(backend):
    x, W = torch.randn(20, 24, requires_grad=True), torch.randn(17, 24)
    C, D, B = torch.randn(3, 4, 5, requires_grad=True), torch.randn(5, 24), torch.randn(3, 17, 4)
    g = torch.rand(20, 3)
    with use_backend(backend):
        y = lm.lora_amr(x.to(DEVICE), W.to(DEVICE), None, C.to(DEVICE), D.to(DEVICE), B.to(DEVICE), g.to(DEVICE))
        with pytest.raises(RuntimeError, match="not twice differentiable"):
            torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_compile_fullgraph_on_the_reference():
    """torch.compile(fullgraph=True) traces K2's reference (the dense all-expert form: no data-dependent
    shapes) for token gates, segments and LoRA-AMR, with the eager values."""
    g = torch.Generator().manual_seed(3)
    x, W = torch.randn(6, 24, generator=g), torch.randn(20, 24, generator=g)
    A, B = torch.randn(3, 4, 24, generator=g), torch.randn(3, 20, 4, generator=g)
    C, D = torch.randn(3, 4, 5, generator=g), torch.randn(5, 24, generator=g)
    tok = torch.tensor([[1., 0, 0], [0, .5, .5], [0, 0, 0], [1, 1, 0], [0, 0, 1], [.3, 0, .7]])
    seg = torch.rand(2, 3, generator=g)
    calls = {"tokens": lambda x: lm.lora_mixture(x, W, None, A, B, tok),
             "segments": lambda x: lm.lora_mixture(x, W, None, A, B, seg, segments=2),
             "amr": lambda x: lm.lora_amr(x, W, None, C, D, B, tok)}
    torch._dynamo.reset()
    with use_backend("torch"):
        for name, f in calls.items():
            torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x),
                                       msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Registration and errors
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    inp = make_inputs(T=6, d_in=24, d_out=20, r=4, M=3, top=2, zero_rows=(1,))
    f = {k: v.float().requires_grad_(k != "weight") for k, v in inp.items()}
    torch.library.opcheck(torch.ops.mmts_fast.lora_mixture.default,
                          (f["x"], f["weight"], f["bias"], f["lora_a"], f["lora_b"], f["gates"], SCALE, 0, [], []))
    seg_gates = torch.softmax(torch.randn(2, 3, device=DEVICE), -1).requires_grad_(True)
    torch.library.opcheck(torch.ops.mmts_fast.lora_mixture.default,
                          (f["x"], f["weight"], None, f["lora_a"], f["lora_b"], seg_gates, SCALE, 2, [], []))


def test_opcheck_dequantize():
    bf = pytest.importorskip("bitsandbytes.functional")
    packed, qs = bf.quantize_4bit(torch.randn(20, 24, device=DEVICE), blocksize=64, quant_type="nf4",
                                  compress_statistics=True)
    st = lm.nf4_state(packed, qs)
    torch.library.opcheck(torch.ops.mmts_fast.dequantize_nf4.default,
                          (st.packed, list(st.state), list(st.shape), st.blocksize, st.blocksize2, 0))
    fp4 = bf.quantize_4bit(torch.randn(20, 24, device=DEVICE), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="only NF4 4-bit weights are supported .* got quant_type='fp4'"):
        lm.dequantize_nf4(*fp4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(backend):
    inp = make_inputs(T=6, d_in=24, d_out=20, r=4, M=3, top=2)
    x, w, b, A, B, g = (inp[k].float() for k in ("x", "weight", "bias", "lora_a", "lora_b", "gates"))
    with use_backend(backend):
        with pytest.raises(ValueError, match="gates must be"):
            lm.lora_mixture(x, w, b, A, B, g[:, :2])
        with pytest.raises(ValueError, match="rank mismatch"):
            lm.lora_mixture(x, w, b, A, B[:, :, :3], g)
        with pytest.raises(ValueError, match="d_in mismatch"):
            lm.lora_mixture(x[:, :20], w, b, A, B, g)
        with pytest.raises(ValueError, match="lora_b must be"):
            lm.lora_mixture(x, w, b, A, B[:2], g)
        with pytest.raises(ValueError, match="weight must be"):
            lm.lora_mixture(x, w[:, :10], b, A, B, g)
        with pytest.raises(ValueError, match="bias must be"):
            lm.lora_mixture(x, w, b[:5], A, B, g)
        with pytest.raises(ValueError, match="frozen"):
            lm.lora_mixture(x, w.clone().requires_grad_(True), b, A, B, g)
        with pytest.raises(ValueError, match=r"gates must be \[segments, M\]"):
            lm.lora_mixture(x, w, b, A, B, g, segments=2)
        with pytest.raises(ValueError, match="segments must be"):
            lm.lora_mixture(x, w, b, A, B, g[:2], segments=0)
        with pytest.raises(ValueError, match="lora_c must be"):
            lm.lora_amr(x, w, b, A, torch.zeros(3, 24, device=DEVICE), B, g)
        with pytest.raises(ValueError, match="x must be a floating-point tensor"):
            lm.lora_mixture(x.round().long(), w, b, A, B, g)
        with pytest.raises(ValueError, match="lora_b must be a floating-point tensor"):
            lm.lora_mixture(x, w, b, A, B.long(), g)
        with pytest.raises(ValueError, match="lora_c must be a floating-point tensor"):
            lm.lora_amr(x, w, b, A[:, :, :8].long(), torch.randn(8, 24, device=DEVICE), B, g)


def test_ops_wrappers_are_lazy():
    import os
    import subprocess
    import sys
    code = ("import sys, mmts_fast.ops as o; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'mmts_fast.kernels.lora_mixture' not in sys.modules; "
            "import torch; x = torch.randn(3, 8); A = torch.randn(2, 4, 8); B = torch.randn(2, 6, 4); "
            "g = torch.tensor([[1., 0.], [0., .5], [0., 0.]]); "
            "y = o.lora_mixture(x, torch.randn(6, 8), None, A, B, g); assert y.shape == (3, 6)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MMTS_FAST_BACKEND": "torch"})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_amr_with_no_selected_expert(backend):
    """All gates zero: the LoRA part is constant zero; backward still works and gives zero LoRA grads."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 24, generator=g).to(DEVICE).requires_grad_(True)
    w = torch.randn(16, 24, generator=g).to(DEVICE)
    c = torch.randn(2, 4, 3, generator=g).to(DEVICE).requires_grad_(True)
    d = torch.randn(3, 24, generator=g).to(DEVICE)
    b = torch.randn(2, 16, 4, generator=g).to(DEVICE)
    gates = torch.zeros(5, 2, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = lm.lora_amr(x, w, None, c, d, b, gates)
    y.sum().backward()
    torch.testing.assert_close(y, x @ w.t())
    assert (c.grad == 0).all()
    torch.testing.assert_close(x.grad, torch.ones(5, 16, device=DEVICE) @ w)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every K2 kernel (NF4 dequant, dense and NF4 base matmul, shrink, expand, grouped outer product)
    goes through Triton's real code generator and ptxas (sm_90) in fp32 and bf16."""
    from conftest import DEVICE, compile_for_sm90
    from mmts_fast.kernels import lora_mixture as k2
    if DEVICE == "cuda":
        pytest.skip("compiled for real by the other tests")
    i32 = {p: "*i32" for p in ("rows_ptr", "tstart_ptr", "tend_ptr", "texp_ptr", "eptr_ptr")}
    nf4 = {"q_ptr": "*u8", "w_ptr": "*u8", "absmax_ptr": "*u8",
           **{p: "*fp32" for p in ("code_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr")}}
    f32 = {p: "*fp32" for p in ("u_ptr", "coef_ptr", "small_ptr", "y_ptr")}
    cases = []
    for ptr, code in (("*fp32", 0), ("*bf16", 1)):
        nf4_consts = dict(BLOCKSIZE=64, BLOCKSIZE2=256)
        cases.append(dict(kernel="_nf4_dequant_kernel", ptr=ptr, ptrs=nf4,
                          consts=dict(nf4_consts, CODE=code, BLOCK=k2.DEQUANT_BLOCK)))
        tiles = dict(PREC="ieee", UPCAST=False, BLOCK_T=k2.BLOCK_T, BLOCK_N=k2.BLOCK_N, BLOCK_K=k2.BLOCK_K,
                     BLOCK_R=16, BLOCK_D=k2.BLOCK_D)
        for is_nf4 in (True, False):
            cases.append(dict(kernel="_lora_base_mm", ptr=ptr, ptrs=nf4 if is_nf4 else {},
                              consts=dict(tiles, **nf4_consts, WCODE=code, NF4=is_nf4, NESTED=is_nf4)))
        for block_p in (16, 64):
            for name in ("_lora_shrink", "_lora_expand", "_lora_grouped_outer"):
                out = {"u_ptr" if name == "_lora_shrink" else "out_ptr": "*fp32"}
                cases.append(dict(kernel=name, ptr=ptr, ptrs={**i32, **f32, **out},
                                  consts=dict(tiles, BLOCK_P=block_p)))
    out = compile_for_sm90("mmts_fast.kernels.lora_mixture", cases)
    assert out.count(" ok") == len(cases), out
