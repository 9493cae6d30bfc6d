"""Tests that import ComfyUI: run by ComfyUI's python (tests/test_comfy.py starts them), with COMFYUI_DIR
and the repository on PYTHONPATH. ComfyUI runs on the CPU, in this process, with the pack loaded the way
ComfyUI loads it and the tiny demo models in its model folders."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))  # comfy_test_helpers
COMFYUI_DIR = Path(os.environ["COMFYUI_DIR"])


def _load_comfyui():
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.insert(0, str(COMFYUI_DIR))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before comfy.model_management reads it
    comfy.cli_args.args.preview_method = comfy.cli_args.LatentPreviewMethod.Latent2RGB
    import comfy.model_management  # noqa: F401
    spec = importlib.util.spec_from_file_location("ComfyUI_SANA", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_SANA"] = pack
    spec.loader.exec_module(pack)
    return pack


PACK = _load_comfyui()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """The demo model set in ComfyUI's model folders (folder_paths)."""
    import folder_paths
    from sana_core.demo import write_demo_models
    folder = tmp_path_factory.mktemp("models")
    write_demo_models(folder)
    for name in ("diffusion_models", "text_encoders", "vae", "controlnet", "loras"):
        folder_paths.add_model_folder_path(name, str(folder / name), is_default=True)
    return folder


@pytest.fixture(scope="session")
def nodes(models):
    """Our node classes, by name."""
    from sana_nodes import host
    assert type(host.current()).__name__ == "ComfyHost"
    return PACK.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def demo(nodes):
    """The demo DiT (MODEL), Gemma (CLIP), DC-AE (VAE) and a positive / empty negative conditioning, float32."""
    from comfy_test_helpers import call
    model, = call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp32")
    clip, = call(nodes["SanaTextEncoderLoader"], "gemma2_demo.safetensors", "fp32", "gpu")
    vae, = call(nodes["SanaVAELoader"], "sana_demo_dcae.safetensors")
    positive, = call(nodes["SanaTextEncode"], clip, "a red fox in the snow", True)
    negative, = call(nodes["SanaTextEncode"], clip, "", False)
    return dict(model=model, clip=clip, vae=vae, positive=positive, negative=negative)
