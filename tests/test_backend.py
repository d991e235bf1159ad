"""The package-wide backend switch (mmts_fast.backend)."""
from types import SimpleNamespace

import pytest
import torch

from mmts_fast import backend, use_backend


def cuda_tensor(dtype):   # resolve() reads only .is_cuda and .dtype
    return SimpleNamespace(is_cuda=True, dtype=dtype)


def test_auto_runs_triton_on_cuda_but_not_for_fp64(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert backend.resolve(torch.zeros(1)) == "torch"                         # CPU tensors: the reference
    assert backend.resolve(cuda_tensor(torch.float32)) == "triton"
    assert backend.resolve(cuda_tensor(torch.bfloat16), None) == "triton"
    assert backend.resolve(cuda_tensor(torch.float64)) == "torch"            # the kernels compute in fp32
    assert backend.resolve(cuda_tensor(torch.float32), cuda_tensor(torch.float64)) == "torch"
    with use_backend("torch"):
        assert backend.resolve(cuda_tensor(torch.float32)) == "torch"
        with use_backend("triton"):                                          # nested: the innermost wins
            assert backend.resolve(cuda_tensor(torch.float64)) == "triton"   # forced: the op refuses fp64 itself
        assert backend.requested() == "torch"


def test_env_var_and_unknown_names(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "Torch ")
    assert backend.requested() == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backend.requested()
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("gpu"):
            pass
