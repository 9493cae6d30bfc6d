"""SANA in plain PyTorch: Linear DiT, DC-AE, Gemma-2 text encoding, samplers, pipeline.

Importable without ComfyUI and without Triton.
"""
from .checkpoints import CheckpointError
from .transformer import load_transformer
from .autoencoder import load_autoencoder
from .text_encoder import load_text_encoder
from . import samplers
from .pipeline import SanaPipeline
