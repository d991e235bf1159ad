"""Triton kernels, one file per op (installed as ``mmts_fast.kernels``)."""
