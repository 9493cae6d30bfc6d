"""Inpainting on SANA models in ComfyUI's own process (CPU, float32, the demo models): the LATENT's noise_mask is
honoured by SanaSampler (its own loop and ComfyUI's), KSampler and SamplerCustomAdvanced with ComfyUI's convention,
pixel masks survive the 32x reduction under every sampler, Differential Diffusion acts, and the outpainting
chain of core nodes runs."""
import pytest
import torch

import comfy.samplers
import nodes as core
from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced
from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion
from sana_core.inpaint import latent_mask
from comfy_test_helpers import call, rel_err

SEED = 7
H, W = 96, 64  # pixels; the latent is 3 x 2


def image_latent(mask=None, seed=1):
    """A LATENT as VAE Encode makes it (raw, 3 x 2), with Set Latent Noise Mask's mask."""
    latent = {"samples": torch.randn(1, 32, 3, 2, generator=torch.manual_seed(seed))}
    return latent if mask is None else core.SetLatentNoiseMask().set_mask(latent, mask)[0]


def sana_sampler(nodes, demo, latent, **settings):
    kw = dict(model=demo["model"], positive=demo["positive"], negative=demo["negative"], latent_image=latent,
              seed=SEED, steps=3, cfg=4.5, pag_scale=0.0, flow_shift=0.0, sampler="flow_dpm_solver", denoise=1.0)
    kw.update(settings)
    return call(nodes["SanaSampler"], **kw)[0]["samples"]


def custom_advanced(nodes, demo, sampler, sigma_grid, latent, model=None, denoise=1.0):
    model = model or demo["model"]
    guider, = CFGGuider().get_guider(model, demo["positive"], demo["negative"], 4.5)
    sigmas, = call(nodes["SanaScheduler"], model, sigma_grid, 3, 0.0, denoise)
    noise, = RandomNoise().get_noise(SEED)
    return SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


def ksampler(demo, latent, model=None, denoise=1.0):
    out, = core.KSampler().sample(model or demo["model"], SEED, 3, 4.5, "euler", "simple", demo["positive"],
                                  demo["negative"], latent, denoise)
    return out["samples"]


def test_an_all_zeros_mask_gives_the_input_latent_back(nodes, demo):
    latent = image_latent(torch.zeros(1, H, W))
    out = call(nodes["SanaSampler"], demo["model"], demo["positive"], latent, SEED, 3, 4.5, 0.0, 0.0,
               "flow_dpm_solver", 1.0, negative=demo["negative"])[0]
    assert torch.equal(out["samples"], latent["samples"]) and out["noise_mask"] is latent["noise_mask"]
    ours, = call(nodes["SanaSamplerSelect"], "flow_dpm_solver", 4.5)
    for theirs in (ksampler(demo, latent), ksampler(demo, latent, denoise=0.5),
                   custom_advanced(nodes, demo, comfy.samplers.sampler_object("euler"), "flow_euler", latent),
                   custom_advanced(nodes, demo, ours, "flow_dpm_solver", latent)):
        assert (theirs - latent["samples"]).abs().max() < 1e-6


@pytest.mark.parametrize("mask", ["binary", "soft"])
def test_core_euler_with_a_mask_equals_sana_sampler_flow_euler(nodes, demo, mask):
    pixels = torch.zeros(1, H, W)
    pixels[:, :40, 10:20] = 1.0 if mask == "binary" else 0.6  # opens cells (0, 0) and (1, 0)
    latent = image_latent(pixels)
    ours = sana_sampler(nodes, demo, latent, sampler="flow_euler")
    theirs = custom_advanced(nodes, demo, comfy.samplers.sampler_object("euler"), "flow_euler", latent)
    assert rel_err(theirs, ours) < 1e-5
    kept = latent_mask(pixels, 1, 3, 2)[0, 0] == 0
    assert (ours - latent["samples"])[..., kept].abs().max() < 1e-5  # the unmasked cells keep the image
    assert (ours - latent["samples"])[..., ~kept].abs().min() > 1e-3


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_our_sampler_with_a_mask_equals_sana_sampler_in_both_loops(nodes, demo, denoise):
    pixels = torch.zeros(1, H, W)
    pixels[:, 50:, :] = 1.0
    latent = image_latent(pixels)
    own = sana_sampler(nodes, demo, latent, denoise=denoise)
    sampler, = call(nodes["SanaSamplerSelect"], "flow_dpm_solver", 4.5)
    assert rel_err(custom_advanced(nodes, demo, sampler, "flow_dpm_solver", latent, denoise=denoise), own) < 1e-5
    ranged, = core.ConditioningSetTimestepRange().set_range(demo["positive"], 0.0, 1.0)  # ComfyUI's loop
    assert rel_err(sana_sampler(nodes, demo, latent, positive=ranged, denoise=denoise), own) < 1e-5
    assert (own[:, :, 0] - latent["samples"][:, :, 0]).abs().max() < 1e-6  # the first latent row is kept


def test_a_one_pixel_stroke_opens_its_latent_cell_under_every_sampler(nodes, demo):
    pixels = torch.zeros(1, H, W)
    pixels[:, 40:90, 37] = 1.0  # one pixel wide, in latent column 1, rows 1 and 2
    latent = image_latent(pixels)
    opened = torch.tensor([[False, False], [False, True], [False, True]])
    for out in (sana_sampler(nodes, demo, latent), ksampler(demo, latent)):
        changed = (out - latent["samples"]).abs().amax(dim=1)[0] > 1e-3
        assert torch.equal(changed, opened)


def test_differential_diffusion_acts_on_soft_masks(nodes, demo):
    pixels = torch.linspace(0, 1, W).expand(1, H, W).clone()  # a ramp: cells 0.48 and 1
    latent = image_latent(pixels)
    patched = DifferentialDiffusion.execute(demo["model"]).result[0]
    plain, differential = sana_sampler(nodes, demo, latent), sana_sampler(nodes, demo, latent, model=patched)
    assert torch.isfinite(differential).all() and rel_err(differential, plain) > 1e-3
    assert rel_err(ksampler(demo, latent, model=patched), ksampler(demo, latent)) > 1e-3
    sampler, = call(nodes["SanaSamplerSelect"], "flow_dpm_solver", 4.5)  # SanaSampler hands it to ComfyUI's loop
    assert rel_err(custom_advanced(nodes, demo, sampler, "flow_dpm_solver", latent, model=patched),
                   differential) < 1e-5


def test_outpainting_with_core_nodes(nodes, demo):
    vae = demo["vae"]
    photo = torch.rand(1, 64, 40, 3, generator=torch.manual_seed(2))
    padded, mask = core.ImagePadForOutpaint().expand_image(photo, 0, 0, 32, 32, 8)
    assert padded.shape == (1, 96, 72, 3)
    latent, = call(nodes["SanaVAEEncode"], padded, vae)  # 72 px padded to 96, never cropped
    assert latent["samples"].shape == (1, 32, 3, 3)
    masked, = core.SetLatentNoiseMask().set_mask(latent, mask)
    out = sana_sampler(nodes, demo, masked)
    assert (out - latent["samples"])[..., 0, 0].abs().max() < 1e-6  # the one cell beyond the pad node's feathering
    assert (out - latent["samples"])[..., 2, :].abs().min() > 1e-3  # the padded band is generated
    image, = call(nodes["SanaVAEDecode"], {"samples": out}, vae)
    final, = call(nodes["SanaInpaintComposite"], padded, image, mask, 8)
    assert final.shape == padded.shape and torch.equal(final[:, :40, :20], padded[:, :40, :20])
    crop, = core.VAEEncodeForInpaint().encode(vae, padded, mask, 0)  # crops 72 -> 64 around the centre
    assert crop["samples"].shape == (1, 32, 3, 2) and crop["noise_mask"].shape[-2:] == (96, 64)
    out = ksampler(demo, crop)
    assert torch.isfinite(out).all() and out.shape == (1, 32, 3, 2)


def test_sana_runs_stand_ins_for_the_mask_nodes_equal_comfyuis():
    from sana_nodes import runner
    photo = torch.rand(2, 50, 70, 3, generator=torch.manual_seed(3))
    for sides in ((0, 0, 32, 0, 40), (16, 8, 0, 24, 10), (8, 8, 8, 8, 30), (0, 32, 0, 0, 0)):
        ours = runner.ImagePadForOutpaint().expand_image(photo, *sides)
        theirs = core.ImagePadForOutpaint().expand_image(photo, *sides)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), sides
    mask = torch.rand(1, 50, 70)
    assert torch.equal(runner.SetLatentNoiseMask().set_mask(image_latent(), mask)[0]["noise_mask"],
                       core.SetLatentNoiseMask().set_mask(image_latent(), mask)[0]["noise_mask"])
