"""SANA ControlNets end to end in a real ComfyUI server (headless, CPU, the demo models and the demo ControlNet in
models/controlnet): the shipped workflow (Load Image -> Canny -> Apply ControlNet -> KSampler) runs, the ControlNet
changes the image (against strength 0), and a ControlNet of another family given to SANA ControlNet Loader is an
execution error naming it, after which the server keeps serving. Enabled like test_comfyui_server.py:

    COMFYUI_DIR=... COMFYUI_PYTHON=... python -m pytest tests/e2e/test_controlnet.py
"""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from comfyui_server import REPO, ComfyUIServer, comfyui_paths, history_messages  # noqa: E402
from test_comfyui_server import node_of, run_ok, small  # noqa: E402

PATHS = comfyui_paths()
pytestmark = pytest.mark.skipif(PATHS is None, reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to "
                                                      "its interpreter) to run the end-to-end ComfyUI tests")
WORKFLOW = REPO / "workflows" / "api" / "sana_controlnet_edges.json"
SD_CONTROLNET = "control_sd15_canny.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from sana_core.demo import write_demo_models
    folder = tmp_path_factory.mktemp("e2e-controlnet-models")
    write_demo_models(folder)
    save_file({k: torch.zeros(4, 4) for k in ("input_hint_block.0.weight", "zero_convs.0.0.weight",
                                              "input_blocks.0.0.weight")}, str(folder / "controlnet" / SD_CONTROLNET))
    return folder


@pytest.fixture(scope="module")
def server(models):
    comfyui_dir, python = PATHS
    with ComfyUIServer(comfyui_dir, models, python=python) as s:
        image = Image.new("RGB", (64, 64), (30, 120, 200))
        ImageDraw.Draw(image).rectangle((16, 12, 44, 50), fill=(240, 230, 200))  # edges for Canny to find
        image.save(s.input_dir / "example.png")
        yield s
        print(f"\n--- ComfyUI log (tail) ---\n{s.log_tail(3000)}")


def saved_pixels(server, entry, prompt):
    image, = entry["outputs"][node_of(prompt, "SaveImage")]["images"]
    with Image.open(server.output_dir / image["subfolder"] / image["filename"]) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


def test_the_shipped_workflow_runs_and_the_controlnet_changes_the_image(server):
    prompt = small(WORKFLOW)
    assert prompt[node_of(prompt, "SanaControlNetLoader")]["inputs"]["control_net_name"] == \
        "sana_demo_controlnet.safetensors"
    controlled = saved_pixels(server, run_ok(server, prompt), prompt)
    assert controlled.shape == (64, 64, 3)
    prompt[node_of(prompt, "ControlNetApplyAdvanced")]["inputs"]["strength"] = 0.0  # Apply ControlNet: no ControlNet
    plain = saved_pixels(server, run_ok(server, prompt), prompt)
    assert np.abs(controlled - plain).mean() > 1.0


def test_another_familys_controlnet_is_a_clear_error_and_the_server_keeps_serving(server):
    prompt = small(WORKFLOW)
    prompt[node_of(prompt, "SanaControlNetLoader")]["inputs"]["control_net_name"] = SD_CONTROLNET
    entry = server.wait(server.queue(prompt))
    error = history_messages(entry)["execution_error"]
    assert error["node_type"] == "SanaControlNetLoader"
    message = error["exception_message"]
    assert f"SANA ControlNet Loader: could not load '{SD_CONTROLNET}'" in message and "Stable Diffusion" in message
    assert server.get("/system_stats")["system"]
    run_ok(server, small(WORKFLOW))
