"""SANA LoRA Loader outside ComfyUI (nodes/host.py's LocalHost, as sana-run runs it), on the CPU with the demo
models and the demo LoRA in models/loras: the stand-in MODEL carries its LoRAs and the DiT computes with exactly
those merged (stacked, the input MODEL left unchanged), errors in the node's words, and sana-run reading LoRAs
from --models DIR/loras."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sana_core import load_transformer
from sana_core.checkpoints import CheckpointError
from sana_core.demo import write_demo_lora, write_demo_models
from sana_core.lora import apply_lora
from sana_nodes import host, runner
from sana_nodes.conditioning import SanaTextEncode
from sana_nodes.latent import SanaEmptyLatent
from sana_nodes.loaders import SanaModelLoader, SanaTextEncoderLoader, SanaVAELoader
from sana_nodes.lora import SanaLoraLoader
from sana_nodes.sampling import SanaSampler
from test_nodes import run

ROOT = Path(__file__).resolve().parents[1]
DEMO_LORA = "sana_demo_lora.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The demo models (with the demo LoRA), a second LoRA, and files that must be refused."""
    folder = tmp_path_factory.mktemp("models")
    write_demo_models(folder)
    loras = folder / "loras"
    write_demo_lora(loras / "second.safetensors", rank=2, alpha=3.0, seed=5)
    write_demo_lora(loras / "narrow.safetensors", width=32)  # for a SANA model of another width
    flux = {f"transformer.single_transformer_blocks.0.attn.to_q.lora_{p}.weight": torch.zeros(4, 4) for p in "AB"}
    save_file(flux, loras / "flux_style.safetensors")
    shutil.copy(folder / "diffusion_models" / "sana_demo.safetensors", loras / "not_a_lora.safetensors")
    return folder


@pytest.fixture(scope="module")
def loaded(models):
    previous = host._host
    host.use(host.LocalHost(models, device="cpu", output_dir=models / "out", input_dir=models))
    encoder, = run(SanaTextEncoderLoader, text_encoder_name="gemma2_demo.safetensors", dtype="fp32", device="gpu")
    yield dict(model=run(SanaModelLoader, model_name="sana_demo.safetensors", dtype="fp32")[0],
               vae=run(SanaVAELoader, vae_name="sana_demo_dcae.safetensors")[0],
               positive=run(SanaTextEncode, text_encoder=encoder, text="a red fox", instruction=True)[0],
               negative=run(SanaTextEncode, text_encoder=encoder, text="", instruction=False)[0])
    host._host = previous


def sample(loaded, model):
    latent, = run(SanaEmptyLatent, preset="custom", width=64, height=64, batch_size=1)
    return run(SanaSampler, model=model, positive=loaded["positive"], negative=loaded["negative"], latent_image=latent,
               seed=7, steps=2, cfg=4.5, pag_scale=0.0, flow_shift=0.0, sampler="flow_dpm_solver",
               denoise=1.0)[0]["samples"]


def lora(model, name=DEMO_LORA, strength=1.0):
    return run(SanaLoraLoader, model=model, lora_name=name, strength_model=strength)[0]


def test_the_dit_computes_with_exactly_the_models_loras(loaded, models):
    model = loaded["model"]
    plain = sample(loaded, model)
    with_lora = lora(model)
    assert not torch.allclose(sample(loaded, with_lora), plain, atol=1e-4)  # the LoRA changes the image
    assert torch.equal(sample(loaded, model), plain)  # the input MODEL is unchanged: the LoRA is taken out again
    assert lora(model, strength=0.0) is model

    stacked = lora(with_lora, "second.safetensors", -0.5)
    reference = load_transformer(models / "diffusion_models" / "sana_demo.safetensors", dtype=torch.float32,
                                 device="cpu")
    apply_lora(reference, models / "loras" / DEMO_LORA, 1.0)
    apply_lora(reference, models / "loras" / "second.safetensors", -0.5)
    merged = stacked.ready().state_dict()
    assert all(torch.equal(merged[k], v) for k, v in reference.state_dict().items())  # both, as the library merges
    assert torch.equal(sample(loaded, model), plain)


@pytest.mark.parametrize("name, words", [
    ("flux_style.safetensors", "is a LoRA for Flux, not for a SANA transformer"),
    ("narrow.safetensors", "is 64 x 64; the model is"),  # another SANA width: the shapes
    ("not_a_lora.safetensors", "is not a LoRA"),
])
def test_files_that_do_not_fit_are_refused_in_the_nodes_words(loaded, name, words):
    with pytest.raises(CheckpointError, match="SANA LoRA Loader: lora_name") as error:
        lora(loaded["model"], name)
    assert words in str(error.value) and name in str(error.value)


def test_a_model_of_another_family_or_a_missing_file_is_refused(loaded):
    with pytest.raises(ValueError, match="SanaLoraLoader: this MODEL is not a SANA model"):
        lora(loaded["vae"])
    answer = SanaLoraLoader.VALIDATE_INPUTS(lora_name="missing.safetensors")
    assert "'missing.safetensors' was not found in loras" in answer
    assert DEMO_LORA in SanaLoraLoader.INPUT_TYPES()["required"]["lora_name"][0]


def test_sana_run_reads_loras_from_the_models_folder(models, tmp_path, capsys):
    def image(strength):
        previous = host._host
        try:
            code = runner.main([str(ROOT / "workflows" / "api" / "sana_lora.json"), "--models", str(models), "--demo",
                                "--output", str(tmp_path / str(strength)), "--cpu", "--set", "SANA Sampler.steps=2",
                                "--set", "SanaEmptyLatent.preset=custom", "--set", "SanaEmptyLatent.width=64",
                                "--set", "SanaEmptyLatent.height=64", "--set",
                                f"SanaLoraLoader.strength_model={strength}"])
        finally:
            host._host = previous
        out = capsys.readouterr()
        assert code == 0, out.err
        with Image.open(out.out.strip().splitlines()[-1]) as png:
            return np.asarray(png).astype(int)
    assert np.abs(image(1.0) - image(0.0)).max() > 0
