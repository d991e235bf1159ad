"""K3 (grouped-query attention): Triton kernels against the eager reference, an fp64 reference and
PyTorch's ``scaled_dot_product_attention(..., enable_gqa=True)``.

On CPU-only machines the Triton path runs under TRITON_INTERPRET=1 (set in conftest), so shapes stay
small. Every case: fresh random inputs, poisoned outputs, the output and every gradient (q, k, v).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import DEVICE, TOL, assert_matches_reference
from mmts_fast.kernels import _common
from mmts_fast import ops, use_backend
from mmts_fast.kernels import gqa_attention as ga

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def make_inputs(B, Hq, Hkv, Lq, Lk, D, *, masked=False, noncontig=False, seed=0):
    """fp64 q, k, v (noncontig: each a transposed [B, L, H, D] tensor, as projections give them), an
    optional random key padding mask [B, Lk] (True = keep; the last key always kept) and an upstream grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(B_, H, L):
        if noncontig:
            return torch.randn(B_, L, H, D, generator=g, dtype=torch.float64).to(DEVICE).transpose(1, 2)
        return torch.randn(B_, H, L, D, generator=g, dtype=torch.float64).to(DEVICE)

    q, k, v = rnd(B, Hq, Lq), rnd(B, Hkv, Lk), rnd(B, Hkv, Lk)
    mask = None
    if masked:
        mask = (torch.rand(B, Lk, generator=g) > 0.3).to(DEVICE)
        mask[:, -1] = True
    dout = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64).to(DEVICE)
    return dict(q=q, k=k, v=v, mask=mask, dout=dout)


def cast(t, dtype):
    """t in dtype with t's strides kept (a transposed input stays transposed)."""
    if t.is_contiguous():
        return t.to(dtype)
    return t.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)


def run(impl, inp, dtype, causal, scale=None):
    """Forward + backward through 'triton' / 'torch' (the reference) / 'sdpa'; returns (out, grads)."""
    leaves = {n: cast(inp[n], dtype).detach().requires_grad_(True) for n in "qkv"}
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    if impl == "sdpa":
        Lq, Lk = q.shape[2], k.shape[2]
        allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril(diagonal=Lk - Lq) if causal else \
            torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE)
        if inp["mask"] is not None:
            allowed = allowed[None, None] & inp["mask"][:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)
    else:
        with use_backend(impl):
            out = ga.gqa_attention(q, k, v, causal=causal, key_padding_mask=inp["mask"], scale=scale)
    (out.double() * inp["dout"]).sum().backward()
    return out, {n: t.grad for n, t in leaves.items()}


def check_case(B, Hq, Hkv, Lq, Lk, D, *, causal=False, masked=False, dtype=torch.float32, noncontig=False,
               scale=None, seed=0):
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, D, masked=masked, noncontig=noncontig, seed=seed)
    out_k, g_k = run("triton", inp, dtype, causal, scale)
    out_r, g_r = run("torch", inp, dtype, causal, scale)
    out_64, g_64 = run("torch", inp, torch.float64, causal, scale)
    assert out_k.dtype == dtype and out_k.shape == (B, Hq, Lq, D)
    assert_matches_reference(out_k, out_r, out_64, name="out")
    for n in "qkv":
        assert g_k[n] is not None and g_k[n].dtype == dtype, f"no / wrong gradient for {n}"
        assert_matches_reference(g_k[n], g_r[n], g_64[n], name=f"d{n}")
    if dtype == torch.float32:   # and PyTorch's own attention at fp32
        out_s, g_s = run("sdpa", inp, dtype, causal, scale)
        torch.testing.assert_close(out_k, out_s, **TOL[dtype])
        for n in "qkv":
            torch.testing.assert_close(g_k[n], g_s[n], **TOL[dtype], msg=lambda m: f"d{n} vs sdpa: {m}")
    return inp, out_k, g_k


# The odd shapes: 9 query heads on 3 kv heads, 7 queries on 37 keys (packed: one tile per group).
ODD = dict(B=2, Hq=9, Hkv=3, Lq=7, Lk=37)


@pytest.mark.parametrize("D", [48, 64])
@pytest.mark.parametrize("causal, masked", [(False, False), (True, True)])
def test_odd_shapes(D, causal, masked):
    check_case(**ODD, D=D, causal=causal, masked=masked, seed=D)


def test_odd_shape_causal_only_and_masked_only_custom_scale():
    check_case(**ODD, D=48, causal=True, seed=1)
    check_case(**ODD, D=64, masked=True, scale=0.3, seed=2)


@pytest.mark.parametrize("pack", [True, False])
def test_causal_self_attention(monkeypatch, pack):
    """Lq = Lk = 33 in tiles of 32 keys. Packed: the group's 99 rows in 64-row tiles that cross head
    boundaries. Per head: 32-row tiles, two per head, with causal tile skipping in every kernel."""
    monkeypatch.setattr(ga, "BLOCK_N", 32)
    monkeypatch.setattr(ga, "BLOCK_M", 64 if pack else 32)
    monkeypatch.setattr(ga, "FORCE_PACK", pack)
    t = ga._tiles(33, 3, 64, torch.bfloat16)
    assert (t["PACK"], t["BLOCK_M"], t["BLOCK_N"]) == (pack, 64 if pack else 32, 32)
    check_case(B=2, Hq=9, Hkv=3, Lq=33, Lk=33, D=64, causal=True, seed=3)
    check_case(B=1, Hq=9, Hkv=3, Lq=33, Lk=33, D=64, causal=True, dtype=torch.bfloat16, seed=4)


def test_tile_choice():
    """Small Lq packs the group (fewer tiles); long Lq keeps one head per tile."""
    for Lq, dtype, pack in [(1, torch.float32, True), (7, torch.bfloat16, True), (33, torch.bfloat16, True),
                            (33, torch.float32, False), (64, torch.bfloat16, False), (862, torch.float32, False)]:
        t = ga._tiles(Lq, 3, 64, dtype)
        assert t["PACK"] == pack, (Lq, dtype)
        assert t["BLOCK_M"] >= 16 and t["BLOCK_D"] == 64
    assert ga._tiles(1, 3, 48, torch.float32)["BLOCK_M"] == 16 and ga._tiles(1, 3, 48, torch.float32)["BLOCK_D"] == 64
    assert ga._tiles(5, 3, 100, torch.bfloat16)["BLOCK_D"] == 128


def test_decode_single_query():
    """Lq = 1 (decode step): the 3 heads of a group share one 16-row tile."""
    check_case(**{**ODD, "Lq": 1}, D=48, causal=True, masked=True, seed=4)


def test_non_contiguous_inputs():
    """q, k and v are transposed [B, L, H, D] tensors (what the projections give), never copied."""
    inp, _, _ = check_case(**ODD, D=48, causal=True, masked=True, noncontig=True, seed=5)
    assert not inp["q"].is_contiguous() and not inp["k"].is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    check_case(**ODD, D=48, causal=True, masked=True, dtype=dtype, seed=6)


@pytest.mark.parametrize("D", [16, 80, 128])
def test_head_dims_and_multi_query(D):
    """D at both ends of the range and a non-power of two; one kv head for 4 query heads (MQA)."""
    check_case(B=1, Hq=4, Hkv=1, Lq=5, Lk=19, D=D, causal=True, masked=True, seed=7)


def test_multi_tile_unpacked():
    """More queries and keys than one tile in each loop, Lq > Lk causal (the first rows see nothing)."""
    check_case(B=1, Hq=4, Hkv=2, Lq=70, Lk=45, D=24, causal=True, masked=True, seed=8)
    check_case(B=1, Hq=2, Hkv=2, Lq=66, Lk=130, D=24, causal=True, seed=9)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.integers(1, 4), Lq=st.integers(1, 40),
       Lk=st.integers(1, 70), D=st.integers(4, 128), data=st.data())
def test_hypothesis_sweep(B, Hkv, G, Lq, Lk, D, data):
    check_case(B, Hkv * G, Hkv, Lq, Lk, D, causal=data.draw(st.booleans()), masked=data.draw(st.booleans()),
               noncontig=data.draw(st.booleans()), seed=data.draw(st.integers(0, 1000)))


def test_fully_masked_rows_are_zero_with_zero_grads():
    """Batch 1 pads every key; causal with Lq > Lk leaves the first Lq - Lk queries without keys."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 20, 16, 32
    inp = make_inputs(B, Hq, Hkv, Lq, Lk, D, seed=10)
    inp["mask"] = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    inp["mask"][1] = False
    out_k, g_k = run("triton", inp, torch.float32, True)
    out_r, g_r = run("torch", inp, torch.float32, True)
    out_64, g_64 = run("torch", inp, torch.float64, True)
    out_s, g_s = run("sdpa", inp, torch.float64, True)          # PyTorch's math SDPA: also 0 there
    empty = torch.zeros(B, Lq, dtype=torch.bool, device=DEVICE)
    empty[1] = True
    empty[:, : Lq - Lk] = True
    assert (out_k[empty[:, None, :, None].expand_as(out_k)] == 0).all()
    assert (g_k["q"][empty[:, None, :, None].expand_as(out_k)] == 0).all()
    assert (g_k["k"][1] == 0).all() and (g_k["v"][1] == 0).all()
    assert_matches_reference(out_k, out_r, out_64, name="out")
    torch.testing.assert_close(out_64, out_s)
    for n in "qkv":
        assert_matches_reference(g_k[n], g_r[n], g_64[n], name=f"d{n}")
        torch.testing.assert_close(g_64[n], g_s[n])
    _, lse = torch.ops.mmts_fast.gqa_attention(inp["q"].float(), inp["k"].float(), inp["v"].float(),
                                                inp["mask"], True, D ** -0.5)
    assert torch.isinf(lse[empty[:, None, :].expand_as(lse)]).all()


def test_logsumexp():
    """The saved logsumexp is the natural-log logsumexp of the visible scaled scores."""
    inp = make_inputs(**ODD, D=48, masked=True, seed=11)
    q, k, v = (inp[n].float() for n in "qkv")
    _, lse = torch.ops.mmts_fast.gqa_attention(q, k, v, inp["mask"], True, 0.2)
    s = (inp["q"] @ inp["k"].repeat_interleave(3, dim=1).transpose(-1, -2)) * 0.2
    allowed = torch.ones(7, 37, dtype=torch.bool, device=DEVICE).tril(30) & inp["mask"][:, None, None, :]
    want = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(lse.double(), want, **TOL[torch.float32])


def test_reference_equals_sdpa_and_llama_eager():
    """The fp64 reference against SDPA and Hugging Face's Llama eager attention (repeat_kv + additive mask)."""
    inp = make_inputs(**ODD, D=48, masked=True, seed=12)
    q, k, v, mask = inp["q"], inp["k"], inp["v"], inp["mask"]
    ref = ga.gqa_attention_reference(q, k, v, causal=True, key_padding_mask=mask)
    out_s, _ = run("sdpa", inp, torch.float64, True)
    torch.testing.assert_close(ref, out_s.detach())
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    allowed = torch.ones(7, 37, dtype=torch.bool, device=DEVICE).tril(30) & mask[:, None, None, :]
    additive = torch.zeros(allowed.shape, dtype=torch.float64, device=DEVICE).masked_fill(
        ~allowed, torch.finfo(torch.float64).min)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    out_l, _ = llama.eager_attention_forward(module, q, k, v, additive, scaling=48 ** -0.5)
    torch.testing.assert_close(ref, out_l.transpose(1, 2))


def test_opcheck():
    inp = make_inputs(B=1, Hq=4, Hkv=2, Lq=5, Lk=20, D=16, masked=True, seed=13)
    q, k, v = (inp[n].float().requires_grad_(True) for n in "qkv")
    torch.library.opcheck(torch.ops.mmts_fast.gqa_attention.default, (q, k, v, inp["mask"], True, 0.25))
    torch.library.opcheck(torch.ops.mmts_fast.gqa_attention.default, (q, k, v, None, False, 0.25))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(backend):
    q = torch.randn(2, 9, 7, 48, device=DEVICE)
    k = torch.randn(2, 3, 37, 48, device=DEVICE)
    mask = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"Hq=9 query heads must be a multiple of Hkv=4"):
            ga.gqa_attention(q, k.repeat(1, 2, 1, 1)[:, :4], k.repeat(1, 2, 1, 1)[:, :4])
        with pytest.raises(ValueError, match="head dim mismatch: q has D=48, k and v have D=32"):
            ga.gqa_attention(q, k[..., :32], k[..., :32])
        with pytest.raises(ValueError, match="k and v must have the same shape"):
            ga.gqa_attention(q, k, k[..., :32])
        with pytest.raises(ValueError, match=r"key_padding_mask must be \[B=2, Lk=37\]"):
            ga.gqa_attention(q, k, k, key_padding_mask=mask[:, :36])
        with pytest.raises(ValueError, match="key_padding_mask must be bool"):
            ga.gqa_attention(q, k, k, key_padding_mask=mask.float())
        with pytest.raises(ValueError, match="head dim D=160 is not supported"):
            big = torch.randn(2, 3, 37, 160, device=DEVICE)
            ga.gqa_attention(torch.randn(2, 9, 7, 160, device=DEVICE), big, big)
        with pytest.raises(ValueError, match="must be 4-d"):
            ga.gqa_attention(q[0], k, k)
        with pytest.raises(ValueError, match="batch mismatch"):
            ga.gqa_attention(q[:1], k, k)
        with pytest.raises(ValueError, match="share a dtype"):
            ga.gqa_attention(q, k.double(), k.double())
        with pytest.raises(ValueError, match="q must be a floating-point tensor"):
            ga.gqa_attention(q.long(), k.long(), k.long())


def test_ops_wrapper():
    inp = make_inputs(**ODD, D=16, masked=True, seed=14)
    with use_backend("torch"):
        out = ops.gqa_attention(inp["q"], inp["k"], inp["v"], causal=True, key_padding_mask=inp["mask"])
    torch.testing.assert_close(out, ga.gqa_attention_reference(inp["q"], inp["k"], inp["v"], causal=True,
                                                               key_padding_mask=inp["mask"]))


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross", [False, True])
def test_gqattention_module(cross):
    from mmts_fast.nn.attention import GQAttention
    torch.manual_seed(15)
    d_model, d_ctx = 40, 24
    mod = GQAttention(d_model, n_heads=6, n_kv_heads=2, head_dim=16,
                      d_context=d_ctx if cross else None).to(DEVICE)
    x = torch.randn(2, 9, d_model, device=DEVICE)
    ctx = torch.randn(2, 21, d_ctx, device=DEVICE) if cross else None
    S = 21 if cross else 9
    mask = torch.ones(2, S, dtype=torch.bool, device=DEVICE)
    mask[1, S // 2:] = False
    results = {}
    for be in ("triton", "torch"):
        mod.zero_grad()
        with use_backend(be):
            y = mod(x, context=ctx, key_padding_mask=mask, causal=not cross)
        assert y.shape == (2, 9, d_model)
        y.square().sum().backward()
        results[be] = (y.detach(), {n: p.grad.clone() for n, p in mod.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], **TOL[torch.float32])
    for n, gr in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][n], gr, **TOL[torch.float32], msg=lambda m: f"{n}: {m}")
    assert mod.q_proj.out_features == 6 * 16 and mod.k_proj.out_features == 2 * 16
    assert mod.k_proj.in_features == (d_ctx if cross else d_model)


def test_gqattention_module_errors():
    from mmts_fast.nn.attention import GQAttention
    with pytest.raises(ValueError, match="multiple of"):
        GQAttention(32, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"head_dim=144 \(d_model=576 / n_heads=4\) is not supported"):
        GQAttention(576, n_heads=4)          # at construction, not at the first forward
    with pytest.raises(ValueError, match="head_dim=0"):
        GQAttention(32, n_heads=4, head_dim=0)
    mod = GQAttention(32, n_heads=4, n_kv_heads=2, d_context=20)
    with pytest.raises(ValueError, match="context"):
        mod(torch.randn(1, 3, 32))


# ---------------------------------------------------------------------------------------------
# The benchmark script, tiny and in-process (the k3 row runs the reference on CPU under auto)
# ---------------------------------------------------------------------------------------------
def test_bench_tiny(tmp_path):
    import importlib.util
    import json
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("_bench_gqa", REPO / "bench" / "bench_gqa_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gqa.jsonl"
    rows = bench.main(["--shapes", "tiny", "--out", str(out), "--device", "cpu"])
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    assert len(lines) == len(rows) > 0
    for r in lines:
        assert "error" not in r, r
        for key in ("impl", "mode", "device", "dtype", "B", "Hq", "Hkv", "Lq", "Lk", "D", "causal", "median_ms",
                    "tflops"):
            assert key in r, key
        fl = 4 * r["B"] * r["Hq"] * r["Lq"] * r["Lk"] * r["D"] / (2 if r["causal"] else 1)
        assert r["model_flops"] == (fl if r["mode"] == "fwd" else 3.5 * fl)
    assert {r["impl"] for r in lines} == {"k3", "reference", "sdpa_math"}
    assert math.isclose(lines[0]["tflops"], lines[0]["model_flops"] / lines[0]["median_ms"] / 1e9)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every K3 kernel through Triton's real code generator and ptxas (sm_90), packed bf16 (D=64, Lq=7)
    and per-head fp32 (D=128, Lq=512), causal and masked, unit strides specialised as a launch does."""
    from conftest import compile_for_sm90
    if DEVICE == "cuda":
        pytest.skip("compiled for real by the other tests")
    unit = dict.fromkeys(("sqd", "skd", "svd", "sod", "sdd", "sgd", "swd", "smn"), 1)
    cases = []
    for dtype, D, Lq in [(torch.bfloat16, 64, 7), (torch.float32, 128, 512)]:
        t = ga._tiles(Lq, 3, D, dtype)
        consts = dict(unit, CAUSAL=True, HAS_MASK=True, PREC="ieee", UPCAST=False,
                      **{k: v for k, v in t.items() if k != "num_warps"})
        for name in ("_gqa_fwd", "_gqa_bwd_dq", "_gqa_bwd_dkdv", "_gqa_bwd_delta"):
            cases.append(dict(kernel=name, consts=consts, num_warps=t["num_warps"],
                              ptr="*bf16" if dtype == torch.bfloat16 else "*fp32",
                              ptrs={"mask_ptr": "*u8", "lse_ptr": "*fp32", "delta_ptr": "*fp32"},
                              scalars={"qk_scale": "fp32", "scale": "fp32"}))
    out = compile_for_sm90("mmts_fast.kernels.gqa_attention", cases)
    assert out.count(" ok") == len(cases), out
