"""mmts_fast: Triton kernels and a PyTorch runtime for mixture-of-experts time-series forecasting.

Importing the package imports neither Triton nor CUDA; kernels load on first use.
"""
from mmts_fast.backend import use_backend
from mmts_fast import ops

__version__ = "0.1.0"
__all__ = ["apply_dlora", "apply_fast_attention", "ops", "use_backend", "__version__"]


def __getattr__(name):   # heavier entry points load on first use, keeping `import mmts_fast` light
    if name == "apply_dlora":
        from mmts_fast.nn.lora import apply_dlora
        return apply_dlora
    if name == "apply_fast_attention":
        from mmts_fast.nn.fast_attention import apply_fast_attention
        return apply_fast_attention
    if name in ("llm", "models", "text", "data", "export", "kernels", "nn"):   # mmts_fast.llm.load_backbone, ...
        import importlib
        return importlib.import_module(f"mmts_fast.{name}")
    raise AttributeError(f"module 'mmts_fast' has no attribute {name!r}")
