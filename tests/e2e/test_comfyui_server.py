"""End to end against a real ComfyUI server (headless, CPU) with this pack in custom_nodes/ and the
tiny demo models: /object_info, every shipped workflow (API and UI forms) and a round-1 one, core
nodes on the SANA MODEL / CLIP / VAE (CLIPTextEncode, KSampler, ModelSamplingSD3, SamplerCustomAdvanced
with our SAMPLER and SIGMAS, VAEDecodeTiled, VAEEncode) and the SANA PAG patch, /interrupt
mid-sampling, a corrupt model file, eviction between prompts. Enabled when COMFYUI_DIR points at a ComfyUI checkout
(COMFYUI_PYTHON: the interpreter that has ComfyUI's requirements; default: this one):

    COMFYUI_DIR=~/.cache/comfyui COMFYUI_PYTHON=/root/.cache/comfyui-venv/bin/python python3 -m pytest tests/e2e
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sana_nodes import NODE_CLASS_MAPPINGS, runner

sys.path.insert(0, str(Path(__file__).parent))
from comfyui_server import REPO, ComfyUIServer, comfyui_paths, history_messages  # noqa: E402

PATHS = comfyui_paths()
pytestmark = pytest.mark.skipif(PATHS is None, reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to "
                                                      "its interpreter) to run the end-to-end ComfyUI tests")
WORKFLOWS = sorted((REPO / "workflows" / "api").glob("*.json")) + sorted((REPO / "workflows").glob("*.json"))
ROUND_1 = REPO / "tests" / "fixtures" / "round1" / "api" / "sana_1024_text_to_image.json"  # SANA_* socket types
CORRUPT = "broken_Sana_1600M_1024px.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sana_core.demo import write_demo_models
    folder = tmp_path_factory.mktemp("e2e-models")
    paths = write_demo_models(folder)
    data = paths["transformer"].read_bytes()
    (folder / "diffusion_models" / CORRUPT).write_bytes(data[: len(data) // 3])  # an interrupted download
    return folder


@pytest.fixture(scope="module")
def server(models):
    comfyui_dir, python = PATHS
    with ComfyUIServer(comfyui_dir, models, python=python) as s:
        yield s
        print(f"\n--- ComfyUI log (tail) ---\n{s.log_tail(3000)}")


def small(name, *, steps=2, size=64):
    """An API workflow (a shipped one by name, or any file: either form) with the demo models, size x size
    pixels and `steps` steps."""
    prompt, _ = runner.load_workflow(name if isinstance(name, Path) else REPO / "workflows" / "api" / name)
    prompt = runner.use_demo_models(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "SanaEmptyLatent":
            inputs.update(preset="custom", width=size, height=size)
        elif node["class_type"] in ("SanaSampler", "KSampler"):
            inputs["steps"] = steps
        elif node["class_type"] == "SanaVAEDecodeTiled":
            inputs.update(tile_size=64, overlap=32)
        elif node["class_type"] == "ImagePadForOutpaint":
            inputs.update(left=0, top=0, right=32, bottom=0)
    return prompt


def node_of(prompt, class_type):
    return next(i for i, n in prompt.items() if n["class_type"] == class_type)


def run_ok(server, prompt, timeout=300):
    entry = server.wait(server.queue(prompt), timeout)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    return entry


def test_object_info_lists_the_nodes_with_their_inputs(server):
    info = server.get("/object_info")
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name in info, f"{name} missing from /object_info"
        node, ours = info[name], cls.INPUT_TYPES()
        assert node["category"] == cls.CATEGORY and node["description"] == cls.DESCRIPTION
        for section in ("required", "optional"):
            assert list(node["input"].get(section, {})) == list(ours.get(section, {})), (name, section)
            for spec in node["input"].get(section, {}).values():
                assert spec[1]["tooltip"], name
        assert node["output"] == list(cls.RETURN_TYPES)
    # model lists come from ComfyUI's folder_paths (the extra model paths config)
    assert "sana_demo.safetensors" in info["SanaModelLoader"]["input"]["required"]["model_name"][0]
    assert info["SanaTextEncoderLoader"]["input"]["required"]["text_encoder_name"][0] == ["gemma2_demo.safetensors"]
    assert info["SanaVAELoader"]["input"]["required"]["vae_name"][0] == ["sana_demo_dcae.safetensors"]


@pytest.mark.parametrize("path", WORKFLOWS + [ROUND_1], ids=lambda p: str(p.relative_to(REPO)))
def test_each_workflow_makes_an_image(server, path):
    prompt = small(path)
    if "LoadImage" in {n["class_type"] for n in prompt.values()}:
        example = Image.new("RGBA", (64, 64), (30, 120, 200, 255))
        example.paste((30, 120, 200, 0), (20, 8, 24, 40))  # a painted mask (transparent) for the inpaint workflow
        example.save(server.input_dir / "example.png")
    pad = next((n["inputs"] for n in prompt.values() if n["class_type"] == "ImagePadForOutpaint"), None)
    entry = run_ok(server, prompt)
    images = entry["outputs"][node_of(prompt, "SaveImage")]["images"]
    assert len(images) == 1
    file = server.output_dir / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(file) as png:
        assert png.size == ((64 + pad["left"] + pad["right"], 64 + pad["top"] + pad["bottom"]) if pad else (64, 64))
        embedded = json.loads(png.text["prompt"])  # ComfyUI embedded the workflow (adding its own keys)
    assert {i: (n["class_type"], n["inputs"]) for i, n in embedded.items()} == \
        {i: (n["class_type"], n["inputs"]) for i, n in prompt.items()}
    if any(n["class_type"] == "SanaSampler" for n in prompt.values()):  # (the ControlNet workflow has KSampler)
        stats, = entry["outputs"][node_of(prompt, "SanaSampler")]["sana_stats"]
        assert stats["steps"] == 2 and stats["seconds_per_step"] > 0 and stats["peak_gpu_memory_gib"] is None


def core_prompt(sampling: dict, decode: dict) -> dict:
    """Our loaders -> CLIPTextEncode (positive, empty negative) -> `sampling` nodes ("latent": the sampled
    LATENT's link) -> `decode` node -> SaveImage."""
    prompt = {
        "1": {"class_type": "SanaModelLoader", "inputs": {"model_name": "sana_demo.safetensors", "dtype": "auto"}},
        "2": {"class_type": "SanaTextEncoderLoader",
              "inputs": {"text_encoder_name": "gemma2_demo.safetensors", "dtype": "auto", "device": "gpu"}},
        "3": {"class_type": "SanaVAELoader", "inputs": {"vae_name": "sana_demo_dcae.safetensors"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "SanaEmptyLatent", "inputs": {"preset": "custom", "width": 64, "height": 64,
                                                          "batch_size": 1}},
        "90": decode,
        "99": {"class_type": "SaveImage", "inputs": {"images": ["90", 0], "filename_prefix": "core"}},
    }
    prompt.update(sampling)
    return prompt


def saved_image_size(server, entry):
    image, = entry["outputs"]["99"]["images"]
    with Image.open(server.output_dir / image["subfolder"] / image["filename"]) as png:
        return png.size


def test_core_nodes_ksampler_model_sampling_sd3_and_the_pag_patch(server):
    sampling = {
        "10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "11": {"class_type": "SanaPAG", "inputs": {"model": ["10", 0], "scale": 2.0, "layers": ""}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 1, "steps": 2, "cfg": 4.5,
                                                    "sampler_name": "euler", "scheduler": "simple",
                                                    "positive": ["4", 0], "negative": ["5", 0],
                                                    "latent_image": ["6", 0], "denoise": 1.0}},
    }
    entry = run_ok(server, core_prompt(sampling, {"class_type": "VAEDecode",
                                                  "inputs": {"samples": ["12", 0], "vae": ["3", 0]}}))
    assert saved_image_size(server, entry) == (64, 64)


def test_sampler_custom_advanced_with_sana_sampler_and_sigmas_then_tiled_decode(server):
    sampling = {
        "10": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                     "cfg": 4.5}},
        "11": {"class_type": "SanaSamplerSelect", "inputs": {"sampler": "flow_dpm_solver", "guidance": 4.5}},
        "12": {"class_type": "SanaScheduler", "inputs": {"model": ["1", 0], "sampler": "flow_dpm_solver", "steps": 2,
                                                         "flow_shift": 0.0, "denoise": 1.0}},
        "13": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["13", 0], "guider": ["10", 0],
                                                                 "sampler": ["11", 0], "sigmas": ["12", 0],
                                                                 "latent_image": ["15", 0]}},
        "15": {"class_type": "VAEEncode", "inputs": {"pixels": ["16", 0], "vae": ["3", 0]}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
    }
    entry = run_ok(server, core_prompt(sampling, {"class_type": "VAEDecodeTiled", "inputs": {
        "samples": ["14", 0], "vae": ["3", 0], "tile_size": 64, "overlap": 0, "temporal_size": 64,
        "temporal_overlap": 8}}))
    assert saved_image_size(server, entry) == (64, 64)


def test_interrupt_stops_sampling_and_the_next_prompt_runs(server):
    prompt = small("sana_1024_text_to_image.json", steps=1000, size=512)
    sampler = node_of(prompt, "SanaSampler")
    socket = server.websocket()
    try:
        prompt_id = server.queue(prompt)
        socket.wait_for(lambda m: m.get("type") == "progress" and m["data"]["node"] == sampler
                        and m["data"]["value"] >= 2, timeout=300)
        server.interrupt()
    finally:
        socket.close()
    entry = server.wait(prompt_id)
    messages = history_messages(entry)
    assert "execution_interrupted" in messages, entry["status"]
    assert messages["execution_interrupted"]["node_type"] == "SanaSampler"  # it landed mid-sampling
    run_ok(server, small("sana_sprint_2_steps.json"))


def test_corrupt_model_file_is_an_execution_error_and_the_server_keeps_serving(server):
    prompt = small("sana_1024_text_to_image.json")
    prompt[node_of(prompt, "SanaModelLoader")]["inputs"]["model_name"] = CORRUPT
    entry = server.wait(server.queue(prompt))
    error = history_messages(entry)["execution_error"]
    assert error["node_type"] == "SanaModelLoader"
    assert CORRUPT in error["exception_message"] and "truncated" in error["exception_message"], error
    assert server.get("/system_stats")["system"]
    run_ok(server, small("sana_sprint_2_steps.json"))


def test_a_missing_model_file_is_refused_before_running(server):
    prompt = runner.use_demo_models(json.loads((REPO / "workflows" / "api" / "sana_1024_text_to_image.json").read_text()))
    prompt[node_of(prompt, "SanaModelLoader")]["inputs"]["model_name"] = "Sana_1600M_1024px_BF16.pth"
    with pytest.raises(RuntimeError, match=r"400.*Sana_1600M_1024px_BF16.pth' was not found in diffusion_models or "
                                           r"checkpoints \(searched: .*diffusion_models"):
        server.queue(prompt)


def test_a_latent_from_another_model_family_is_refused_clearly(server):
    prompt = small("sana_1024_text_to_image.json")
    empty = node_of(prompt, "SanaEmptyLatent")
    prompt[empty] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    entry = server.wait(server.queue(prompt))
    error = history_messages(entry)["execution_error"]
    assert error["node_type"] == "SanaSampler" and "4 channels" in error["exception_message"]


def test_published_vae_folder_an_empty_negative_and_a_long_prompt(server, models):
    """The VAE folder as published (its config.json says "Conv"), the negative an empty text-encode at default
    settings (instruction on), and a prompt too long for 300 tokens: the image is made, and the truncation
    warning shows on the positive text-encode node (progress text), not only in the server log."""
    diffusers = pytest.importorskip("diffusers")
    import torch
    from test_published_files import DCAE_SANA
    folder = models / "vae" / "dc-ae-f32c32-sana-1.1-diffusers"
    torch.manual_seed(0)
    diffusers.AutoencoderDC(**DCAE_SANA).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "downsample_block_type": "Conv"}))
    prompt = small("sana_1024_text_to_image.json")
    prompt[node_of(prompt, "SanaVAELoader")]["inputs"]["vae_name"] = folder.name
    positive, negative = sorted((i for i, n in prompt.items() if n["class_type"] == "SanaTextEncode"),
                                key=lambda i: prompt[i]["inputs"]["text"] == "")
    prompt[negative]["inputs"].update(text="", instruction=True)
    prompt[positive]["inputs"]["text"] = " ".join(["a red fox in the snow"] * 200)
    socket = server.websocket()
    try:
        prompt_id = server.queue(prompt)
        shown = socket.wait_for(lambda m: m.get("type") == "progress_text" and m["data"]["node"] == positive,
                                timeout=300)
    finally:
        socket.close()
    assert "too long" in shown["data"]["text"] and "tokens were dropped" in shown["data"]["text"]
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    image = entry["outputs"][node_of(prompt, "SaveImage")]["images"][0]
    assert Image.open(server.output_dir / image["subfolder"] / image["filename"]).size == (64, 64)


def test_models_survive_eviction_between_prompts(server):
    prompt = small("sana_1024_text_to_image.json")
    first = run_ok(server, prompt)
    server.post("/free", {"unload_models": True, "free_memory": True})
    prompt[node_of(prompt, "SanaSampler")]["inputs"]["seed"] = 43  # re-run the sampler on reloaded models
    second = run_ok(server, prompt)
    assert first["outputs"] and second["outputs"]


def test_model_patcher_loads_evicts_and_reloads(models):
    """In ComfyUI's own process: the SANA models are ModelPatchers ComfyUI's memory manager tracks,
    with their size; unloading them all and computing again works and gives the same result."""
    comfyui_dir, python = PATHS
    code = f"""
import sys, torch
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, {str(comfyui_dir)!r})
import comfy.options; comfy.options.enable_args_parsing()
import folder_paths, comfy.model_management as mm
for folder in ("diffusion_models", "text_encoders", "vae"):
    folder_paths.add_model_folder_path(folder, {str(models)!r} + "/" + folder)
sys.path.insert(0, {str(REPO)!r})
import importlib.util
spec = importlib.util.spec_from_file_location("ComfyUI_SANA", {str(REPO / '__init__.py')!r},
                                              submodule_search_locations=[{str(REPO)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["ComfyUI_SANA"] = pack; spec.loader.exec_module(pack)
from sana_nodes import host
assert type(host.current()).__name__ == "ComfyHost"
N = pack.NODE_CLASS_MAPPINGS
model, = N["SanaModelLoader"]().load("sana_demo.safetensors", "auto")
te, = N["SanaTextEncoderLoader"]().load("gemma2_demo.safetensors", "auto", "gpu")
cond, = N["SanaTextEncode"]().encode(te, "a fox", True)
latent, = N["SanaEmptyLatent"]().generate("custom", 64, 64, 1)
transformer = model.model.diffusion_model.transformer
moved = []
transformer.clear_device_caches = lambda: moved.append(1)
def sample():
    return N["SanaSampler"]().sample(model, cond, latent, 5, 2, 1.0, 0.0, 0.0, "flow_euler", 1.0)["result"][0]["samples"]
first = sample()
assert model in mm.loaded_models(), "the DiT is not tracked by ComfyUI's memory manager"
weights = sum(p.numel() * p.element_size() for p in transformer.parameters())
assert weights <= model.model_size() < weights + 2**20
mm.unload_all_models()
assert model not in mm.loaded_models()
assert moved, "no notice that the weights moved"
assert torch.equal(sample(), first)
print("OK", model.model_size())
"""
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600, cwd=comfyui_dir)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
