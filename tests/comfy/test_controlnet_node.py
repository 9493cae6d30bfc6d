"""SANA ControlNets in ComfyUI (nodes/controlnet.py), in ComfyUI's own process (CPU, float32, the demo models and
the demo ControlNet): SANA ControlNet Loader -> the core Apply ControlNet -> KSampler, SamplerCustomAdvanced and
SANA Sampler; the result equals the library's controlled sampling (hint encoded by the VAE and scaled, strength,
both CFG halves); chained ControlNets; the start/end window (outside it the plain model, bit for bit); the errors.
Runs under ComfyUI's Python:

    PYTHONPATH=$COMFYUI_DIR:. COMFYUI_DIR=... $COMFYUI_PYTHON -m pytest tests/comfy/test_controlnet_node.py
"""
import dataclasses
import types

import pytest
import torch
from safetensors.torch import save_file

import comfy.controlnet
import comfy.model_management
import comfy.ops
import nodes as core  # ComfyUI's (tests/comfy run in its folder; conftest.py loaded ComfyUI and the pack)
from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced
from sana_core import CheckpointError
from sana_core.controlnet import ControlNet, encode_hint
from sana_core.guidance import sample_latents
from sana_core.transformer import config_metadata, random_state_dict
from sana_nodes.controlnet import KEY, control_class
from sana_nodes.sampling import comfy_noise
from comfy_test_helpers import call, rel_err

DEMO = "sana_demo_controlnet.safetensors"
H, W = 96, 64  # image; latent 3 x 2
SEED = 7


@pytest.fixture(scope="module")
def loaded(nodes, demo):
    official, = call(nodes["SanaControlNetLoader"], DEMO, "auto")
    port, = call(nodes["SanaControlNetLoader"], DEMO, "diffusers")  # the same file run by diffusers' graph
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 1, H, W, 3, generator=g)
    return dict(demo, official=official, port=port, image=images[0], edges=images[1])


def apply(loaded, control_net, image, strength=1.0, start=0.0, end=1.0, conds=None, vae="vae"):
    positive, negative = conds or (loaded["positive"], loaded["negative"])
    return core.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, image, strength, start,
                                                           end, vae=loaded[vae] if vae else None)


def latent():
    return {"samples": torch.zeros(1, 32, H // 32, W // 32)}


def custom_advanced(nodes, loaded, positive, negative, sampler="flow_dpm_solver", steps=3):
    guider, = CFGGuider().get_guider(loaded["model"], positive, negative, 4.5)
    select, = call(nodes["SanaSamplerSelect"], sampler, 4.5)
    sigmas, = call(nodes["SanaScheduler"], loaded["model"], sampler, steps, 0.0, 1.0)
    noise, = RandomNoise().get_noise(SEED)
    return SamplerCustomAdvanced().sample(noise, guider, select, sigmas, latent())[0]["samples"]


def sana_sampler(nodes, loaded, positive, negative, sampler="flow_dpm_solver", steps=3):
    return call(nodes["SanaSampler"], loaded["model"], positive, latent(), SEED, steps, 4.5, 0.0, 0.0, sampler, 1.0,
                negative=negative)[0]["samples"]


def library(loaded, controls, steps=3):
    """sana_core's controlled sampling (SanaSampler's own loop, SanaPipeline's): what ComfyUI must give."""
    dit = loaded["model"].model.diffusion_model.transformer
    (cond, c), = loaded["positive"]
    (uncond, u), = loaded["negative"]
    shift = loaded["model"].get_model_object("model_sampling").shift
    out = sample_latents(dit, comfy_noise(latent()["samples"].shape, SEED), cond, c["attention_mask"], uncond,
                         u["attention_mask"], sampler="flow_dpm_solver", steps=steps, cfg=4.5, shift=shift,
                         controls=controls)
    return out / loaded["model"].get_model_object("latent_format").scale_factor  # raw latent, as ComfyUI's LATENT


def hint(loaded, image):
    """The library's hint: the image encoded by the DC-AE and scaled, as the official pipeline makes it."""
    return encode_hint(loaded["vae"].first_stage_model, image.movedim(-1, 1), W, H)


# -- the loader and the wiring ---------------------------------------------------------------------

def test_loader_gives_a_control_net_running_the_files_graph_or_the_override(nodes, loaded):
    assert DEMO in nodes["SanaControlNetLoader"].INPUT_TYPES()["required"]["control_net_name"][0]
    assert isinstance(loaded["official"], comfy.controlnet.ControlBase)
    assert loaded["official"].net.graph == "official" and loaded["port"].net.graph == "diffusers"
    assert loaded["official"].net.config.depth == 1 and loaded["official"].net.config.width == 64
    net = loaded["port"].net  # built from ComfyUI's layers, as the DiT: they cast for low-VRAM loads
    assert isinstance(net.before_proj, comfy.ops.disable_weight_init.Linear)
    assert isinstance(net.blocks[0].mlp.inverted_conv.conv, comfy.ops.disable_weight_init.Conv2d)
    assert isinstance(net.t_embedder.mlp[0], comfy.ops.disable_weight_init.Linear)


def test_apply_controlnet_under_comfyuis_loop_equals_the_library(nodes, loaded):
    """SamplerCustomAdvanced (ComfyUI's loop, as KSampler's) with Apply ControlNet (strength 0.8, the SANA VAE)
    gives sana_core's controlled sampling with the hint encoded and scaled; SANA Sampler hands such a
    conditioning to that loop and gives the same."""
    positive, negative = apply(loaded, loaded["official"], loaded["image"], 0.8)
    got = custom_advanced(nodes, loaded, positive, negative)
    want = library(loaded, [(loaded["official"].net, hint(loaded, loaded["image"]), 0.8)])
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, library(loaded, [])) > 1e-3  # the ControlNet acts
    assert torch.equal(sana_sampler(nodes, loaded, positive, negative), got)


def test_chained_controlnets_and_ksampler(nodes, loaded):
    """Two Apply ControlNets in a row (the official graph on one image, diffusers' on another) both act, as the
    library's two controls; KSampler runs them too."""
    conds = apply(loaded, loaded["official"], loaded["image"], 0.8)
    positive, negative = apply(loaded, loaded["port"], loaded["edges"], 0.5, conds=conds)
    want = library(loaded, [(loaded["official"].net, hint(loaded, loaded["image"]), 0.8),
                            (loaded["port"].net, hint(loaded, loaded["edges"]), 0.5)])
    assert rel_err(custom_advanced(nodes, loaded, positive, negative), want) < 1e-5
    out, = core.KSampler().sample(loaded["model"], SEED, 2, 4.5, "euler", "simple", positive, negative, latent())
    plain, = core.KSampler().sample(loaded["model"], SEED, 2, 4.5, "euler", "simple", loaded["positive"],
                                    loaded["negative"], latent())
    assert torch.isfinite(out["samples"]).all() and rel_err(out["samples"], plain["samples"]) > 1e-3


def test_outside_the_start_end_window_the_model_is_the_plain_model(nodes, loaded):
    positive, negative = apply(loaded, loaded["official"], loaded["image"], 1.0, 0.2, 0.6)
    control = positive[0][1]["control"]
    model = loaded["model"].model
    control.pre_run(model, lambda percent: model.model_sampling.percent_to_sigma(percent))
    x = torch.randn(2, 32, H // 32, W // 32, generator=torch.manual_seed(1))
    context = torch.cat([loaded["negative"][0][0], loaded["positive"][0][0]])
    mask = torch.cat([loaded["negative"][0][1]["attention_mask"], loaded["positive"][0][1]["attention_mask"]])

    def dit(sigma, control_output):
        t = torch.full((2,), sigma * 1000.0)
        with torch.no_grad():
            return model.diffusion_model(x, t, context, mask, control=control_output, transformer_options={})
    start, end = control.timestep_range  # sigmas at 20 % and 60 % of the schedule
    for sigma in (0.999, start + 1e-3, end - 1e-3, 0.01):  # before the start, past the end
        assert control.get_control(x, torch.tensor([sigma]), {}, 2, {}) is None
        assert torch.equal(dit(sigma, None), dit(sigma, control.get_control(x, torch.tensor([sigma]), {}, 2, {})))
    inside = control.get_control(x, torch.tensor([(start + end) / 2]), {}, 2, {})
    assert [net for net, _, _ in inside[KEY]] == [loaded["official"].net]
    assert rel_err(dit((start + end) / 2, inside), dit((start + end) / 2, None)) > 1e-3
    # a whole sampling run outside the window is the plain run, bit for bit
    late = apply(loaded, loaded["official"], loaded["image"], 1.0, 0.99, 1.0)
    assert torch.equal(custom_advanced(nodes, loaded, *late), custom_advanced(nodes, loaded, loaded["positive"],
                                                                              loaded["negative"]))


# -- errors ----------------------------------------------------------------------------------------

def test_a_vae_is_required(nodes, loaded):
    positive, negative = apply(loaded, loaded["official"], loaded["image"], vae=None)
    with pytest.raises(ValueError, match="Apply ControlNet: .*needs the vae input connected"):
        custom_advanced(nodes, loaded, positive, negative, steps=1)


def test_a_controlnet_of_another_family_on_a_sana_model(nodes, loaded):
    other = comfy.controlnet.ControlNet(torch.nn.Linear(1, 1), load_device=torch.device("cpu"))  # e.g. an SD one
    positive, negative = apply(loaded, other, loaded["image"])
    with pytest.raises(ValueError, match="Apply ControlNet: a ControlNet of another model family .* SANA ControlNet "
                                         "Loader"):
        core.KSampler().sample(loaded["model"], SEED, 1, 4.5, "euler", "simple", positive, negative, latent())
    chained = apply(loaded, loaded["official"], loaded["image"], conds=(positive, negative))
    with pytest.raises(ValueError, match="another model family"):  # anywhere in a chain
        custom_advanced(nodes, loaded, *chained, steps=1)


def test_a_sana_controlnet_on_another_model_family(loaded):
    positive, _ = apply(loaded, loaded["official"], loaded["image"])
    sd_model = types.SimpleNamespace(model_sampling=loaded["model"].model.model_sampling)  # no SANA model in it
    with pytest.raises(ValueError, match=f"'{DEMO}' is a SANA ControlNet, applied to a SimpleNamespace model; apply "
                                         f"it to a SANA model"):
        positive[0][1]["control"].pre_run(sd_model, lambda p: 1.0 - p)


def test_a_controlnet_for_another_sana_width(nodes, loaded):
    net = loaded["official"].net
    wide = ControlNet(dataclasses.replace(net.config, width=96, self_heads=3, cross_heads=3, mlp_hidden=240), "official")
    control_net = control_class()(wide, "sana_wide_controlnet.pth", loaded["official"].patcher)
    positive, negative = apply(loaded, control_net, loaded["image"])
    with pytest.raises(ValueError, match="Apply ControlNet: the ControlNet 'sana_wide_controlnet.pth' does not fit "
                                         "this SANA model: .*width 96.*width 64"):
        custom_advanced(nodes, loaded, positive, negative, steps=1)


def write(path, tensors, metadata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path.name


def test_files_given_to_the_wrong_loader(nodes, models):
    """A base model or another family's ControlNet in models/controlnet; the official ControlNet file (the whole
    model) in diffusion_models loads its base DiT; a diffusers-layout ControlNet there is refused."""
    import folder_paths
    from sana_core.demo import _demo_config
    folder = models / "controlnet"
    base = write(folder / "sana_base_in_controlnet.safetensors", random_state_dict(_demo_config()),
                 config_metadata(_demo_config()))
    sd = write(folder / "control_sd15_canny.safetensors", {k: torch.zeros(4, 4) for k in (
        "input_hint_block.0.weight", "zero_convs.0.0.weight", "input_blocks.0.0.weight")})
    port = write(models / "diffusion_models" / "sana_controlnet_diffusers.safetensors", {k: torch.zeros(4, 4) for k in (
        "input_block.weight", "controlnet_blocks.0.weight", "transformer_blocks.0.ff.conv_inverted.weight")})
    (models / "diffusion_models" / DEMO).write_bytes((folder / DEMO).read_bytes())
    folder_paths.filename_list_cache.clear()
    loader = nodes["SanaControlNetLoader"]
    with pytest.raises(CheckpointError, match=f"SANA ControlNet Loader: '{base}' is a SANA transformer \\(DiT\\), not "
                                              f"a ControlNet: load it with SANA Model Loader"):
        call(loader, base, "auto")
    with pytest.raises(CheckpointError, match=f"SANA ControlNet Loader: .*'{sd}'.*Stable Diffusion / SDXL"):
        call(loader, sd, "auto")
    with pytest.raises(CheckpointError, match=f"SANA Model Loader: '{port}' is a ControlNet, not a SANA transformer "
                                              f"\\(DiT\\): load it with SANA ControlNet Loader"):
        call(nodes["SanaModelLoader"], port, "fp32")
    whole, = call(nodes["SanaModelLoader"], DEMO, "fp32")  # the official file holds the base: loaded
    demo, = call(nodes["SanaModelLoader"], "sana_demo.safetensors", "fp32")
    ours, theirs = (m.model.diffusion_model.transformer.state_dict() for m in (whole, demo))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    comfy.model_management.unload_all_models()
