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


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test when the folder is absent."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data not present: {p}")
    return p
