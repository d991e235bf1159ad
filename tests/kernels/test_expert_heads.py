"""K1 (fused multi-expert linear heads): Triton kernels against the eager reference.

On CPU-only machines the Triton path runs under TRITON_INTERPRET=1 (set in conftest), so shapes stay
small. Every case: fresh random inputs, odd sizes, poisoned outputs, every output and gradient.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import DEVICE, assert_matches_reference, nan_strided
from mmts_fast.kernels import _common
from mmts_fast import use_backend
from mmts_fast.kernels import expert_heads as eh

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def make_inputs(B, L, C, H, M, *, gate="bcm", revin=False, film=False, dtype=torch.float32,
                noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)

    if noncontig:   # channels-first storage, transposed: x[b, l, c] has stride (L*C, 1, L)
        x = rnd(B, C, L).transpose(1, 2) * 3.0 + 1.5
    else:
        x = rnd(B, L, C) * 3.0 + 1.5
    inp = dict(
        x=x,
        weight=rnd(M, H, L, scale=L ** -0.5),
        bias=rnd(M, H, scale=0.1),
        gates=torch.softmax(rnd(B, C, M) if gate == "bcm" else rnd(B, M), dim=-1),
    )
    if revin:
        inp["revin_weight"] = 1.0 + rnd(C, scale=0.2)
        inp["revin_bias"] = rnd(C, scale=0.2)
    if film:
        inp["film_gamma"] = 1.0 + rnd(B, 1, C, scale=0.3)    # broadcast over the horizon
        inp["film_beta"] = rnd(H, C, scale=0.3)               # broadcast over the batch
    out = {}
    for k, v in inp.items():   # keep x's strides when casting
        out[k] = v.to(dtype) if k == "x" else v.to(dtype).contiguous()
        if noncontig and k != "x":   # every parameter a stride-2 view too (NaN between its values)
            out[k] = nan_strided(out[k])
    return out


def run(backend, inp, windows, revin, return_experts, upstream, dtype=None):
    """Forward and backward through one backend; returns (outputs, grads) dicts."""
    leaves = {}
    for k, v in inp.items():
        t = v.to(dtype) if dtype is not None else v
        if k == "x" and dtype is not None and inp["x"].stride()[1] == 1 and inp["x"].dim() == 3:
            t = inp["x"].transpose(1, 2).contiguous().to(dtype).transpose(1, 2)   # keep layout
        leaves[k] = t.detach().requires_grad_(True)
    with use_backend(backend):
        out = eh.expert_heads(leaves["x"], leaves["weight"], leaves["bias"], leaves["gates"], windows,
                              revin=revin, revin_weight=leaves.get("revin_weight"),
                              revin_bias=leaves.get("revin_bias"), film_gamma=leaves.get("film_gamma"),
                              film_beta=leaves.get("film_beta"), return_experts=return_experts)
    outs = dict(zip(("y", "experts"), out)) if return_experts else {"y": out}
    loss = sum((o.double() * upstream[k]).sum() for k, o in outs.items())
    loss.backward()
    return outs, {k: v.grad for k, v in leaves.items()}


def check_case(B, L, C, H, windows, *, gate="bcm", revin=False, film=False, return_experts=False,
               dtype=torch.float32, noncontig=False, seed=0):
    M = len(windows)
    inp = make_inputs(B, L, C, H, M, gate=gate, revin=revin, film=film, dtype=dtype,
                      noncontig=noncontig, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = {"y": torch.randn(B, H, C, generator=g, dtype=torch.float64).to(DEVICE),
                "experts": torch.randn(B, M, H, C, generator=g, dtype=torch.float64).to(DEVICE)}
    out_k, grad_k = run("triton", inp, windows, revin, return_experts, upstream)
    out_r, grad_r = run("torch", inp, windows, revin, return_experts, upstream)
    out_64, grad_64 = run("torch", inp, windows, revin, return_experts, upstream, dtype=torch.float64)
    for k in out_64:
        assert out_k[k].dtype == dtype
        assert_matches_reference(out_k[k], out_r[k], out_64[k], name=k)
    for k in grad_64:
        assert grad_k[k] is not None, f"no gradient for {k}"
        assert_matches_reference(grad_k[k], grad_r[k], grad_64[k], name=f"d{k}")
    # weights left of each expert's window get exactly zero gradient
    for m, w in enumerate(windows):
        assert (grad_k["weight"][m, :, : L - w] == 0).all()


# The odd shape: L=37, H=19, C=3, M=3 with windows 37/20/16.
ODD = dict(B=2, L=37, C=3, H=19, windows=(37, 20, 16))


@pytest.mark.parametrize("gate", ["bcm", "bm"])
@pytest.mark.parametrize("noncontig", [False, True])
def test_plain(gate, noncontig):
    check_case(**ODD, gate=gate, noncontig=noncontig)


@pytest.mark.parametrize("gate", ["bcm", "bm"])
def test_revin_film_experts(gate):
    check_case(**ODD, gate=gate, revin=True, film=True, return_experts=True, noncontig=True)


def test_revin_only_and_film_only():
    check_case(**ODD, revin=True, seed=3)
    check_case(**ODD, film=True, return_experts=True, seed=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    check_case(**ODD, revin=True, film=True, return_experts=True, dtype=dtype, seed=5)


def test_multi_tile_shapes():
    """More rows, horizon and lookback than one 32-tile, so every loop runs more than once."""
    check_case(B=3, L=71, C=13, H=45, windows=(71, 50, 33, 17), revin=True, seed=7)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(2, 40), C=st.integers(1, 4), H=st.integers(1, 35),
       data=st.data())
def test_hypothesis_sweep(B, L, C, H, data):
    M = data.draw(st.integers(1, 4))
    windows = tuple(data.draw(st.lists(st.integers(1, L), min_size=M, max_size=M)))
    check_case(B, L, C, H, windows, gate=data.draw(st.sampled_from(["bcm", "bm"])),
               revin=data.draw(st.booleans()), film=data.draw(st.booleans()),
               return_experts=data.draw(st.booleans()), noncontig=data.draw(st.booleans()),
               seed=data.draw(st.integers(0, 1000)))


@pytest.mark.parametrize("windows", [(37, 20, 16), (37, 37, 37)])
@pytest.mark.parametrize("H, return_experts", [(19, True), (19, False), (40, False)])
def test_reference_equals_per_expert_loop(H, return_experts, windows):
    """The packed reference against the spec written literally: one matmul per expert window.
    H=19 uses the expert-output form (sum w > M*H), H=40 the gate-scaled-input form; equal windows
    (MoLE) take the no-mask / no-gather branches."""
    B, L, C = 2, 37, 3
    inp = make_inputs(B, L, C, H, 3, revin=True, film=True, dtype=torch.float64)
    out = eh.expert_heads_reference(inp["x"], inp["weight"], inp["bias"], inp["gates"], windows, revin=True,
                                    revin_weight=inp["revin_weight"], revin_bias=inp["revin_bias"],
                                    film_gamma=inp["film_gamma"], film_beta=inp["film_beta"],
                                    return_experts=return_experts)
    y, e = out if return_experts else (out, None)
    x = inp["x"]
    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
    xh = (x - mean) / std * inp["revin_weight"] + inp["revin_bias"]
    z = 0
    for m, w in enumerate(windows):
        ym = torch.einsum("hw,bwc->bhc", inp["weight"][m, :, L - w:], xh[:, L - w:]) + inp["bias"][m][:, None]
        if e is not None:
            torch.testing.assert_close(e[:, m], ym)
        z = z + inp["gates"][:, None, :, m] * ym
    u = inp["film_gamma"] * z + inp["film_beta"]
    want = (u - inp["revin_bias"]) / (inp["revin_weight"] + 1e-10) * std + mean
    torch.testing.assert_close(y, want)


def test_opcheck():
    inp = make_inputs(2, 20, 3, 17, 2, revin=True, film=True)
    args = (inp["x"], inp["weight"], inp["bias"], inp["gates"], [20, 16], True, inp["revin_weight"],
            inp["revin_bias"], 1e-5, inp["film_gamma"], inp["film_beta"], True, True)
    for a in args:
        if isinstance(a, torch.Tensor):
            a.requires_grad_(True)
    torch.library.opcheck(torch.ops.mmts_fast.expert_heads.default, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(backend):
    inp = make_inputs(2, 20, 3, 7, 2)
    x, w, b, g = inp["x"], inp["weight"], inp["bias"], inp["gates"]
    with use_backend(backend):
        with pytest.raises(ValueError, match="window 25 but the lookback is L=20"):
            eh.expert_heads(x, w, b, g, (20, 25))
        with pytest.raises(ValueError, match="2 experts"):
            eh.expert_heads(x, w, b, g, (20,))
        with pytest.raises(ValueError, match="gates must be"):
            eh.expert_heads(x, w, b, g[:, :2], (20, 10))
        with pytest.raises(ValueError, match="weight must be"):
            eh.expert_heads(x[:, :10], w, b, g)
        with pytest.raises(ValueError, match="does not broadcast"):
            eh.expert_heads(x, w, b, g, film_gamma=torch.ones(5, device=x.device))
        with pytest.raises(ValueError, match="does not broadcast"):    # broadcasts, but to more dims
            eh.expert_heads(x, w, b, g, film_beta=torch.ones(1, 1, 1, 1, device=x.device))
        with pytest.raises(ValueError, match="windows must be integers"):
            eh.expert_heads(x, w, b, g, (20, 9.5))
        with pytest.raises(ValueError, match="x must be a floating-point tensor"):
            eh.expert_heads(x.round().long(), w, b, g)       # would be an integer matmul, weights truncated
        with pytest.raises(ValueError, match="gates must be a floating-point tensor"):
            eh.expert_heads(x, w, b, (g > 0.5).int())
    if backend == "triton":   # the kernels compute in fp32: fp64 is the reference's alone
        with use_backend(backend), pytest.raises(ValueError, match="Triton path takes fp32/bf16/fp16"):
            eh.expert_heads(x.double(), w.double(), b.double(), g.double())


def test_import_does_not_load_triton():
    import subprocess
    import sys
    code = "import sys, mmts_fast; assert 'triton' not in sys.modules, 'triton imported'; " \
           "import torch; assert not torch.cuda.is_initialized(); " \
           "assert callable(mmts_fast.llm.load_backbone) and mmts_fast.models.LeMoLE"   # subpackages on first use
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every K1 kernel goes through Triton's real code generator and ptxas (sm_90), fp32 and bf16,
    with every optional feature on (the interpreter alone never compiles them)."""
    from conftest import DEVICE, compile_for_sm90
    from mmts_fast.kernels import expert_heads as k1
    if DEVICE == "cuda":
        pytest.skip("compiled for real by the other tests")
    f32 = ("mean_ptr", "std_ptr", "z_ptr", "dx_ptr", "dgp_ptr", "dw_ptr", "db_ptr")
    cases = []
    for ptr, prec in (("*fp32", "ieee"), ("*fp32", "tf32"), ("*bf16", "ieee")):
        for name in ("_expert_heads_fwd", "_expert_heads_bwd_dx", "_expert_heads_bwd_dw"):
            consts = dict(PREC=prec, UPCAST=False, BLOCK_N=k1.BLOCK_N, BLOCK_H=k1.BLOCK_H, BLOCK_K=k1.BLOCK_K)
            cases.append(dict(kernel=name, consts=consts, ptr=ptr,
                              ptrs={**{p: "*fp32" for p in f32}, "starts_ptr": "*i32"}, scalars={}))
    out = compile_for_sm90("mmts_fast.kernels.expert_heads", cases)
    assert out.count(" ok") == len(cases), out
