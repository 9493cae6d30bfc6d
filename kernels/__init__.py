"""Triton kernels for SANA's hot paths, each beside a plain PyTorch twin (imported as sana_core.kernels)."""
