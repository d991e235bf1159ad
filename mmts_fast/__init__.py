"""mmts_fast: Triton kernels and a PyTorch runtime for mixture-of-experts time-series forecasting.

Importing the package imports neither Triton nor CUDA; kernels load on first use.
"""
from mmts_fast.backend import use_backend
from mmts_fast import ops

__version__ = "0.1.0"
__all__ = ["ops", "use_backend", "__version__"]
