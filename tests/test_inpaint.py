"""sana_core.inpaint and inpainting through the samplers and SanaPipeline: masks on the latent grid (max-pooled, so
thin strokes survive), ComfyUI's known-region convention at every step (checked with a velocity stub), the
feathered composite, and the tiled encode against the untiled one."""
import pytest
import torch
from conftest import rel_err

from sana_core import load_autoencoder, load_text_encoder, load_transformer, samplers
from sana_core.autoencoder import DCAE, DCAEConfig
from sana_core.demo import write_demo_models
from sana_core.inpaint import composite, feathered, latent_mask
from sana_core.pipeline import SanaPipeline
from sana_core.runtime import fitting_tile

SHAPE = (2, 32, 3, 2)  # latent of two 96 x 64 images


def stub(seed=1):
    """A smooth, state- and time-dependent velocity function standing in for the DiT, recording its calls."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    calls = []

    def velocity(x, t):
        calls.append((x.clone(), t.clone()))
        t4 = t.view(-1, 1, 1, 1)
        return a * torch.cos(3 * t4) + b * t4 + 0.3 * x * torch.sin(2 * t4)
    return velocity, calls


# -- masks on the latent grid ------------------------------------------------------------------------

def test_a_one_pixel_stroke_opens_its_latent_cell():
    mask = torch.zeros(1, 96, 64)
    mask[0, 10:70, 33] = 1.0  # one pixel wide, column 33: latent column 1, rows 0-2
    cells = latent_mask(mask, 1, 3, 2)
    assert torch.equal(cells[0, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    bilinear = torch.nn.functional.interpolate(mask[None], size=(3, 2), mode="bilinear")  # ComfyUI's resize
    assert bilinear.max() < 0.5


def test_latent_mask_sizes_batches_and_soft_values():
    padded = torch.zeros(70, 40)  # an image padded to 96 x 64 by the VAE: the mask's edge is repeated
    padded[-1, -1] = 0.3
    assert torch.equal(latent_mask(padded, 1, 3, 2)[0, 0], torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.3]]))
    grid = torch.rand(2, 1, 3, 2)
    assert torch.equal(latent_mask(grid, 2, 3, 2), grid)  # already on the grid
    assert latent_mask(grid[:1], 3, 3, 2).shape == (3, 1, 3, 2)  # repeated to the batch
    assert latent_mask(torch.ones(2, 1), 1, 3, 2).shape == (1, 1, 3, 2)  # smaller: resized
    other = torch.zeros(1, 300, 200)
    other[0, 299, 199] = 1.0  # another resolution: each cell's share
    assert latent_mask(other, 1, 3, 2)[0, 0, 2, 1] == 1 and latent_mask(other, 1, 3, 2).sum() == 1
    with pytest.raises(ValueError, match="mask is"):
        latent_mask(torch.zeros(1, 3, 8, 8), 1, 3, 2)


# -- the known region during sampling ------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["flow_dpm_solver", "flow_euler", "scm"])
def test_a_constant_soft_mask_gives_each_step_m_times_D_plus_the_rest_of_x0(sampler):
    """The model sees m x + (1 - m)(sigma n + (1 - sigma) x0) and every step's estimate is m D + (1 - m) x0,
    with D the model's own estimate for that input (ComfyUI's KSamplerX0Inpaint, at the solver's sigma)."""
    velocity, calls = stub()
    noise, latent = torch.randn(SHAPE), torch.randn(SHAPE)
    m = 0.3
    estimates = []
    steps = 2 if sampler == "scm" else 4
    samplers.sample(velocity, noise, sampler=sampler, steps=steps, shift=3.0, latent=latent,
                    mask=torch.full((1, 1, 3, 2), m), callback=lambda i, n, x0: estimates.append(x0.clone()))
    if sampler == "scm":
        sigmas = samplers.trigflow_to_flow_time(samplers.scm_times(steps))
    else:
        sigmas = samplers.schedule(sampler, steps, 3.0)
    assert len(calls) == len(estimates) == steps
    for (x_in, t), sigma, x0 in zip(calls, sigmas, estimates):
        D = x_in - sigma * velocity(x_in, t)
        assert rel_err(x0, m * D + (1 - m) * latent) < 1e-5
    first = calls[0][0]  # at the first step x is the pure noise
    assert rel_err(first, m * noise + (1 - m) * (sigmas[0] * noise + (1 - sigmas[0]) * latent)) < 1e-5


def test_masks_of_zeros_keep_the_latent_and_masks_of_ones_change_nothing():
    velocity, _ = stub()
    noise, latent = torch.randn(SHAPE), torch.randn(SHAPE)
    kept = samplers.sample(velocity, noise, sampler="flow_dpm_solver", steps=3, shift=3.0, latent=latent,
                           mask=torch.zeros(1, 1, 3, 2))
    assert torch.equal(kept, latent)  # the last step returns the estimate, which is the latent there
    for sampler in ("flow_dpm_solver", "flow_euler"):
        plain = samplers.sample(velocity, noise, sampler=sampler, steps=3, shift=3.0)
        ones = samplers.sample(velocity, noise, sampler=sampler, steps=3, shift=3.0, latent=latent,
                               mask=torch.ones(1, 1, 3, 2))
        assert rel_err(ones, plain) < 1e-6
    with pytest.raises(ValueError, match="mask needs the clean"):
        samplers.sample(velocity, noise, sampler="flow_euler", steps=3, shift=3.0, mask=torch.ones(1, 1, 3, 2))


# -- the composite ---------------------------------------------------------------------------------------

def test_the_composite_keeps_the_original_outside_the_feathered_mask():
    g = torch.Generator().manual_seed(0)
    original, decoded = torch.rand(1, 3, 90, 60, generator=g), torch.rand(2, 3, 96, 64, generator=g)
    mask = torch.zeros(1, 90, 60)
    mask[0, 30:50, 20:40] = 1.0
    out = composite(original, decoded, mask, feather=8)
    assert out.shape == (2, 3, 90, 60)  # the original's size: the VAE's padding cut off
    weight = feathered(mask[None], 8)[0, 0]
    assert weight[30:50, 20:40].eq(1).all() and 0 < weight[50, 30] < 1 and weight[58:, :].eq(0).all()
    outside = weight == 0
    assert torch.equal(out[..., outside], original.expand(2, -1, -1, -1)[..., outside])
    assert torch.equal(out[..., 30:50, 20:40], decoded[..., 30:50, 20:40])
    hard = composite(original, decoded, mask, feather=0)
    assert torch.equal(hard[..., 50:, :], original.expand(2, -1, -1, -1)[..., 50:, :])
    cropped = composite(original, decoded[..., :64, :32], mask, feather=0)  # VAE Encode (for Inpainting)'s crop
    assert torch.equal(cropped[..., 40:45, 35:39], decoded[..., 27:32, 21:25])  # placed at its centre offset
    assert torch.equal(cropped[..., :13, :], original.expand(2, -1, -1, -1)[..., :13, :])


# -- tiled encode --------------------------------------------------------------------------------------

def test_tiled_encode_equals_the_untiled_one():
    """Tolerance 1e-5 relative (float32; on the CPU the tiles give the same bits); without context, it differs."""
    torch.manual_seed(0)
    widths = (8, 16, 32, 32, 64, 64)
    ae = DCAE(DCAEConfig(decoder_widths=widths, encoder_widths=widths, head_dim=8)).eval()
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    assert (ae.encoder.local_scale, ae.encoder.local_halo) == (8, 5)  # 36 px of receptive field, 40 read
    image = torch.rand(1, 3, 128, 96) * 2 - 1
    whole = ae.encode(image)
    ticks = []
    for tile in (48, 64):
        assert rel_err(ae.encode_tiled(image, tile=tile, between=lambda: ticks.append(1)), whole) < 1e-5
    assert len(ticks) > 6
    assert rel_err(ae.encode_tiled(image, tile=64, overlap=0), whole) > 1e-2


def test_big_encodes_are_tiled_when_memory_is_short():
    dcae = DCAE(DCAEConfig(), dtype=torch.bfloat16, device="meta")  # the published DC-AE's shapes
    gib = 2**30
    untiled = dcae.encode_activation_bytes(1, 4096, 4096)
    assert 12 * gib < untiled < 40 * gib and dcae.encode_activation_bytes(1, 4096, 4096, tile=1024) < 6 * gib
    estimate = lambda t: dcae.encode_activation_bytes(1, 4096, 4096, tile=t)  # noqa: E731
    assert fitting_tile(estimate, 4096, 80 * gib) is None
    assert fitting_tile(estimate, 4096, 8 * gib) in (2048, 1536, 1024)


# -- the pipeline --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    paths = write_demo_models(tmp_path_factory.mktemp("inpaint"))
    kw = dict(dtype=torch.float32, device="cpu")
    return SanaPipeline(load_transformer(paths["transformer"], **kw), load_autoencoder(paths["autoencoder"], **kw),
                        load_text_encoder(paths["text_encoder"], **kw))


def test_pipeline_inpaints_and_composites(pipe):
    from PIL import Image
    image = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    mask = Image.new("L", (64, 96), 0)
    mask.paste(255, (40, 0, 41, 96))  # a 1-px vertical stroke: latent column 1
    out = pipe("a red fox", image=image, mask=mask, denoise=1.0, steps=2, output="tensor", feather=4)
    assert out.shape == (1, 3, 96, 64)
    assert torch.equal(out[..., :35], image[..., :35])  # beyond the feathered stroke: the original, exactly
    assert (out[..., 40] - image[..., 40]).abs().max() > 1e-2  # the stroke is repainted
    raw = pipe("a red fox", image=image, mask=mask, denoise=1.0, steps=2, output="tensor", composite_original=False)
    assert (raw[..., :35] - image[..., :35]).abs().max() > 1e-3  # the 32x autoencoder alone changes every pixel
    latent = pipe("a red fox", image=image, mask=mask, denoise=0.5, steps=2, output="latent")
    clean = pipe.autoencoder.encode(image * 2 - 1)
    assert torch.equal(latent[..., 0], clean[..., 0]) and not torch.equal(latent[..., 1], clean[..., 1])
    with pytest.raises(ValueError, match="a mask needs the image"):
        pipe("a red fox", mask=mask)
