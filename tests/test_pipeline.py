"""SanaPipeline and the guided sampling loop against diffusers' SanaPipeline, SanaPAGPipeline and
SanaSprintPipeline, with the same tiny random components: diffusers models saved in their real
formats and loaded by our loaders. Also seeds, batching, cancellation, sizes and bad input."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may touch the hub

import re

import pytest
import torch
from conftest import rel_err

from sana_core import load_autoencoder, load_text_encoder, load_transformer, resolution
from sana_core.demo import DEMO_CAPTION_DIM, write_demo_text_encoder
from sana_core.guidance import sample_latents
from sana_core.pipeline import SanaPipeline, to_pil
from sana_core.presets import defaults_for
from sana_core.runtime import text_encoder_should_offload
from sana_core.text_encoder import INSTRUCTIONS
from sana_core.transformer import CONFIGS

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, SanaPAGPipeline,  # noqa: E402
                       SanaSprintPipeline, SCMScheduler, SanaTransformer2DModel)
from diffusers import SanaPipeline as DiffusersSanaPipeline  # noqa: E402

PROMPT = "a red fox in a snowy forest"  # lowercase: diffusers lowercases prompts, we do not
WIDTH, HEIGHT = 96, 64  # latent 3 x 2, non-square


def randomize(module, seed):
    """Deterministic weights with O(1) activations (diffusers zero-inits some layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module.eval()


def tiny_dit(sprint=False, qk_norm=False, seed=0):
    return randomize(SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_layers=2, num_attention_heads=2, attention_head_dim=32,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
        caption_channels=DEMO_CAPTION_DIM, mlp_ratio=2.5, sample_size=32, guidance_embeds=sprint,
        qk_norm="rms_norm_across_heads" if qk_norm else None), seed)


def tiny_dcae(seed=3):
    """DC-AE f32c32 structure (6 stages, 32x, ResBlocks then EfficientViT blocks), narrow."""
    kinds = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    widths, scales = (8, 8, 16, 16, 32, 32), ((), (), (), (5,), (5,), (5,))
    return randomize(AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=8, encoder_block_types=kinds,
        decoder_block_types=kinds, encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=scales,
        decoder_qkv_multiscales=scales, upsample_block_type="interpolate", downsample_block_type="conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407), seed)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Diffusers components written as diffusers folders (Gemma: ComfyUI single file), ours loaded from them."""
    root = tmp_path_factory.mktemp("pipeline")
    theirs = {"dit": tiny_dit(seed=0), "sprint": tiny_dit(sprint=True, qk_norm=True, seed=1), "vae": tiny_dcae()}
    ours = {}
    for name in ("dit", "sprint"):
        theirs[name].save_pretrained(root / name)
        ours[name] = load_transformer(root / name, dtype=torch.float32, device="cpu")
    theirs["vae"].save_pretrained(root / "vae")
    ours["vae"] = load_autoencoder(root / "vae", dtype=torch.float32, device="cpu")
    te = load_text_encoder(write_demo_text_encoder(root / "gemma.safetensors"), dtype=torch.float32, device="cpu")
    ours["te"] = CachedEncoder(te)
    return ours, theirs


class CachedEncoder:
    """The text encoder with its captions memoised (Gemma dominates these tests' time on a CPU)."""

    def __init__(self, te):
        self.te, self.cache = te, {}

    def encode(self, prompts, layers=None, **kw):  # layers: the runtime's graphed ones, eager on the CPU anyway
        key = (prompts if isinstance(prompts, str) else tuple(prompts), tuple(sorted(kw.items())))
        if key not in self.cache:
            self.cache[key] = self.te.encode(prompts, **kw)
        return self.cache[key]

    def __getattr__(self, name):
        return getattr(self.te, name)


def pipe_for(parts, name="dit"):
    ours, _ = parts
    return SanaPipeline(ours[name], ours["vae"], ours["te"])


def reference(parts, cls, name, scheduler, **kw):
    ours, theirs = parts
    te = ours["te"]  # the same Gemma-2 and tokenizer: this test is about the pipeline, not the encoder
    return cls(tokenizer=te.tokenizer, text_encoder=te.model, vae=theirs["vae"], transformer=theirs[name],
               scheduler=scheduler, **kw)


CHI = list(INSTRUCTIONS["sana-official"])  # our default instruction (diffusers' own differs by one quote)


def comfy_noise(seed, batch=1):
    return torch.randn([batch, 32, HEIGHT // 32, WIDTH // 32], generator=torch.manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize("sampler_steps", [4, 1])
def test_equals_diffusers_sana_pipeline_with_cfg(parts, sampler_steps):
    ref_pipe = reference(parts, DiffusersSanaPipeline, "dit", DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"))
    ref = ref_pipe(PROMPT, negative_prompt="", num_inference_steps=sampler_steps, guidance_scale=4.5, height=HEIGHT,
                   width=WIDTH, latents=comfy_noise(11), output_type="pt", use_resolution_binning=False,
                   clean_caption=False, complex_human_instruction=CHI).images
    ours = pipe_for(parts)(PROMPT, width=WIDTH, height=HEIGHT, steps=sampler_steps, cfg=4.5, flow_shift=3.0,
                           seed=11, output="tensor")
    assert ours.shape == ref.shape == (1, 3, HEIGHT, WIDTH)
    assert rel_err(ours, ref) < 1e-4


def test_equals_diffusers_pag_pipeline(parts):
    """PAG with CFG on block 1, official scale 2.0 (diffusers' defaults are block 0 and 3.0)."""
    ref_pipe = reference(parts, SanaPAGPipeline, "dit", DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
        pag_applied_layers=["transformer_blocks.1"])
    ref = ref_pipe(PROMPT, num_inference_steps=3, guidance_scale=4.5, pag_scale=2.0, height=HEIGHT, width=WIDTH,
                   latents=comfy_noise(5), output_type="pt", use_resolution_binning=False, clean_caption=False,
                   complex_human_instruction=CHI).images
    pipe = pipe_for(parts)
    ours = pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=3, cfg=4.5, pag_scale=2.0, pag_layers=[1], flow_shift=3.0,
                seed=5, output="tensor")
    no_pag = pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=3, cfg=4.5, flow_shift=3.0, seed=5, output="tensor")
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(no_pag, ref) > 1e-3  # PAG changed the image


@pytest.mark.parametrize("steps", [1, 2])
def test_equals_diffusers_sprint_pipeline(parts, steps):
    """Sprint: noise * 0.5, TrigFlow steps, embedded guidance; diffusers draws the initial noise and
    then the per-step noise from one generator seeded like ours."""
    ref_pipe = reference(parts, SanaSprintPipeline, "sprint", SCMScheduler())
    ref = ref_pipe(PROMPT, num_inference_steps=steps, intermediate_timesteps=1.3 if steps == 2 else None,
                   guidance_scale=4.5, height=HEIGHT, width=WIDTH, generator=torch.Generator().manual_seed(9),
                   output_type="pt", use_resolution_binning=False, clean_caption=False,
                   complex_human_instruction=CHI).images
    ours = pipe_for(parts, "sprint")(PROMPT, width=WIDTH, height=HEIGHT, steps=steps, cfg=4.5, seed=9,
                                     output="tensor")
    assert rel_err(ours, ref) < 1e-4


def test_seed_gives_comfyui_noise_and_the_same_image_twice(parts):
    pipe = pipe_for(parts)
    kw = dict(width=WIDTH, height=HEIGHT, steps=2, output="latent")
    a, b = pipe(PROMPT, seed=3, **kw), pipe(PROMPT, seed=3, **kw)
    assert torch.equal(a, b)
    assert torch.equal(a, pipe(PROMPT, latents=comfy_noise(3), **kw))
    assert rel_err(pipe(PROMPT, seed=4, **kw), a) > 1e-2


def test_batch_equals_single_runs_with_the_matching_noise(parts):
    pipe = pipe_for(parts)
    kw = dict(width=WIDTH, height=HEIGHT, steps=3, output="latent")
    batch = pipe(PROMPT, seed=8, batch_size=2, **kw)
    noise = comfy_noise(8, batch=2)
    for i in range(2):
        assert rel_err(batch[i:i + 1], pipe(PROMPT, latents=noise[i:i + 1], **kw)) < 1e-5
    assert rel_err(batch[0], batch[1]) > 1e-2


def test_prompt_list_and_outputs(parts):
    pipe = pipe_for(parts)
    images = pipe([PROMPT, "a lighthouse"], width=WIDTH, height=HEIGHT, steps=1, batch_size=2)
    assert len(images) == 4 and all(im.size == (WIDTH, HEIGHT) and im.mode == "RGB" for im in images)
    tensor = pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=1, output="tensor")
    assert tensor.shape == (1, 3, HEIGHT, WIDTH) and 0 <= tensor.min() and tensor.max() <= 1


def test_pil_images_round_as_diffusers():
    """to_pil (computed on the images' device) gives diffusers' bytes, ties at k + 0.5 included."""
    from diffusers.image_processor import VaeImageProcessor
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, :5] = torch.tensor([0.5, 1.5, 2.5, 254.5, 255]) / 255  # (nearly) halfway cases
    ours = to_pil(images)
    theirs = VaeImageProcessor.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
    assert [im.tobytes() for im in ours] == [im.tobytes() for im in theirs]


def test_image_to_image_starts_from_the_encoded_image(parts):
    pipe = pipe_for(parts)
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    ae = parts[0]["vae"]
    clean = ae.encode(image * 2 - 1)
    near = pipe(PROMPT, image=image, denoise=0.01, steps=1, output="latent")  # starts at sigma ~ 0.03
    far = pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=1, output="latent")
    assert rel_err(near, clean) < 0.15 < rel_err(far, clean)


def test_callback_sees_every_step_and_can_cancel(parts):
    pipe = pipe_for(parts)
    dit = parts[0]["dit"]
    calls, steps_seen = [], []
    hook = dit.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=3, output="latent",
             callback=lambda step, total, x0: steps_seen.append((step, total, tuple(x0.shape))))
        assert steps_seen == [(i, 3, (1, 32, 2, 3)) for i in (1, 2, 3)]
        assert len(calls) == 3  # CFG: one batched forward per step

        calls.clear()

        def cancel(step, total, x0):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=10, callback=cancel)
        assert len(calls) == 1
    finally:
        hook.remove()


def test_nan_latent_is_a_clear_error(parts, monkeypatch):
    dit = parts[0]["dit"]
    monkeypatch.setattr(dit, "forward", lambda x, *a, **k: torch.full_like(x, float("nan")))
    with pytest.raises(FloatingPointError, match="float16"):
        pipe_for(parts)(PROMPT, width=WIDTH, height=HEIGHT, steps=2)


@pytest.mark.parametrize("output", ["pil", "latent"])
def test_nan_caption_is_the_text_encoders_error(parts, monkeypatch, output):
    """The captions' NaN check is read after the first step is queued, yet still names the text encoder (not
    the latent, whose own check would fail too) and comes before any result or callback."""
    te, calls = parts[0]["te"], []
    encode = te.encode

    def nan(prompts, **kw):
        emb, mask = encode(prompts, **kw)
        return torch.full_like(emb, float("nan")), mask
    monkeypatch.setattr(te, "encode", nan)
    with pytest.raises(FloatingPointError, match="Gemma-2 produced NaN/inf in torch.float32"):
        pipe_for(parts)(PROMPT, width=WIDTH, height=HEIGHT, steps=2, output=output, callback=lambda *a: calls.append(a))
    assert not calls


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100, height=64), "width 100 is not a positive multiple of 32 (SANA's autoencoder works on 32x32 pixel "
                                 "blocks): use 96 or 128"),
    (dict(width=96, height=70), "height 70 is not a positive multiple of 32"),
    (dict(width=96), "give both width and height"),
    (dict(width=96, height=64, aspect_ratio="1:1"), "not both"),
    (dict(aspect_ratio="wide"), "is not of the form 'W:H'"),
    (dict(steps=0), "steps must be a positive"),
    (dict(steps=-2), "steps must be a positive"),
    (dict(sampler="scm"), "the 'scm' sampler needs a Sana-Sprint model"),
    (dict(sampler="dpm++"), "unknown sampler"),
    (dict(batch_size=0), "batch_size must be a positive"),
    (dict(output="np"), "output must be"),
    (dict(latents=torch.zeros(1, 32, 4, 4), width=96, height=64), "latents have shape [1, 32, 4, 4], expected"),
    (dict(image=torch.zeros(1, 3, 64, 96)), "needs denoise below 1"),
    (dict(pag_scale=2.0, pag_layers=[5]), "PAG layer 5 does not exist: the model has blocks 0..1"),
])
def test_bad_input_is_a_clear_error(parts, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pipe_for(parts)(PROMPT, **({"width": WIDTH, "height": HEIGHT} if "aspect_ratio" not in kwargs and
                                  "width" not in kwargs else {}) | kwargs)


@pytest.mark.parametrize("sampler", ["flow_dpm_solver", "flow_euler"])
def test_sprint_model_with_a_multistep_flow_sampler_explains_pairings(parts, sampler):
    with pytest.raises(ValueError, match="Sana-Sprint .* sampled with 'scm' in 1-4 steps.*supported pairings"):
        pipe_for(parts, "sprint")(PROMPT, width=WIDTH, height=HEIGHT, sampler=sampler)


def test_sprint_rejects_pag(parts):
    ours, _ = parts
    cond, mask = ours["te"].encode(PROMPT)
    with pytest.raises(ValueError, match="PAG is not available for Sana-Sprint"):
        sample_latents(ours["sprint"], comfy_noise(0), cond, mask, sampler="scm", steps=2, cfg=4.5, pag_scale=2.0,
                       pag_layers=(1,), shift=None)


def test_sample_latents_skips_the_uncond_batch_at_cfg_1(parts):
    """cfg 1 is the conditional velocity alone: one sample per forward, no negative needed."""
    ours, _ = parts
    cond, mask = ours["te"].encode(PROMPT)
    sizes = []
    hook = ours["dit"].register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        sample_latents(ours["dit"], comfy_noise(0), cond, mask, sampler="flow_euler", steps=2, cfg=1.0, shift=3.0)
        sample_latents(ours["dit"], comfy_noise(0), cond, mask, *ours["te"].encode("", instruction=False),
                       sampler="flow_euler", steps=1, cfg=3.0, pag_scale=2.0, pag_layers=(0,), shift=3.0)
    finally:
        hook.remove()
    assert sizes == [1, 1, 3]


def test_aspect_ratio_binning_only_when_no_size_is_given(parts):
    pipe = pipe_for(parts)
    assert pipe.resolve_settings(aspect_ratio="16:9")[("width")] == 1344
    assert (pipe.resolve_settings(aspect_ratio=(3, 4))["width"], pipe.resolve_settings(aspect_ratio=(3, 4))["height"]) \
        == (896, 1152)
    s = pipe.resolve_settings(width=1000 // 32 * 32, height=608)
    assert (s["width"], s["height"]) == (992, 608)  # used as given, not binned
    s = pipe.resolve_settings()
    assert (s["width"], s["height"]) == (1024, 1024)


def test_aspect_ratio_bins_are_diffusers_tables():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN
    for base, table in ((512, ASPECT_RATIO_512_BIN), (1024, ASPECT_RATIO_1024_BIN), (2048, ASPECT_RATIO_2048_BIN),
                        (4096, ASPECT_RATIO_4096_BIN)):
        ours = resolution.ASPECT_RATIO_BINS[base]
        assert {k: tuple(map(int, v)) for k, v in table.items()} == ours
        assert all(h % 32 == 0 and w % 32 == 0 for h, w in ours.values())
    assert len(resolution.bin_sizes(1024)) == 33 and resolution.bin_sizes(1024)[0] == (2048, 512)
    from diffusers.image_processor import PixArtImageProcessor
    for ratio in ((16, 9), (1, 1), (2, 3), (21, 9), (1, 3)):
        h, w = PixArtImageProcessor.classify_height_width_bin(ratio[1] * 100, ratio[0] * 100, ASPECT_RATIO_1024_BIN)
        assert resolution.binned_size(ratio, 1024) == (w, h)


@pytest.mark.parametrize("name, size, expected", [
    ("sana-0.6b", 1024, dict(shift=4.0, pag_layers=(14,))),
    ("sana-0.6b", 512, dict(shift=3.0)),
    ("sana-1.6b", 1024, dict(shift=3.0, pag_layers=(8,))),
    ("sana-1.5-1.6b", 1024, dict(shift=3.0, pag_layers=(8,))),
    ("sana-1.5-4.8b", 1024, dict(shift=3.0, pag_layers=(24,))),
    ("sana-1.6b-2k", 2048, dict(shift=3.0)),
    ("sana-1.6b-4k", 4096, dict(shift=6.0)),
    ("sana-sprint-1.6b", 1024, dict(sampler="scm", steps=2, cfg=4.5, pag_layers=())),
])
def test_defaults_per_variant(name, size, expected):
    defaults = defaults_for(CONFIGS[name], size, size)
    assert {k: defaults[k] for k in expected} == expected
    assert defaults["pag_scale"] == 0.0
    if name != "sana-sprint-1.6b":
        assert (defaults["sampler"], defaults["steps"], defaults["cfg"]) == ("flow_dpm_solver", 20, 4.5)


def test_text_encoder_offload_rule_and_cpu_noop(parts, monkeypatch):
    config = CONFIGS["sana-1.6b"]
    kw = dict(config=config, element_size=2, forwards=2, width=1024, height=1024)
    assert not text_encoder_should_offload(free=40 * 2**30, **kw)
    assert text_encoder_should_offload(free=2 * 2**30, **kw)
    assert text_encoder_should_offload(free=20 * 2**30, **kw | dict(width=4096, height=4096))
    offloads = []
    monkeypatch.setattr(parts[0]["te"], "offload", lambda: offloads.append(1))
    pipe_for(parts)(PROMPT, width=WIDTH, height=HEIGHT, steps=1, output="latent")
    assert offloads == []  # on the CPU there is nothing to free
