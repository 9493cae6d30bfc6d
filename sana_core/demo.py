"""Tiny random-weight model files in the real formats, so that everything runs on a fresh
machine with no downloads (the README's main job, the tests). They make noise images:
real images need the real model files (see README)."""
from pathlib import Path

DEMO_CAPTION_DIM = 64  # hidden size of the tiny Gemma-2, and so the DiT's caption width


def write_demo_transformer(path: Path, *, sprint: bool = False, seed: int = 0) -> Path:
    """A tiny SANA DiT (original NVlabs key names) as .safetensors at `path`."""
    raise NotImplementedError  # owner: the DiT work


def write_demo_autoencoder(path: Path, *, seed: int = 0) -> Path:
    """A tiny DC-AE f32c32 (narrow stages, same structure) as .safetensors at `path`."""
    raise NotImplementedError  # owner: the DC-AE work


def write_demo_text_encoder(path: Path, *, seed: int = 0) -> Path:
    """A tiny Gemma-2 as a ComfyUI-style single .safetensors with `spiece_model` inside."""
    raise NotImplementedError  # owner: the text-encoder work


def write_demo_models(folder: Path) -> dict:
    """All three in ComfyUI's folder layout under `folder`; returns their paths."""
    folder = Path(folder)
    paths = {
        "transformer": folder / "diffusion_models" / "sana_demo.safetensors",
        "autoencoder": folder / "vae" / "sana_demo_dcae.safetensors",
        "text_encoder": folder / "text_encoders" / "gemma2_demo.safetensors",
        "sprint": folder / "diffusion_models" / "sana_sprint_demo.safetensors",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_demo_transformer(paths["transformer"])
    write_demo_transformer(paths["sprint"], sprint=True)
    write_demo_autoencoder(paths["autoencoder"])
    write_demo_text_encoder(paths["text_encoder"])
    return paths
