"""SANA LoRA Loader end to end against a real ComfyUI server (headless, CPU) with the demo models and the demo
LoRA in models/loras: the shipped LoRA workflow changes the image against strength 0, two loaders stack, and a
LoRA for another model family is an execution error in the node's words after which the server keeps serving.
Enabled as tests/e2e/test_comfyui_server.py is (COMFYUI_DIR, COMFYUI_PYTHON)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from comfyui_server import ComfyUIServer, comfyui_paths, history_messages  # noqa: E402
from test_comfyui_server import node_of, run_ok, small  # noqa: E402

PATHS = comfyui_paths()
pytestmark = pytest.mark.skipif(PATHS is None, reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to "
                                                      "its interpreter) to run the end-to-end ComfyUI tests")
FLUX_STYLE = "flux_style_lora.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sana_core.demo import write_demo_lora, write_demo_models
    folder = tmp_path_factory.mktemp("e2e-lora-models")
    write_demo_models(folder)
    write_demo_lora(folder / "loras" / "second_lora.safetensors", rank=2, seed=5)
    save_file({f"transformer.single_transformer_blocks.0.attn.to_q.lora_{p}.weight": torch.zeros(4, 4) for p in "AB"},
              folder / "loras" / FLUX_STYLE)
    comfyui_dir, python = PATHS
    with ComfyUIServer(comfyui_dir, folder, python=python) as s:
        yield s
        print(f"\n--- ComfyUI log (tail) ---\n{s.log_tail(3000)}")


def lora_prompt(strength=1.0, name=None):
    prompt = small("sana_lora.json")
    lora = prompt[node_of(prompt, "SanaLoraLoader")]["inputs"]
    lora["strength_model"] = strength
    if name:
        lora["lora_name"] = name
    return prompt


def image(server, prompt):
    entry = run_ok(server, prompt)
    saved, = entry["outputs"][node_of(prompt, "SaveImage")]["images"]
    with Image.open(server.output_dir / saved["subfolder"] / saved["filename"]) as png:
        return np.asarray(png).astype(int)


def test_the_lora_changes_the_image_and_two_loaders_stack(server):
    plain, with_lora = image(server, lora_prompt(0.0)), image(server, lora_prompt(1.0))
    assert np.abs(with_lora - plain).max() > 0
    stacked = lora_prompt(1.0)
    sampler = node_of(stacked, "SanaSampler")
    stacked["20"] = {"class_type": "SanaLoraLoader", "inputs": {"model": stacked[sampler]["inputs"]["model"],
                                                                "lora_name": "second_lora.safetensors",
                                                                "strength_model": -0.8}}
    stacked[sampler]["inputs"]["model"] = ["20", 0]
    both = image(server, stacked)
    assert np.abs(both - with_lora).max() > 0 and np.abs(both - plain).max() > 0
    assert np.array_equal(image(server, lora_prompt(0.0)), plain)  # the LoRAs come out again


def test_a_lora_for_another_family_is_a_clear_error_and_the_server_keeps_serving(server):
    entry = server.wait(server.queue(lora_prompt(1.0, FLUX_STYLE)))
    error = history_messages(entry)["execution_error"]
    assert error["node_type"] == "SanaLoraLoader"
    message = error["exception_message"]
    assert f"SANA LoRA Loader: lora_name '{FLUX_STYLE}' cannot be applied" in message and "Flux" in message, message
    run_ok(server, lora_prompt(1.0))
