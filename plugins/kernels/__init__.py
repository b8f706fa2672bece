"""Triton kernels of the TensorRT plugins, with their PyTorch references."""
