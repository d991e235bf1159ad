"""What every kernel file shares: output allocation (poisoned in tests), the ``tl.dot`` precision
choice, and the interpreter's bf16 work-around."""
from __future__ import annotations

import torch
from torch import Tensor

from mmts_fast import backend

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - platforms without triton
    HAS_TRITON = False

POISON = False  # tests set this: outputs start as NaN, so an element a kernel never writes fails


def require_float(op: str, **tensors) -> None:
    """ValueError naming the first tensor that is not floating point (an int tensor would otherwise
    turn the eager path's matmuls into integer ones, with the weights truncated)."""
    for name, t in tensors.items():
        if isinstance(t, Tensor) and not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {t.dtype}")


def alloc(*shape, like: Tensor, dtype=None) -> Tensor:
    """``torch.empty`` on ``like``'s device (NaN-filled when ``POISON``)."""
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def dot_precision(x: Tensor) -> str:
    """``tl.dot`` input precision for fp32 tensors: TF32 where PyTorch's matmuls allow it, else IEEE."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast_dot(*tensors: Tensor) -> bool:
    """Multiply low-precision tiles in fp32 under the Triton interpreter (its bf16 ``tl.dot`` is wrong)."""
    return backend.interpreter_enabled() and any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)


if HAS_TRITON:

    @triton.jit
    def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b. UPCAST: multiply in fp32 (the Triton interpreter's bf16 dot is wrong; bf16
        products are exact in fp32, so this is what the tensor cores compute with fp32 accumulation)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PREC)
