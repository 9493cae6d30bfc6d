"""The ComfyUI nodes and the sana-run runner, outside ComfyUI (nodes/host.py's LocalHost), on the
CPU with the tiny demo models (sana_core.demo) at 64x64 and 2 steps."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sana_core.autoencoder import SCALING_FACTOR
from sana_core.checkpoints import CheckpointError
from sana_core.guidance import sample_latents
from sana_core.presets import defaults_for
from sana_nodes import NODE_CLASS_MAPPINGS, host, runner
from sana_nodes.conditioning import SanaTextEncode
from sana_nodes.latent import PRESETS, SanaEmptyLatent
from sana_nodes.loaders import SanaModelLoader, SanaTextEncoderLoader, SanaVAELoader
from sana_nodes.sampling import SanaSampler
from sana_nodes.vae import SanaVAEDecode, SanaVAEDecodeTiled, SanaVAEEncode

ROOT = Path(__file__).resolve().parents[1]
DEMO = {"transformer": "sana_demo.safetensors", "sprint": "sana_sprint_demo.safetensors",
        "text_encoder": "gemma2_demo.safetensors", "autoencoder": "sana_demo_dcae.safetensors"}
# The inputs issue 7 asks for (the frontend and the shipped workflows rely on these names).
EXPECTED_INPUTS = {
    "SanaModelLoader": ["model_name", "dtype", "gpus"],
    "SanaTextEncoderLoader": ["text_encoder_name", "dtype", "device"],
    "SanaVAELoader": ["vae_name"],
    "SanaTextEncode": ["text_encoder", "text", "instruction"],
    "SanaEmptyLatent": ["preset", "width", "height", "batch_size"],
    "SanaSampler": ["model", "positive", "latent_image", "seed", "steps", "cfg", "pag_scale", "flow_shift",
                    "sampler", "denoise", "negative", "vae"],
    "SanaVAEDecode": ["samples", "vae"],
    "SanaVAEDecodeTiled": ["samples", "vae", "tile_size", "overlap"],
    "SanaVAEEncode": ["pixels", "vae"],
    "SanaSamplerSelect": ["sampler", "guidance"],
    "SanaScheduler": ["model", "sampler", "steps", "flow_shift", "denoise"],
    "SanaPAG": ["model", "scale", "layers"],
    "SanaControlNetLoader": ["control_net_name", "graph"],
    "SanaLoraLoader": ["model", "lora_name", "strength_model"],
    "SanaQuantizeModel": ["model_name", "format", "output_name"],
    "SanaInpaintComposite": ["original", "decoded", "mask", "feather"],
}
# Round 1's SANA_* socket types are retired: the loaders give ComfyUI's own.
CORE_TYPES = {"SanaModelLoader": ("MODEL",), "SanaTextEncoderLoader": ("CLIP",), "SanaVAELoader": ("VAE",)}


def run(cls, **inputs):
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo model set, written by `sana-run --write-demo-models`."""
    folder = tmp_path_factory.mktemp("models")
    assert runner.main(["--write-demo-models", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def local(models):
    previous = host._host
    yield host.use(host.LocalHost(models, device="cpu", output_dir=models / "out", input_dir=models))
    host._host = previous


@pytest.fixture(scope="module")
def loaded(local):
    model, = run(SanaModelLoader, model_name=DEMO["transformer"], dtype="auto")
    encoder, = run(SanaTextEncoderLoader, text_encoder_name=DEMO["text_encoder"], dtype="auto", device="gpu")
    vae, = run(SanaVAELoader, vae_name=DEMO["autoencoder"])
    positive, = run(SanaTextEncode, text_encoder=encoder, text="a red fox in the snow", instruction=True)
    negative, = run(SanaTextEncode, text_encoder=encoder, text="", instruction=False)
    return dict(model=model, encoder=encoder, vae=vae, positive=positive, negative=negative)


def sample(loaded, latent, **settings):
    kw = dict(model=loaded["model"], positive=loaded["positive"], negative=loaded["negative"], latent_image=latent,
              seed=7, steps=2, cfg=4.5, pag_scale=0.0, flow_shift=0.0, sampler="flow_dpm_solver", denoise=1.0)
    kw.update(settings)
    return getattr(SanaSampler(), "sample")(**kw)


def empty_latent(width=64, height=64, batch=1):
    return run(SanaEmptyLatent, preset="custom", width=width, height=height, batch_size=batch)[0]


# -- definitions -------------------------------------------------------------------------------

def test_nodes_import_without_comfyui():
    """No module-level import of comfy/folder_paths: the pack runs headless and imports cleanly anywhere."""
    code = ("import sys, sana_nodes, sana_nodes.runner; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes')], sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_node_definitions_are_complete():
    assert set(NODE_CLASS_MAPPINGS) == set(EXPECTED_INPUTS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        types = cls.INPUT_TYPES()
        inputs = {**types["required"], **types.get("optional", {})}
        assert list(inputs) == EXPECTED_INPUTS[name]
        assert cls.CATEGORY.startswith("SANA") and len(cls.DESCRIPTION) > 40 and callable(getattr(cls, cls.FUNCTION))
        for input_name, spec in inputs.items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)
    assert SanaSampler.INPUT_TYPES()["required"]["seed"][1]["control_after_generate"]
    assert "0.41407" in SanaEmptyLatent.OUTPUT_TOOLTIPS[0]
    for name, types in CORE_TYPES.items():
        assert NODE_CLASS_MAPPINGS[name].RETURN_TYPES == types
    every_type = [spec[0] for cls in NODE_CLASS_MAPPINGS.values() for section in cls.INPUT_TYPES().values()
                  for spec in section.values()] + [t for cls in NODE_CLASS_MAPPINGS.values() for t in cls.RETURN_TYPES]
    assert not [t for t in every_type if isinstance(t, str) and t.startswith("SANA_")]


def test_the_controlnet_loader_outside_comfyui_says_where_it_runs(local):
    """Its CONTROL_NET is for ComfyUI's Apply ControlNet, which sana-run does not stand in for."""
    loader = NODE_CLASS_MAPPINGS["SanaControlNetLoader"]
    assert loader.INPUT_TYPES()["required"]["control_net_name"][0] == ["sana_demo_controlnet.safetensors"]
    with pytest.raises(RuntimeError, match="SANA ControlNet Loader: .*run this workflow in ComfyUI"):
        run(loader, control_net_name="sana_demo_controlnet.safetensors", graph="auto")


# -- model files -------------------------------------------------------------------------------

def test_model_lists_show_files_and_model_folders(tmp_path):
    (tmp_path / "diffusion_models" / "Sana_1600M_1024px_diffusers" / "transformer").mkdir(parents=True)
    pipeline = tmp_path / "diffusion_models" / "Sana_1600M_1024px_diffusers"
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "transformer" / "config.json").write_text("{}")
    (pipeline / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "old.pth").write_bytes(b"")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "Sana_600M.safetensors").write_bytes(b"")
    gemma = tmp_path / "text_encoders" / "gemma-2-2b-it"
    gemma.mkdir(parents=True)
    for f in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.model"):
        (gemma / f).write_bytes(b"")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "gemma_2_2b_fp16.safetensors").write_bytes(b"")
    h = host.LocalHost(tmp_path)
    assert h.list_models("transformer") == ["Sana_1600M_1024px_diffusers/transformer", "Sana_600M.safetensors",
                                            "old.pth"]
    assert h.list_models("text_encoder") == ["gemma-2-2b-it", "gemma_2_2b_fp16.safetensors"]
    assert h.find_model("text_encoder", "gemma-2-2b-it") == gemma
    assert h.find_model("transformer", "Sana_600M.safetensors") == tmp_path / "checkpoints" / "Sana_600M.safetensors"
    with pytest.raises(host.ModelNotFoundError, match=r"'Sana_1600M_1024px_BF16.pth' was not found in "
                                                      r"diffusion_models or checkpoints \(searched: .*diffusion_models"):
        h.find_model("transformer", "Sana_1600M_1024px_BF16.pth")
    with pytest.raises(host.ModelNotFoundError):
        h.find_model("autoencoder", "../text_encoders/gemma-2-2b-it")  # no escaping the model folder


def test_loaders_say_when_a_file_is_the_wrong_component_or_damaged(local, models):
    (models / "diffusion_models" / DEMO["autoencoder"]).write_bytes((models / "vae" / DEMO["autoencoder"]).read_bytes())
    data = (models / "diffusion_models" / DEMO["transformer"]).read_bytes()
    (models / "diffusion_models" / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    # in the words of the UI: the node and input to use, never the library's function names
    with pytest.raises(CheckpointError, match=f"SANA Model Loader: '{DEMO['autoencoder']}' is a DC-AE autoencoder "
                                              r"\(VAE\), not a SANA transformer.*load it with SANA VAE Loader") as e:
        run(SanaModelLoader, model_name=DEMO["autoencoder"], dtype="auto")
    assert "load_" not in str(e.value)
    with pytest.raises(CheckpointError, match="truncated.safetensors.*(truncated|download it again)"):
        run(SanaModelLoader, model_name="truncated.safetensors", dtype="auto")
    (models / "vae" / DEMO["text_encoder"]).write_bytes((models / "text_encoders" / DEMO["text_encoder"]).read_bytes())
    with pytest.raises(CheckpointError, match=f"{DEMO['text_encoder']}' is a Gemma-2 text encoder.*SANA Text Encoder "
                                              f"Loader.*text_encoder_name") as e:
        run(SanaVAELoader, vae_name=DEMO["text_encoder"])
    assert "load_" not in str(e.value)
    for name in (DEMO["autoencoder"], "truncated.safetensors"):
        (models / "diffusion_models" / name).unlink()
    (models / "vae" / DEMO["text_encoder"]).unlink()


def test_loader_hints_a_file_lacks_are_worded_for_the_ui():
    """The library asks for Python arguments (cross_heads=N); a ComfyUI user gets what to do instead."""
    from sana_nodes import messages
    error = messages.load_error(CheckpointError("... pass cross_heads=N ...", needs="cross_heads"), "transformer",
                                "odd.safetensors")
    assert str(error).startswith("SANA Model Loader: could not load 'odd.safetensors'") and "cross_heads" not in str(error)


def test_loaded_models_report_their_size_and_device(loaded):
    model = loaded["model"]
    assert model.size_bytes() == sum(p.numel() * p.element_size() for p in model.model.parameters()) > 0
    assert model.load_device == torch.device("cpu") and model.patcher is None
    assert model.ready() is model.model and next(model.model.parameters()).dtype == torch.float32


# -- latent and text -----------------------------------------------------------------------------

def test_empty_latent_sizes_and_presets(local):
    latent = run(SanaEmptyLatent, preset="custom", width=96, height=64, batch_size=2)[0]["samples"]
    assert latent.shape == (2, 32, 2, 3) and latent.dtype == torch.float32 and not latent.any()
    wide = run(SanaEmptyLatent, preset="1024: 1344x768 (7:4)", width=64, height=64, batch_size=1)[0]["samples"]
    assert wide.shape == (1, 32, 24, 42)  # the preset wins over width/height
    assert PRESETS["4K · 1:1 · 4096x4096"] == (4096, 4096) and len({b.split(" · ")[0] for b in PRESETS}) == 4
    with pytest.raises(ValueError, match="SANA Empty Latent: width 1000 is not a multiple of 32.*set width to 992 or "
                                         "1024, or pick a preset") as e:
        run(SanaEmptyLatent, preset="custom", width=1000, height=1024, batch_size=1)
    assert "aspect_ratio" not in str(e.value)


def test_text_encode_gives_standard_conditioning(loaded, local):
    (emb, extra), = loaded["positive"]
    assert emb.shape == (1, 300, 64) and extra["attention_mask"].shape == (1, 300)
    assert extra["attention_mask"][0, 0] == 1 and extra["attention_mask"].sum() < 300  # right padding
    assert emb.device == torch.device("cpu")
    ((empty, _),), = run(SanaTextEncode, text_encoder=loaded["encoder"], text="  ", instruction=True)
    assert torch.equal(empty, loaded["negative"][0][0])  # empty text at default settings: the usual negative


def test_text_encoder_offload_after_encoding(local, loaded, monkeypatch):
    encoder, = run(SanaTextEncoderLoader, text_encoder_name=DEMO["text_encoder"], dtype="fp32",
                   device="gpu, offload after encoding")
    released = []
    monkeypatch.setattr(encoder, "release", lambda: released.append(True))
    run(SanaTextEncode, text_encoder=encoder, text="a cat", instruction=True)
    assert released == [True] and not loaded["encoder"].offload_after_use


# -- sampling ------------------------------------------------------------------------------------

def test_sampler_is_sana_core_with_comfyui_noise(loaded):
    latent = empty_latent(64, 96, batch=2)
    out = sample(loaded, latent, pag_scale=2.0)
    result = out["result"][0]["samples"]
    assert result.shape == (2, 32, 3, 2) and result.dtype == torch.float32 and result.device.type == "cpu"
    model = loaded["model"].model
    (cond, c), (uncond, u) = loaded["positive"][0], loaded["negative"][0]
    noise = torch.randn((2, 32, 3, 2), generator=torch.manual_seed(7), dtype=torch.float32)  # ComfyUI's KSampler
    expected = sample_latents(model, noise, cond, c["attention_mask"], uncond, u["attention_mask"],
                              sampler="flow_dpm_solver", steps=2, cfg=4.5, pag_scale=2.0,
                              pag_layers=defaults_for(model.config, 64, 96)["pag_layers"],
                              shift=defaults_for(model.config, 64, 96)["shift"], seed=7)
    assert torch.equal(result, expected / SCALING_FACTOR)  # LATENT is raw: the DiT's space / 0.41407
    stats, = out["ui"]["sana_stats"]
    assert stats["steps"] == 2 and 0 < stats["seconds_per_step"] <= stats["total_seconds"]
    assert stats["peak_gpu_memory_gib"] is None and stats["device"] == "cpu"
    assert json.dumps(stats)  # goes to the browser as JSON
    assert torch.equal(sample(loaded, latent, pag_scale=2.0)["result"][0]["samples"], result)
    assert not torch.equal(sample(loaded, latent, seed=8)["result"][0]["samples"], result)


def test_sprint_needs_no_negative(local, loaded):
    sprint, = run(SanaModelLoader, model_name=DEMO["sprint"], dtype="fp32")
    out = sample(loaded, empty_latent(), model=sprint, negative=None, sampler="scm", steps=2)
    assert out["result"][0]["samples"].shape == (1, 32, 2, 2)
    with pytest.raises(ValueError, match="Sana-Sprint.*'scm'"):
        sample(loaded, empty_latent(), model=sprint, negative=None, sampler="flow_dpm_solver", steps=20)
    with pytest.raises(ValueError, match="Sana-Sprint model.*Set pag_scale to 0"):
        sample(loaded, empty_latent(), model=sprint, negative=None, sampler="scm", steps=2, pag_scale=2.0)


def test_a_text_encoder_that_overflows_says_which_input_to_change(loaded, local, monkeypatch):
    def overflow(*args, **kwargs):
        raise FloatingPointError("Gemma-2 produced NaN/inf in torch.float16; load the text encoder in bfloat16")
    monkeypatch.setattr(local.runtime, "encode_text", overflow)
    with pytest.raises(FloatingPointError, match="Set dtype to bf16 \\(or fp32\\) on SANA Text Encoder Loader"):
        run(SanaTextEncode, text_encoder=loaded["encoder"], text="a fox", instruction=True)


class Cancelled(Exception):
    pass


def test_sampler_previews_every_step_and_cancel_stops_it(local, loaded, monkeypatch):
    calls = []

    def progress(total, desc=""):
        return lambda step, total_, preview=None: calls.append((step, total_, preview))

    monkeypatch.setattr(local, "progress", progress)
    monkeypatch.setattr(local, "previews", True)  # as inside ComfyUI (sana-run has no use for them)
    sample(loaded, empty_latent(64, 96), steps=3, vae=loaded["vae"])
    assert [(s, t) for s, t, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    kind, image, size = calls[-1][2]
    assert kind == "JPEG" and isinstance(image, Image.Image) and size == 512
    assert image.size[0] * 3 == image.size[1] * 2 and image.size[0] >= 16  # the latent's shape, enlarged

    calls.clear()
    def cancel_at_second_step():
        if len(calls) == 1:
            raise Cancelled
    monkeypatch.setattr(local, "check_interrupted", cancel_at_second_step)
    with pytest.raises(Cancelled):
        sample(loaded, empty_latent(), steps=10)
    assert len(calls) == 1  # stopped mid-sampling, no further steps


def test_sampler_rejects_inputs_it_cannot_use(loaded):
    with pytest.raises(ValueError, match="4 channels.*another model family.*SanaEmptyLatent"):
        sample(loaded, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="NaN"):
        sample(loaded, {"samples": torch.full((1, 32, 2, 2), float("nan"))})
    clip_like = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(ValueError, match="another text encoder.*SanaTextEncode"):
        sample(loaded, empty_latent(), positive=clip_like)
    with pytest.raises(ValueError, match="cfg 4.5 needs a negative prompt"):
        sample(loaded, empty_latent(), negative=None)
    with pytest.raises(ValueError, match="'scm' sampler needs a Sana-Sprint model"):
        sample(loaded, empty_latent(), sampler="scm")


# -- autoencoder ---------------------------------------------------------------------------------

def test_decode_encode_and_image_to_image(loaded, local):
    vae = loaded["vae"]
    latent = sample(loaded, empty_latent(64, 96))["result"][0]
    image, = run(SanaVAEDecode, samples=latent, vae=vae)
    assert image.shape == (1, 96, 64, 3) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    tiled, = run(SanaVAEDecodeTiled, samples=latent, vae=vae, tile_size=64, overlap=64)
    assert torch.allclose(tiled, image, atol=1e-5)  # overlap >= the receptive field: no seams at all
    photo = torch.rand(1, 100, 70, 4)  # RGBA, sides not multiples of 32
    encoded, = run(SanaVAEEncode, pixels=photo, vae=vae)
    assert encoded["samples"].shape == (1, 32, 4, 3)  # padded to 128 x 96, never cropped
    padded = torch.nn.functional.pad(photo[..., :3].movedim(-1, 1), (0, 26, 0, 28), mode="replicate")
    expected = vae.model.encode(padded * 2 - 1) / SCALING_FACTOR  # raw DC-AE latent
    assert torch.allclose(encoded["samples"], expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(run(SanaVAEDecode, samples=encoded, vae=vae)[0].movedim(-1, 1) * 2 - 1,
                          vae.model.decode(expected * SCALING_FACTOR), atol=1e-5)
    varied = sample(loaded, encoded, denoise=0.6)["result"][0]["samples"]
    assert varied.shape == (1, 32, 4, 3) and not torch.equal(varied, sample(loaded, encoded)["result"][0]["samples"])
    with pytest.raises(ValueError, match="NaN"):
        run(SanaVAEDecode, samples={"samples": torch.full((1, 32, 2, 2), float("nan"))}, vae=vae)
    assert run(SanaVAEEncode, pixels=torch.rand(1, 20, 64, 3), vae=vae)[0]["samples"].shape == (1, 32, 1, 2)


# -- sana-run --------------------------------------------------------------------------------------

# The saved image's size from a 70 x 64 input: padded to 96 x 64 by the VAE, composited back to the input's size,
# grown by 256 px by Pad Image for Outpainting; 64 x 64 from an empty latent.
SAVED_SIZE = {"sana_image_to_image": (96, 64), "sana_inpaint": (70, 64), "sana_outpaint": (326, 64)}


@pytest.mark.parametrize("name", ["sana_1024_text_to_image", "sana_4096_tiled_decode", "sana_sprint_2_steps",
                                  "sana_image_to_image", "sana_lora", "sana_inpaint", "sana_outpaint"])
def test_runner_runs_each_workflow(models, tmp_path, capsys, name):
    example = Image.new("RGBA", (70, 64), (200, 40, 10, 255))
    example.paste((200, 40, 10, 0), (30, 10, 31, 50))  # a painted 1-px stroke: the mask LoadImage gives
    example.save(tmp_path / "example.png")
    size = [] if name in SAVED_SIZE else ["--set", "SanaEmptyLatent.preset=custom", "--set",
                                          "SanaEmptyLatent.width=64", "--set", "SanaEmptyLatent.height=64"]
    previous = host._host
    try:
        code = runner.main([str(ROOT / "workflows" / "api" / f"{name}.json"), "--models", str(models), "--demo",
                            "--output", str(tmp_path / "out"), "--input", str(tmp_path), "--cpu",
                            "--set", "SANA Sampler.steps=2", "--set", "Positive prompt.text=a red fox", *size])
    finally:
        host._host = previous
    captured = capsys.readouterr()
    assert code == 0, captured.err
    written = Path(captured.out.strip().splitlines()[-1])
    assert written.parent == tmp_path / "out" / "SANA" and written.is_file()
    with Image.open(written) as png:
        assert png.size == SAVED_SIZE.get(name, (64, 64))
        prompt = json.loads(png.text["prompt"])
    sampler = next(n for n in prompt.values() if n["class_type"] == "SanaSampler")
    assert sampler["inputs"]["steps"] == 2 and "2 steps" in captured.err


def test_runner_ui_form_embeds_the_workflow(models, tmp_path, capsys):
    previous = host._host
    try:
        code = runner.main([str(ROOT / "workflows" / "sana_sprint_2_steps.json"), "--models", str(models), "--demo",
                            "--output", str(tmp_path), "--cpu", "--set", "SanaEmptyLatent.preset=custom",
                            "--set", "SanaEmptyLatent.width=32", "--set", "SanaEmptyLatent.height=64"])
    finally:
        host._host = previous
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    with Image.open(out) as png:
        assert png.size == (32, 64)
        assert json.loads(png.text["workflow"]) == json.loads((ROOT / "workflows" / "sana_sprint_2_steps.json").read_text())
        assert json.loads(png.text["prompt"])["7"]["class_type"] == "SanaSampler"


def test_runner_errors_are_clear(models, tmp_path, capsys):
    workflow = json.loads((ROOT / "workflows" / "api" / "sana_1024_text_to_image.json").read_text())

    def attempt(prompt, *args):
        path = tmp_path / "w.json"
        path.write_text(json.dumps(prompt))
        previous = host._host
        try:
            code = runner.main([str(path), "--models", str(models), "--output", str(tmp_path), "--cpu", *args])
        finally:
            host._host = previous
        assert code == 1
        return capsys.readouterr().err

    assert "'Sana_1600M_1024px_BF16.pth' was not found in diffusion_models or checkpoints (searched: " \
           f"{models / 'diffusion_models'}" in attempt(workflow)
    unknown = dict(workflow, **{"99": {"class_type": "KSampler", "inputs": {}}})
    assert "node 99 (KSampler): sana-run cannot stand in for this node" in attempt(unknown, "--demo")
    controlnet = json.loads((ROOT / "workflows" / "api" / "sana_controlnet_edges.json").read_text())
    assert "node 8 (Canny): sana-run cannot stand in for this node" in attempt(controlnet, "--demo")
    missing = json.loads(json.dumps(workflow))
    del missing["8"]["inputs"]["positive"]
    assert "node 8 (SanaSampler) is missing its required input 'positive' (CONDITIONING)" in attempt(missing, "--demo")
    assert "has no input 'stepz'" in attempt(workflow, "--demo", "--set", "SanaSampler.stepz=3")
    assert "takes a whole number, not 'many'" in attempt(workflow, "--demo", "--set", "SanaSampler.steps=many")
    assert "node 7 (SanaEmptyLatent) failed: SANA Empty Latent: width 100 is not a multiple of 32" in \
        attempt(workflow, "--demo", "--set", "SanaEmptyLatent.preset=custom", "--set", "SanaEmptyLatent.width=100")
    wrong_link = json.loads(json.dumps(workflow))
    wrong_link["8"]["inputs"]["latent_image"] = ["5", 0]
    assert "takes LATENT but is linked to a CONDITIONING output" in attempt(wrong_link, "--demo")


@pytest.mark.parametrize("form", ["api", "ui"])
def test_runner_runs_a_round_1_workflow(models, tmp_path, capsys, form):
    """Workflows saved by round 1 (SANA_MODEL / SANA_TEXT_ENCODER / SANA_VAE links) still run."""
    path = ROOT / "tests" / "fixtures" / "round1" / ("api/" if form == "api" else "") / "sana_1024_text_to_image.json"
    assert "SANA_MODEL" in path.read_text() or form == "api"
    previous = host._host
    try:
        code = runner.main([str(path), "--models", str(models), "--demo", "--output", str(tmp_path), "--cpu",
                            "--set", "SanaSampler.steps=1", "--set", "SanaEmptyLatent.preset=custom",
                            "--set", "SanaEmptyLatent.width=32", "--set", "SanaEmptyLatent.height=32"])
    finally:
        host._host = previous
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with Image.open(captured.out.strip().splitlines()[-1]) as png:
        assert png.size == (32, 32)


def test_sigmas_and_pag_patch_nodes_outside_comfyui(loaded, local):
    from sana_core.samplers import schedule
    from sana_nodes.custom_sampling import SanaPAG, SanaSamplerSelect, SanaScheduler
    model = loaded["model"]
    shift = defaults_for(model.model.config)["shift"]
    sigmas, = run(SanaScheduler, model=model, sampler="flow_dpm_solver", steps=4, flow_shift=0.0, denoise=0.5)
    assert torch.equal(sigmas, schedule("flow_dpm_solver", 4, shift, 0.5))
    patched, = run(SanaPAG, model=model, scale=2.0, layers="")
    latent = empty_latent()
    assert torch.equal(sample(loaded, latent, model=patched)["result"][0]["samples"],
                       sample(loaded, latent, pag_scale=2.0)["result"][0]["samples"])
    with pytest.raises(ValueError, match=r"layers \[99\] out of range"):
        run(SanaPAG, model=model, scale=2.0, layers="99")
    with pytest.raises(RuntimeError, match="SamplerCustomAdvanced.*SanaSampler outside ComfyUI"):
        run(SanaSamplerSelect, sampler="flow_dpm_solver", guidance=4.5)
    with pytest.raises(ValueError, match="SanaSampler: this MODEL is not a SANA model.*SanaModelLoader"):
        sample(loaded, latent, model=object())


def test_runner_stands_in_for_the_core_nodes_around_sana(models, tmp_path, capsys):
    """loaders -> CLIPTextEncode -> SanaSampler -> VAEDecodeTiled / VAEEncode -> VAEDecode -> SaveImage."""
    prompt = {
        "1": {"class_type": "SanaModelLoader", "inputs": {"model_name": DEMO["transformer"], "dtype": "auto"}},
        "2": {"class_type": "SanaTextEncoderLoader",
              "inputs": {"text_encoder_name": DEMO["text_encoder"], "dtype": "auto", "device": "gpu"}},
        "3": {"class_type": "SanaVAELoader", "inputs": {"vae_name": DEMO["autoencoder"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "6": {"class_type": "SanaEmptyLatent", "inputs": {"preset": "custom", "width": 64, "height": 32, "batch_size": 1}},
        "7": {"class_type": "SanaSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0],
                                                      "latent_image": ["6", 0], "seed": 1, "steps": 1, "cfg": 4.5,
                                                      "pag_scale": 0.0, "flow_shift": 0.0,
                                                      "sampler": "flow_dpm_solver", "denoise": 1.0}},
        "8": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["7", 0], "vae": ["3", 0], "tile_size": 64,
                                                         "overlap": 0, "temporal_size": 64, "temporal_overlap": 8}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["3", 0]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "core"}},
    }
    path = tmp_path / "core.json"
    path.write_text(json.dumps(prompt))
    previous = host._host
    try:
        code = runner.main([str(path), "--models", str(models), "--output", str(tmp_path), "--cpu"])
    finally:
        host._host = previous
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with Image.open(captured.out.strip().splitlines()[-1]) as png:
        assert png.size == (64, 32)
