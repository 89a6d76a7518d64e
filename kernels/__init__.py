"""Triton kernels of hybridpar_ext, installed as ``hybridpar_ext.kernels``.

Each module holds @triton.jit kernels and launchers that take and return tensors; they
import torch and triton only and know nothing of the package around them.
"""
