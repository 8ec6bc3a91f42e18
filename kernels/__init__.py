"""Triton kernels of eefast, installed as ``eefast.kernels``. They import only torch and triton."""
