"""SANA as a ComfyUI model family, in ComfyUI's own process (CPU, float32, the demo models): the core
types our loaders return, core nodes on them, and SamplerCustomAdvanced / KSampler equal to SanaSampler."""
import pytest
import torch

import comfy.model_base
import comfy.model_patcher
import comfy.ops
import comfy.samplers
import comfy.sd
import nodes as core
from comfy_extras.nodes_custom_sampler import BasicGuider, CFGGuider, RandomNoise, SamplerCustomAdvanced
from comfy_extras.nodes_model_advanced import ModelSamplingSD3
from sana_core.autoencoder import SCALING_FACTOR
from sana_core.presets import defaults_for
from comfy_test_helpers import call, rel_err

SEED = 7


@pytest.fixture(scope="module")
def loaded(nodes, demo):
    sprint, = call(nodes["SanaModelLoader"], "sana_sprint_demo.safetensors", "fp32")
    return dict(demo, sprint=sprint)


def empty(nodes, width=64, height=96, batch=1):
    return call(nodes["SanaEmptyLatent"], "custom", width, height, batch)[0]


def sana_sampler(nodes, loaded, latent, **settings):
    kw = dict(model=loaded["model"], positive=loaded["positive"], negative=loaded["negative"], latent_image=latent,
              seed=SEED, steps=3, cfg=4.5, pag_scale=0.0, flow_shift=0.0, sampler="flow_dpm_solver", denoise=1.0)
    kw.update(settings)
    return call(nodes["SanaSampler"], **kw)[0]["samples"]


def custom_advanced(guider, sampler, sigmas, latent):
    noise, = RandomNoise().get_noise(SEED)
    return SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)[0]["samples"]


def sigmas(nodes, model, sampler, steps=3, denoise=1.0, shift=0.0):
    return call(nodes["SanaScheduler"], model, sampler, steps, shift, denoise)[0]


# -- the core types --------------------------------------------------------------------------------

def test_loaders_return_core_model_clip_and_vae(loaded):
    model, clip, vae = loaded["model"], loaded["clip"], loaded["vae"]
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(model.model, comfy.model_base.BaseModel)
    assert model.model.model_type == comfy.model_base.ModelType.FLOW
    sampling = model.get_model_object("model_sampling")
    config = model.model.diffusion_model.transformer.config
    assert sampling.shift == defaults_for(config)["shift"] and sampling.multiplier == 1000
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert vae.spacial_compression_decode() == vae.spacial_compression_encode() == 32 and vae.latent_channels == 32
    assert model.model_size() > 0 and vae.patcher.model_size() > 0
    dit = model.model.diffusion_model.transformer  # built from ComfyUI's layers: they cast for low-VRAM loads
    assert isinstance(dit.blocks[0].attn.qkv, comfy.ops.disable_weight_init.Linear)
    assert isinstance(dit.blocks[0].mlp.inverted_conv.conv, comfy.ops.disable_weight_init.Conv2d)


def test_latent_format_scales_and_previews_with_the_dcae_projection(loaded):
    fmt = loaded["model"].get_model_object("latent_format")
    assert fmt.latent_channels == 32 and fmt.scale_factor == SCALING_FACTOR == 0.41407
    raw = torch.randn(1, 32, 2, 3)
    assert torch.equal(fmt.process_in(raw), raw * 0.41407) and torch.allclose(fmt.process_out(fmt.process_in(raw)), raw)
    weight, bias = loaded["vae"].first_stage_model.preview_projection()
    assert fmt.latent_rgb_factors == weight.tolist() and fmt.latent_rgb_factors_bias == bias.tolist()
    assert len(fmt.latent_rgb_factors) == 32 and len(fmt.latent_rgb_factors[0]) == 3


def test_clip_text_encode_follows_sanas_recipe(nodes, loaded):
    clip = loaded["clip"]
    (emb, extra), = core.CLIPTextEncode().encode(clip, "a red fox in the snow")[0]
    (ours, our_extra), = loaded["positive"]
    assert torch.equal(emb, ours) and torch.equal(extra["attention_mask"], our_extra["attention_mask"])
    (empty_emb, empty_extra), = core.CLIPTextEncode().encode(clip, "")[0]  # empty: no instruction (a negative)
    assert torch.equal(empty_emb, loaded["negative"][0][0])
    assert emb.shape[1] == 300 and (emb[0, extra["attention_mask"][0] == 0] == 0).all()  # zero padding rows


# -- sampling equivalence --------------------------------------------------------------------------

def test_core_euler_with_sana_sigmas_equals_sana_sampler_flow_euler(nodes, loaded):
    latent = empty(nodes)
    ours = sana_sampler(nodes, loaded, latent, sampler="flow_euler")
    guider, = CFGGuider().get_guider(loaded["model"], loaded["positive"], loaded["negative"], 4.5)
    theirs = custom_advanced(guider, comfy.samplers.sampler_object("euler"),
                             sigmas(nodes, loaded["model"], "flow_euler"), latent)
    assert rel_err(theirs, ours) < 1e-5


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_sana_sampler_select_equals_sana_sampler_flow_dpm_solver(nodes, loaded, denoise):
    latent = empty(nodes) if denoise == 1.0 else {"samples": torch.randn(1, 32, 3, 2, generator=torch.manual_seed(1))}
    ours = sana_sampler(nodes, loaded, latent, denoise=denoise)
    guider, = CFGGuider().get_guider(loaded["model"], loaded["positive"], loaded["negative"], 4.5)
    sampler, = call(nodes["SanaSamplerSelect"], "flow_dpm_solver", 4.5)
    theirs = custom_advanced(guider, sampler, sigmas(nodes, loaded["model"], "flow_dpm_solver", denoise=denoise),
                             latent)
    assert rel_err(theirs, ours) < 1e-5


def test_sprint_through_sampler_custom_advanced_with_the_scm_sampler(nodes, loaded):
    latent = empty(nodes)
    ours = sana_sampler(nodes, loaded, latent, model=loaded["sprint"], negative=None, sampler="scm", steps=2, cfg=3.0)
    guider, = BasicGuider().get_guider(loaded["sprint"], loaded["positive"])
    sampler, = call(nodes["SanaSamplerSelect"], "scm", 3.0)  # the embedded guidance reaches the model
    theirs = custom_advanced(guider, sampler, sigmas(nodes, loaded["sprint"], "scm", steps=2), latent)
    assert rel_err(theirs, ours) < 1e-5
    other, = call(nodes["SanaSamplerSelect"], "scm", 6.0)
    assert rel_err(custom_advanced(guider, other, sigmas(nodes, loaded["sprint"], "scm", steps=2), latent), ours) > 1e-3


def test_pag_patch_equals_sana_sampler_pag_and_sana_sampler_reads_it(nodes, loaded):
    latent = empty(nodes)
    ours = sana_sampler(nodes, loaded, latent, pag_scale=2.0)
    patched, = call(nodes["SanaPAG"], loaded["model"], 2.0, "")
    guider, = CFGGuider().get_guider(patched, loaded["positive"], loaded["negative"], 4.5)
    sampler, = call(nodes["SanaSamplerSelect"], "flow_dpm_solver", 4.5)
    theirs = custom_advanced(guider, sampler, sigmas(nodes, patched, "flow_dpm_solver"), latent)
    assert rel_err(theirs, ours) < 1e-5
    assert torch.equal(sana_sampler(nodes, loaded, latent, model=patched), ours)  # the patch acts on SanaSampler
    assert rel_err(sana_sampler(nodes, loaded, latent), ours) > 1e-3


def test_model_sampling_sd3_sets_the_shift_for_every_sampler(nodes, loaded):
    latent = empty(nodes)
    shifted, = ModelSamplingSD3().patch(loaded["model"], 6.0)
    assert shifted.get_model_object("model_sampling").shift == 6.0
    assert torch.equal(sana_sampler(nodes, loaded, latent, model=shifted),
                       sana_sampler(nodes, loaded, latent, flow_shift=6.0))
    assert torch.equal(sigmas(nodes, shifted, "flow_dpm_solver"), sigmas(nodes, loaded["model"], "flow_dpm_solver",
                                                                            shift=6.0))


def test_ksampler_runs_with_core_samplers_and_schedulers(nodes, loaded):
    latent = empty(nodes)
    for sampler, scheduler in (("euler", "simple"), ("dpmpp_2m", "sgm_uniform"), ("euler_ancestral", "normal")):
        out, = core.KSampler().sample(loaded["model"], SEED, 3, 4.5, sampler, scheduler, loaded["positive"],
                                      loaded["negative"], latent)
        assert out["samples"].shape == (1, 32, 3, 2) and torch.isfinite(out["samples"]).all()


# -- conditioning nodes ------------------------------------------------------------------------------

def test_conditioning_nodes_carry_the_attention_mask(nodes, loaded):
    latent = empty(nodes)
    positive, negative, model = loaded["positive"], loaded["negative"], loaded["model"]

    def euler(pos, neg=negative):
        guider, = CFGGuider().get_guider(model, pos, neg, 4.5)
        return custom_advanced(guider, comfy.samplers.sampler_object("euler"), sigmas(nodes, model, "flow_euler"),
                               latent)

    plain = euler(positive)
    combined, = core.ConditioningCombine().combine(positive, positive)
    assert rel_err(euler(combined), plain) < 1e-5  # the average of one caption twice
    whole, = core.ConditioningSetTimestepRange().set_range(positive, 0.0, 1.0)
    assert rel_err(euler(whole), plain) < 1e-5
    half, = core.ConditioningSetTimestepRange().set_range(positive, 0.0, 0.5)
    rest, = core.ConditioningSetTimestepRange().set_range(negative, 0.5, 1.0)
    both, = core.ConditioningCombine().combine(half, rest)
    assert rel_err(euler(both), plain) > 1e-4 and torch.isfinite(euler(both)).all()

    (joined, extra), = core.ConditioningConcat().concat(positive, negative)[0]
    assert joined.shape[1] == 600 and extra["attention_mask"].shape[1] == 300  # core keeps the first dict only
    conds = model.model.extra_conds(cross_attn=joined, attention_mask=extra["attention_mask"], device="cpu")
    expected = torch.cat([positive[0][1]["attention_mask"], negative[0][1]["attention_mask"]], dim=1)
    assert torch.equal(conds["attention_mask"].cond, expected.to(conds["attention_mask"].cond.dtype))
    assert torch.isfinite(euler([[joined, extra]])).all()

    zero, = core.ConditioningZeroOut().zero_out(negative)
    assert not zero[0][0].any() and torch.isfinite(euler(positive, zero)).all()


# -- the VAE ----------------------------------------------------------------------------------------

def test_core_vae_nodes_equal_ours(nodes, loaded):
    vae = loaded["vae"]
    latent = {"samples": torch.randn(1, 32, 3, 2, generator=torch.manual_seed(3))}
    image, = core.VAEDecode().decode(vae, latent)
    ours, = call(nodes["SanaVAEDecode"], latent, vae)
    assert image.shape == (1, 96, 64, 3) and torch.equal(image, ours)
    tiled, = core.VAEDecodeTiled().decode(vae, latent, 64, 0)  # overlap raised to the exact context
    assert torch.allclose(tiled, image, atol=1e-5)
    photo = torch.rand(1, 70, 40, 3)
    encoded, = core.VAEEncode().encode(vae, photo)
    assert encoded["samples"].shape == (1, 32, 3, 2)  # padded to 96 x 64, not cropped to 64 x 32
    assert torch.equal(encoded["samples"], call(nodes["SanaVAEEncode"], photo, vae)[0]["samples"])


def test_the_caption_side_is_computed_once_per_run_and_batch(nodes, loaded, monkeypatch):
    transformer = loaded["model"].model.diffusion_model.transformer
    calls = []
    encode = transformer.encode_caption
    monkeypatch.setattr(transformer, "encode_caption", lambda *a, **k: calls.append(1) or encode(*a, **k))
    latent = empty(nodes)
    sampler, = call(nodes["SanaSamplerSelect"], "flow_dpm_solver", 4.5)
    guider, = CFGGuider().get_guider(loaded["model"], loaded["positive"], loaded["negative"], 4.5)
    first = custom_advanced(guider, sampler, sigmas(nodes, loaded["model"], "flow_dpm_solver"), latent)
    assert len(calls) == 1  # 3 steps, cond and uncond in one batch
    patched, = call(nodes["SanaPAG"], loaded["model"], 2.0, "")
    guider, = CFGGuider().get_guider(patched, loaded["positive"], loaded["negative"], 4.5)
    custom_advanced(guider, sampler, sigmas(nodes, patched, "flow_dpm_solver"), latent)
    assert len(calls) == 3  # a new run; the PAG pass is its own batch
    guider, = CFGGuider().get_guider(loaded["model"], loaded["negative"], loaded["positive"], 4.5)
    swapped = custom_advanced(guider, sampler, sigmas(nodes, loaded["model"], "flow_dpm_solver"), latent)
    assert len(calls) == 4 and rel_err(swapped, first) > 1e-3  # new conditionings are never served stale


def test_sana_sampler_runs_comfyuis_loop_for_what_only_it_honours(nodes, loaded):
    """Timestep ranges, combined conditionings (and ControlNets, hooks, other nodes' patches) act on SanaSampler
    as on KSampler: it hands those to ComfyUI's loop with our SAMPLER and SIGMAS, which gives its own result."""
    from sana_nodes import comfy_family
    latent = empty(nodes)
    plain = sana_sampler(nodes, loaded, latent)
    assert comfy_family.core_loop_reason(loaded["model"], loaded["positive"], loaded["negative"]) is None
    ranged, = core.ConditioningSetTimestepRange().set_range(loaded["positive"], 0.0, 1.0)
    assert comfy_family.core_loop_reason(loaded["model"], ranged) == "conditioning with end_percent, start_percent"
    assert rel_err(sana_sampler(nodes, loaded, latent, positive=ranged), plain) < 1e-5
    combined, = core.ConditioningCombine().combine(loaded["positive"], loaded["positive"])
    assert rel_err(sana_sampler(nodes, loaded, latent, positive=combined), plain) < 1e-5
    half, = core.ConditioningSetTimestepRange().set_range(loaded["positive"], 0.0, 0.5)
    assert rel_err(sana_sampler(nodes, loaded, latent, positive=half), plain) > 1e-3  # the range acts
    sprint = sana_sampler(nodes, loaded, latent, model=loaded["sprint"], negative=None, sampler="scm", steps=2)
    assert rel_err(sana_sampler(nodes, loaded, latent, model=loaded["sprint"], positive=ranged, negative=None,
                                sampler="scm", steps=2), sprint) < 1e-5
