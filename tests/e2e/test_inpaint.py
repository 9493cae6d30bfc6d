"""End to end against a real ComfyUI server (headless, CPU, the demo models): the shipped inpainting and
outpainting workflows, with a mask the test draws as a PNG's alpha channel (what ComfyUI's mask editor saves) and
loads through core Load Image. Outside the feathered mask the saved image is the original; inside, repainted.
Enabled as tests/e2e/test_comfyui_server.py is (COMFYUI_DIR, COMFYUI_PYTHON)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sana_core.inpaint import feathered

sys.path.insert(0, str(Path(__file__).parent))
from comfyui_server import ComfyUIServer, comfyui_paths  # noqa: E402
from test_comfyui_server import node_of, run_ok, small  # noqa: E402

PATHS = comfyui_paths()
pytestmark = pytest.mark.skipif(PATHS is None, reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to "
                                                      "its interpreter) to run the end-to-end ComfyUI tests")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sana_core.demo import write_demo_models
    models = tmp_path_factory.mktemp("inpaint-models")
    write_demo_models(models)
    comfyui_dir, python = PATHS
    with ComfyUIServer(comfyui_dir, models, python=python) as s:
        yield s
        print(f"\n--- ComfyUI log (tail) ---\n{s.log_tail(3000)}")


def photo(height=96, width=64) -> np.ndarray:
    """A smooth colour pattern (uint8, H x W x 3)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (height + width) + 64], -1).astype(np.uint8)


def saved(server, entry, prompt) -> np.ndarray:
    image, = entry["outputs"][node_of(prompt, "SaveImage")]["images"]
    with Image.open(server.output_dir / image["subfolder"] / image["filename"]) as png:
        return np.asarray(png.convert("RGB")).astype(np.int16)


def test_inpaint_workflow_repaints_a_painted_stroke_and_keeps_the_rest(server):
    pixels = photo()
    alpha = np.full(pixels.shape[:2], 255, np.uint8)
    alpha[20:70, 45:47] = 0  # a 2-px stroke painted in the mask editor (transparent = repaint)
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(server.input_dir / "inpaint_stroke.png")
    prompt = small("sana_inpaint.json")
    prompt[node_of(prompt, "LoadImage")]["inputs"]["image"] = "inpaint_stroke.png"
    prompt[node_of(prompt, "SanaInpaintComposite")]["inputs"]["feather"] = 6
    out = saved(server, run_ok(server, prompt), prompt)
    assert out.shape == pixels.shape
    mask = torch.from_numpy(alpha == 0).float()[None, None]
    outside = (feathered(mask, 6)[0, 0] == 0).numpy()
    assert outside.sum() > 0.8 * outside.size
    assert np.abs(out[outside] - pixels[outside]).max() <= 1  # the original (PNG rounding aside)
    assert np.abs(out[20:70, 45:47] - pixels[20:70, 45:47]).max() > 8  # the stroke is repainted


def test_outpaint_workflow_extends_the_canvas_and_keeps_the_image(server):
    pixels = photo(64, 64)
    Image.fromarray(pixels).save(server.input_dir / "outpaint_source.png")
    prompt = small("sana_outpaint.json")
    prompt[node_of(prompt, "LoadImage")]["inputs"]["image"] = "outpaint_source.png"
    pad = prompt[node_of(prompt, "ImagePadForOutpaint")]["inputs"]
    pad.update(right=32, bottom=32, feathering=0)
    composite = prompt[node_of(prompt, "SanaInpaintComposite")]["inputs"]
    out = saved(server, run_ok(server, prompt), prompt)
    assert out.shape == (96, 96, 3)
    keep = 64 - composite["feather"] - 1  # beyond the feathered edge of the new band
    assert np.abs(out[:keep, :keep] - pixels[:keep, :keep]).max() <= 1
    assert np.abs(out[64:, 64:] - 128).max() > 8  # the band is generated, not the pad node's grey
