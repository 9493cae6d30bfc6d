"""The SANA ControlNet (sana_core.controlnet): the diffusers graph equals diffusers' SanaControlNetModel +
SanaTransformer2DModel(controlnet_block_samples=...); the official graph equals a reference composed from
diffusers' own modules called in NVlabs' order; the loaders for both layouts; the errors.

Every weight is random, the projections both implementations zero-initialise included (else the ControlNet
adds nothing and no test could fail). The original-layout file is written as NVlabs saves it (the whole model:
base DiT plus `controlnet.j.copied_block.*`, `controlnet.0.before_proj`, `controlnet.j.after_proj`); the
diffusers one is converted from it as diffusers' scripts/convert_sana_controlnet_to_diffusers.py does (the
base's embedders, the copied blocks, input_block, controlnet_blocks), with diffusers' own converter for the
block names, and written by save_pretrained."""
import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from conftest import rel_err
from PIL import Image

from sana_core import CheckpointError
from sana_core.controlnet import ControlNet, Controls, load_controlnet
from sana_core.guidance import sample_latents
from sana_core.pipeline import SanaPipeline
from sana_core.transformer import SanaConfig, SanaTransformer, config_metadata, load_transformer, random_state_dict

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, SanaControlNetModel, SanaControlNetPipeline  # noqa: E402
from test_cuda_graphs import HostSyncs, StandIn, standin  # noqa: E402,F401 (standin: a fixture)
from test_pipeline import CHI, HEIGHT, PROMPT, WIDTH, comfy_noise, parts, randomize, reference  # noqa: E402,F401
from test_transformer import diffusers_model, original_checkpoint, to_diffusers  # noqa: E402

BASE = SanaConfig(depth=4, width=64, caption_dim=48, self_heads=2, cross_heads=2, mlp_hidden=160)
N = 2  # copied blocks
CPU = dict(dtype=torch.float32, device="cpu")


def load(paths, fmt, **kw):
    """A .pth carries no metadata: the heads of a non-published width come as a hint."""
    return load_controlnet(paths[fmt], **CPU, **kw, **({"cross_heads": 2} if fmt == "pth" else {}))


def controlnet_tensors(cfg: SanaConfig, n: int, seed: int) -> dict:
    """The ControlNet part of an original file: copied blocks named as the base's blocks (NVlabs deep-copies
    them), random projections (zero at the start of training, trained since)."""
    blocks = random_state_dict(dataclasses.replace(cfg, depth=n), seed=seed)
    out = {f"controlnet.{m[1]}.copied_block.{m[2]}": v for k, v in blocks.items()
           if (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", k))}
    g = torch.Generator().manual_seed(seed)
    C = cfg.width
    for name in ["controlnet.0.before_proj"] + [f"controlnet.{j}.after_proj" for j in range(n)]:
        out[name + ".weight"] = torch.randn(C, C, generator=g) / C ** 0.5
        out[name + ".bias"] = 0.1 * torch.randn(C, generator=g)
    return out


def to_diffusers_controlnet(official: dict, cfg: SanaConfig, n: int) -> dict:
    """As diffusers' convert_sana_controlnet_to_diffusers.py: the base's patch, time and caption embedders and
    caption norm, the copied blocks as transformer_blocks, before_proj -> input_block, after_proj ->
    controlnet_blocks."""
    pseudo = {k: v for k, v in official.items() if not k.startswith(("blocks.", "controlnet."))}
    pseudo.update({f"blocks.{m[1]}.{m[2]}": v for k, v in official.items()
                   if (m := re.fullmatch(r"controlnet\.(\d+)\.copied_block\.(.+)", k))})
    out = to_diffusers(pseudo, dataclasses.replace(cfg, depth=n))
    out = {k: v for k, v in out.items() if not k.startswith(("proj_out.", "scale_shift_table"))}
    for s in ("weight", "bias"):
        out[f"input_block.{s}"] = official[f"controlnet.0.before_proj.{s}"]
        for j in range(n):
            out[f"controlnet_blocks.{j}.{s}"] = official[f"controlnet.{j}.after_proj.{s}"]
    return out


def diffusers_controlnet(cfg: SanaConfig, n: int) -> SanaControlNetModel:
    return SanaControlNetModel(
        in_channels=32, out_channels=32, num_layers=n, num_attention_heads=cfg.self_heads,
        attention_head_dim=cfg.width // cfg.self_heads, num_cross_attention_heads=cfg.cross_heads,
        cross_attention_head_dim=cfg.width // cfg.cross_heads, cross_attention_dim=cfg.width,
        caption_channels=cfg.caption_dim, mlp_ratio=cfg.mlp_hidden / cfg.width,
        sample_size=cfg.base_size or 32, interpolation_scale=cfg.pe_interpolation)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The oracle modules (base and ControlNet, diffusers) and the same weights in every layout."""
    folder = tmp_path_factory.mktemp("controlnet")
    base_sd = original_checkpoint(BASE, seed=0)
    official = {**base_sd, **controlnet_tensors(BASE, N, seed=1)}
    ref = diffusers_model(BASE).eval()
    ref.load_state_dict(to_diffusers(base_sd, BASE), strict=True)
    ref_cn = diffusers_controlnet(BASE, N).eval()
    ref_cn.load_state_dict(to_diffusers_controlnet(official, BASE, N), strict=True)
    paths = {"pth": folder / "sana_controlnet.pth", "safetensors": folder / "sana_controlnet.safetensors",
             "comfyui": folder / "sana_controlnet_comfy.safetensors", "diffusers-folder": folder / "controlnet",
             "diffusers-single": folder / "controlnet.safetensors"}
    torch.save({"state_dict": official}, paths["pth"])
    save_file(official, paths["safetensors"], metadata=config_metadata(BASE))
    save_file({"model.diffusion_model." + k: v for k, v in official.items()}, paths["comfyui"],
              metadata=config_metadata(BASE))
    ref_cn.save_pretrained(paths["diffusers-folder"])
    save_file(ref_cn.state_dict(), paths["diffusers-single"], metadata={"config": json.dumps(dict(ref_cn.config))})
    return our_model(BASE, base_sd), ref, ref_cn, paths


def our_model(cfg, sd):
    base = SanaTransformer(cfg, **CPU)
    base.load_state_dict({k: v for k, v in sd.items() if k in base.state_dict()})  # without the stale extras
    return base.eval().requires_grad_(False)


def inputs(batch=2, h=3, w=5):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 32, h, w, generator=g)
    hint = torch.randn(batch, 32, h, w, generator=g)
    context = torch.randn(batch, 7, BASE.caption_dim, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return x, hint, context, mask, torch.tensor([730, 50])


def ours(base, net, scale, x, hint, context, mask, t):
    caption = base.encode_caption(context, mask)
    with torch.no_grad():
        return base(x, t.float(), caption, control=Controls([net.prepare(hint, base, caption, context, scale)]))


def official_reference(ref, ref_cn, scale, x, hint, context, mask, t):
    """NVlabs SanaMSControlNet.forward, written with diffusers' modules: base block 0, then copied block 0 on its
    output plus input_block(patch_embed(hint)) (the base's patch embedder), each copied block's projection added
    to the hidden state before base block j + 1; time and caption are the base's."""
    B, _, h, w = x.shape
    bias = ((1 - mask.float()) * -10000.0)[:, None]  # diffusers' encoder_attention_mask convention
    with torch.no_grad():
        hs = ref.patch_embed(x)
        t0, embedded_t = ref.time_embed(t, batch_size=B, hidden_dtype=hs.dtype)
        y = ref.caption_norm(ref.caption_projection(context))
        blocks = ref.transformer_blocks
        hs = blocks[0](hs, None, y, bias, t0, h, w)
        c = hs + ref_cn.input_block(ref.patch_embed(hint))
        for j, (copied, proj) in enumerate(zip(ref_cn.transformer_blocks, ref_cn.controlnet_blocks)):
            c = copied(c, None, y, bias, t0, h, w)
            hs = blocks[j + 1](hs + scale * proj(c), None, y, bias, t0, h, w)
        for block in blocks[N + 1:]:
            hs = block(hs, None, y, bias, t0, h, w)
        out = ref.proj_out(ref.norm_out(hs, embedded_t, ref.scale_shift_table))  # (B, N, 32)
    return out.transpose(1, 2).unflatten(2, (h, w))


def diffusers_reference(ref, ref_cn, scale, x, hint, context, mask, t):
    with torch.no_grad():
        samples = ref_cn(x, context, t, hint, conditioning_scale=scale, encoder_attention_mask=mask)[0]
        return ref(x, context, t, encoder_attention_mask=mask, controlnet_block_samples=tuple(samples)).sample


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("fmt", ["diffusers-folder", "diffusers-single"])
def test_diffusers_graph_equals_diffusers(files, fmt, scale):
    base, ref, ref_cn, paths = files
    net = load(paths, fmt)
    assert net.graph == "diffusers" and net.config.depth == N
    args = inputs()
    want = diffusers_reference(ref, ref_cn, scale, *args)
    assert rel_err(ours(base, net, scale, *args), want) < 1e-4
    x, _, context, mask, t = args
    with torch.no_grad():
        plain = base(x, t.float(), context, mask)
    assert rel_err(plain, want) > 1e-2  # the ControlNet changed the output


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("fmt", ["pth", "safetensors", "comfyui"])
def test_official_graph_equals_reference(files, fmt, scale):
    base, ref, ref_cn, paths = files
    net = load(paths, fmt)
    assert net.graph == "official" and net.config.depth == N
    args = inputs()
    assert rel_err(ours(base, net, scale, *args), official_reference(ref, ref_cn, scale, *args)) < 1e-4


def test_diffusers_graph_with_a_position_embedding(tmp_path):
    """A 2K-style ControlNet (diffusers' interpolation_scale, read from config.json): its patch embedder adds the
    sin-cos embedding to the latent and to the hint."""
    cfg = dataclasses.replace(BASE, pe_interpolation=1.0, base_size=4)
    base_sd = original_checkpoint(cfg, seed=3)
    ref = diffusers_model(cfg).eval()
    ref.load_state_dict(to_diffusers(base_sd, cfg), strict=True)
    ref_cn = diffusers_controlnet(cfg, N).eval()
    ref_cn.load_state_dict(to_diffusers_controlnet({**base_sd, **controlnet_tensors(cfg, N, seed=4)}, cfg, N))
    ref_cn.save_pretrained(tmp_path / "controlnet")
    net = load_controlnet(tmp_path / "controlnet", **CPU)
    assert (net.config.pe_interpolation, net.config.base_size) == (1.0, 4)
    base = our_model(cfg, base_sd)
    args = inputs()
    assert rel_err(ours(base, net, 1.0, *args), diffusers_reference(ref, ref_cn, 1.0, *args)) < 1e-4


def test_controlnet_in_another_dtype_gives_the_models_dtype(files):
    base, ref, ref_cn, paths = files
    net = load_controlnet(paths["diffusers-folder"], dtype=torch.bfloat16, device="cpu")
    args = inputs()
    out = ours(base, net, 1.0, *args)
    assert out.dtype == torch.float32 and rel_err(out, diffusers_reference(ref, ref_cn, 1.0, *args)) < 3e-2


def test_the_graphs_differ_and_the_override_picks_one(files):
    """Same weights, two graphs: far apart; graph= runs either on either layout."""
    base, ref, ref_cn, paths = files
    args = inputs()
    official, port = official_reference(ref, ref_cn, 1.0, *args), diffusers_reference(ref, ref_cn, 1.0, *args)
    assert rel_err(official, port) > 0.05
    as_port = load(paths, "pth", graph="diffusers")
    as_official = load(paths, "diffusers-folder", graph="official")
    assert rel_err(ours(base, as_port, 1.0, *args), port) < 1e-4
    assert rel_err(ours(base, as_official, 1.0, *args), official) < 1e-4
    assert not hasattr(as_official, "t_embedder")  # the official graph uses the base model's time and caption


def test_official_file_keeps_only_the_controlnet(files):
    """The ControlNet keeps its own patch embedder (drives a fine-tuned base of the same width); the base blocks
    stay out of it, and load_transformer loads the base DiT from the same file."""
    base, _, _, paths = files
    net = load(paths, "pth")
    names = set(net.state_dict())
    assert "x_embedder.proj.weight" in names and not any(n.startswith(("final_layer", "y_embedder")) for n in names)
    assert sum(n.startswith("blocks.") and n.endswith("scale_shift_table") for n in names) == N
    for fmt in ("pth", "safetensors"):
        dit = load_transformer(paths[fmt], **CPU, cross_heads=BASE.cross_heads)
        assert dit.config.depth == BASE.depth
        for k, v in base.state_dict().items():
            assert torch.equal(v, dit.state_dict()[k]), k
    tuned = SanaTransformer(BASE, **CPU)  # another base of the same width: the ControlNet still drives it
    tuned.load_state_dict(random_state_dict(BASE, seed=9))
    x, hint, context, mask, t = inputs()
    assert torch.isfinite(ours(tuned, net, 1.0, x, hint, context, mask, t)).all()


def test_chained_controlnets_add_up(files):
    base, _, _, paths = files
    net = load(paths, "diffusers-folder")
    x, hint, context, mask, t = inputs()
    caption = base.encode_caption(context, mask)
    with torch.no_grad():
        chained = base(x, t.float(), caption, control=Controls([net.prepare(hint, base, caption, context, 1.0),
                                                                 net.prepare(hint, base, caption, context, 0.5)]))
    assert rel_err(chained, ours(base, net, 1.5, x, hint, context, mask, t)) < 1e-5


def test_hint_batch_of_one_serves_the_batch(files):
    base, _, _, paths = files
    net = load(paths, "pth")
    x, hint, context, mask, t = inputs()
    one = ours(base, net, 1.0, x, hint[:1], context, mask, t)
    assert rel_err(one, ours(base, net, 1.0, x, hint[:1].expand(2, -1, -1, -1), context, mask, t)) < 1e-6


# ----------------------------------------------------------------------------- errors

def test_controlnet_file_given_to_the_model_loader(files):
    _, _, _, paths = files
    for fmt in ("diffusers-folder", "diffusers-single"):
        with pytest.raises(CheckpointError, match="ControlNet.*load_controlnet"):
            load_transformer(paths[fmt], **CPU)


def test_model_file_given_to_the_controlnet_loader(tmp_path):
    path = tmp_path / "sana.safetensors"
    save_file(random_state_dict(BASE), path, metadata=config_metadata(BASE))
    with pytest.raises(CheckpointError, match="sana.safetensors.*without ControlNet weights.*load_transformer"):
        load_controlnet(path, **CPU)


@pytest.mark.parametrize("keys, family", [
    (("input_hint_block.0.weight", "zero_convs.0.0.weight", "input_blocks.0.0.weight"), "Stable Diffusion"),
    (("controlnet_x_embedder.weight", "controlnet_blocks.0.weight", "transformer_blocks.0.attn.to_q.weight"), "Flux"),
    (("pos_embed_input.proj.weight", "controlnet_blocks.0.weight", "transformer_blocks.0.attn.to_q.weight"),
     "Stable Diffusion 3"),
])
def test_controlnet_of_another_family(tmp_path, keys, family):
    path = tmp_path / "other_controlnet.safetensors"
    save_file({k: torch.zeros(4, 4) for k in keys}, path)
    with pytest.raises(CheckpointError, match=f"other_controlnet.safetensors is a {family}.*ControlNet"):
        load_controlnet(path, **CPU)


def test_controlnet_for_another_width_or_depth(files, tmp_path):
    base, _, _, paths = files
    net = load(paths, "pth")
    wide = dataclasses.replace(BASE, width=96, self_heads=3, cross_heads=3, mlp_hidden=240)
    other = SanaTransformer(wide, **CPU)
    x, hint, context, mask, t = inputs()
    with pytest.raises(ValueError, match="width 64.*width 96"):
        net.prepare(hint, other, other.encode_caption(context, mask), context)
    shallow = SanaTransformer(dataclasses.replace(BASE, depth=2), **CPU)
    with pytest.raises(ValueError, match="2 blocks.*only 2"):
        net.prepare(hint, shallow, shallow.encode_caption(context, mask), context)


def test_hint_of_the_wrong_size(files):
    base, _, _, paths = files
    net = load(paths, "diffusers-folder")
    x, hint, context, mask, t = inputs()
    with pytest.raises(ValueError, match="3x5 = 15.*size of the image"):
        ours(base, net, 1.0, x, hint[..., :4], context, mask, t)
    with pytest.raises(ValueError, match=r"hint has shape \[2, 3, 3, 5\]"):
        ours(base, net, 1.0, x, hint[:, :3], context, mask, t)


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_equals_diffusers_controlnet_pipeline(parts, tmp_path):  # noqa: F811
    """SanaPipeline(controlnet=, control_image=, control_scale=) against diffusers' SanaControlNetPipeline: the hint
    image encoded by the DC-AE and scaled, applied to both CFG halves, the ControlNet at every step."""
    dit = parts[1]["dit"]  # diffusers' (2 blocks): a ControlNet of 1
    ref_cn = randomize(diffusers_controlnet(dataclasses.replace(BASE, caption_dim=dit.config.caption_channels), 1), 7)
    ref_cn.save_pretrained(tmp_path / "controlnet")
    net = load_controlnet(tmp_path / "controlnet", **CPU)
    g = torch.Generator().manual_seed(2)
    edges = Image.fromarray((torch.rand(HEIGHT, WIDTH, 3, generator=g) * 255).to(torch.uint8).numpy())
    ref_pipe = reference(parts, SanaControlNetPipeline, "dit", DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), controlnet=ref_cn)
    ref = ref_pipe(PROMPT, control_image=edges, controlnet_conditioning_scale=0.7, num_inference_steps=3,
                   guidance_scale=4.5, height=HEIGHT, width=WIDTH, latents=comfy_noise(11), output_type="pt",
                   use_resolution_binning=False, clean_caption=False, complex_human_instruction=CHI).images
    pipe = SanaPipeline(parts[0]["dit"], parts[0]["vae"], parts[0]["te"])
    kw = dict(width=WIDTH, height=HEIGHT, steps=3, cfg=4.5, flow_shift=3.0, seed=11, output="tensor")
    got = pipe(PROMPT, controlnet=net, control_image=edges, control_scale=0.7, **kw)
    assert rel_err(got, ref) < 1e-4
    assert rel_err(pipe(PROMPT, **kw), ref) > 1e-3  # the ControlNet changed the image
    with pytest.raises(ValueError, match="both controlnet= .* and control_image="):
        pipe(PROMPT, controlnet=net, **kw)


# ----------------------------------------------------------------------------- CUDA graphs


def tiny_pair(graph):
    base = SanaTransformer(BASE)
    base.load_state_dict(random_state_dict(BASE, seed=1))
    return base.eval(), randomize(ControlNet(dataclasses.replace(BASE, depth=N), graph), 4)


@pytest.mark.parametrize("graph", ["official", "diffusers"])
def test_controlled_step_never_waits_for_the_host(graph):
    base, net = tiny_pair(graph)
    x, hint, context, mask, t = inputs()
    with torch.inference_mode(), HostSyncs() as syncs:
        caption = base.encode_caption(context, mask)
        base(x, t.float(), caption, control=Controls([net.prepare(hint, base, caption, context, 0.5)]))
    assert not syncs.found


def test_controlled_sampling_through_the_graph_path_equals_eager(standin):  # noqa: F811
    """The captured step reads the hint and strength as constants: another hint or strength replays the same
    graph with the eager result; another ControlNet (other weights) is captured anew."""
    base, net = tiny_pair("official")
    g = torch.Generator().manual_seed(0)
    noise, hints = torch.randn(1, 32, 3, 2, generator=g), torch.randn(2, 1, 32, 3, 2, generator=g)
    cond, uncond = torch.randn(1, 7, 48, generator=g), torch.randn(1, 7, 48, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    kw = dict(sampler="flow_dpm_solver", steps=3, shift=3.0, cfg=4.5)
    for hint, strength in [(hints[0], 1.0), (hints[1], 0.5)]:
        controls = [(net, hint, strength)]
        eager = sample_latents(base, noise, cond, mask, uncond, mask, **kw, controls=controls)
        graphed = sample_latents(base, noise, cond, mask, uncond, mask, **kw, controls=controls, runtime=standin)
        assert len(StandIn.made) == 1 and torch.equal(graphed, eager)
    plain = sample_latents(base, noise, cond, mask, uncond, mask, **kw)
    assert rel_err(plain, eager) > 1e-3
    other = randomize(ControlNet(net.config, "official"), 5)
    sample_latents(base, noise, cond, mask, uncond, mask, **kw, controls=[(other, hints[0], 1.0)], runtime=standin)
    assert len(StandIn.made) == 2
