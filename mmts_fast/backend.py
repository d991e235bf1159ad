"""One backend switch for every op in the package.

``auto`` (the default) runs the Triton kernels on CUDA tensors and the eager PyTorch reference
everywhere else, and for fp64 (the kernels compute in fp32). Force either with the environment variable ``MMTS_FAST_BACKEND=triton|torch|auto``
or, for a block of code, with the context manager::

    with mmts_fast.use_backend("triton"):   # e.g. on CPU tensors under TRITON_INTERPRET=1
        y = mmts_fast.ops.expert_heads(...)

Nothing here imports Triton or touches CUDA: availability is checked lazily, on first use.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MMTS_FAST_BACKEND"

_local = threading.local()


def _check(name: str) -> str:
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} "
                         f"(argument or ${ENV_VAR})")
    return name


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested() -> str:
    """The backend asked for: the innermost ``use_backend`` block, else the environment, else auto."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check(os.environ.get(ENV_VAR, "auto"))


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``"triton"``, ``"torch"`` or ``"auto"`` inside a ``with`` block (thread-local, nestable)."""
    name = _check(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def resolve(*tensors) -> str:
    """Which implementation runs an op on these tensors: ``"triton"`` or ``"torch"``.

    A forced ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (set before Triton is imported);
    anything else is an error that says so, rather than a silent fall-back.
    """
    name = requested()
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if name == "torch":
        return "torch"
    if name == "auto":   # fp64 stays on the reference: the kernels compute in fp32 (forced triton refuses it)
        fp64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
        return "triton" if on_cuda and not fp64 and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend 'triton' was forced but the triton package is not installed")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the "
                           "environment before the first import of triton")
    return "triton"
