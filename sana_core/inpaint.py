"""Inpainting and outpainting without inpainting weights: masks on the latent grid, the known region during
sampling, and the original pixels put back after decoding.

SANA has no inpainting model; its authors' training-free pipeline (NVlabs/Sana app/sana_pipeline_inpaint.py)
blends latents with a latent-grid mask and re-noises the known region. Here the blend follows ComfyUI's
convention (KSamplerX0Inpaint), so that SanaSampler, KSampler and SamplerCustomAdvanced agree: at each step, at
noise level sigma, the model sees

    x_in = m x + (1 - m) (sigma noise + (1 - sigma) latent)      noise: the initial noise; latent: the image's
    x0   = m D(x_in) + (1 - m) latent                            D: the model's clean-latent estimate

with m = 1 where to generate, 0 where to keep, and values between for soft masks (they blend).

Masks come at pixel resolution (a painted MASK) or on the latent grid (B or 1, 1, h, w). `latent_mask` reduces
them to the grid by max-pooling each latent cell's 32 x 32 pixels, so that a stroke thinner than a cell still
opens it (a bilinear resize, as ComfyUI's, averages a 1-px stroke down to 1/32 and loses it).

A 32x autoencoder does not give back the pixels it was given, so `composite` puts the original image back
outside the mask after decoding, feathered over `feather` pixels around it.
"""
import math

import torch
import torch.nn.functional as F

from .resolution import LATENT_FACTOR

DEFAULT_FEATHER = 16  # pixels over which the composite fades from the decoded image to the original


def latent_mask(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """float32 (batch, 1, height, width) in [0, 1] on mask's device: a mask (H, W), (B, H, W) or (B, 1, H, W)
    brought to the latent grid. At pixel resolution (H, W more than the grid) each cell takes the maximum of
    the pixels it covers: LATENT_FACTOR x LATENT_FACTOR of them when the mask is the size of the image the
    latent was encoded from (sides padded up to multiples of 32 repeat their edge, as the VAE pads the image),
    else the cell's share of the mask (adaptive max-pooling). A smaller mask is resized bilinearly (ComfyUI's
    way). A batch of masks other than `batch` is repeated and cut to it, as ComfyUI does."""
    if mask.dim() not in (2, 3, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise ValueError(f"a mask is (height, width), (batch, height, width) or (batch, 1, height, width); got shape "
                         f"{list(mask.shape)}")
    mask = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    H, W = mask.shape[-2:]
    if (H, W) != (height, width):
        if -(-H // LATENT_FACTOR) == height and -(-W // LATENT_FACTOR) == width:  # the image's size
            mask = F.pad(mask, (0, width * LATENT_FACTOR - W, 0, height * LATENT_FACTOR - H), mode="replicate")
            mask = F.max_pool2d(mask, LATENT_FACTOR)
        elif H >= height and W >= width:
            mask = F.adaptive_max_pool2d(mask, (height, width))
        else:
            mask = F.interpolate(mask, size=(height, width), mode="bilinear")
    if mask.shape[0] != batch:
        mask = mask.repeat(math.ceil(batch / mask.shape[0]), 1, 1, 1)[:batch]
    return mask.clamp(0, 1)


class LatentInpaint:
    """The known region during sampling (the formulas at the top of this module).

    mask (1 or B, 1 or C, h, w) in [0, 1] on the latent grid (latent_mask); latent (B, C, h, w) the clean latent
    to keep (the DiT's scaled space); noise (B, C, h, w) the initial noise. mask_at(sigma (B,), mask) -> mask:
    the mask of the step at noise level sigma (ComfyUI's denoise_mask_function, e.g. Differential Diffusion);
    None: the same mask at every step."""

    def __init__(self, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor, mask_at=None):
        self.mask, self.latent, self.noise, self.mask_at = mask, latent, noise, mask_at

    def step_mask(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.mask_at is None:
            return self.mask
        return self.mask_at(torch.as_tensor(sigma).reshape(-1).expand(self.latent.shape[0]), self.mask)

    def noised(self, x: torch.Tensor, sigma, mask: torch.Tensor) -> torch.Tensor:
        """The model's input: x where the mask is 1, the latent re-noised to sigma where it is 0."""
        return x * mask + (sigma * self.noise + (1 - sigma) * self.latent) * (1 - mask)

    def denoised(self, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate with the latent put back where the mask is 0."""
        return x0 * mask + self.latent * (1 - mask)


def feathered(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """The composite's weights (B, 1, H, W): at least the mask's values on it, fading to 0 over `feather` pixels
    outside it, exactly 0 beyond. mask (B, 1, H, W) in [0, 1]."""
    if feather <= 0:
        return mask
    half = feather // 2
    grown = _box(mask, half, F.max_pool2d)  # dilated by `half` pixels, then box-blurred: a linear ramp from
    soft = _box(grown, feather - half, F.avg_pool2d)  # the mask's edge to `feather` pixels out
    return torch.maximum(mask, soft.clamp(0, 1))


def _box(x, radius, pool):
    """pool over a (2 radius + 1)-pixel square, separably, the image's own size (edges padded by repeating)."""
    k = 2 * radius + 1
    x = pool(F.pad(x, (radius, radius, 0, 0), mode="replicate"), (1, k), stride=1)
    return pool(F.pad(x, (0, 0, radius, radius), mode="replicate"), (k, 1), stride=1)


def composite(original: torch.Tensor, decoded: torch.Tensor, mask: torch.Tensor,
              feather: int = DEFAULT_FEATHER) -> torch.Tensor:
    """The decoded image inside the (feathered) mask, the original outside, exactly: float32 (B, 3, H, W) at the
    original's size, on its device. original (1 or B, 3, H, W), decoded (B, 3, H', W') in the same range; mask (H, W), (B, H, W)
    or (B, 1, H, W) in [0, 1] at any size (resized bilinearly to H x W). A decoded image larger than the original
    (the VAE padded its sides up to multiples of 32) is cut at the top-left; a smaller one (ComfyUI's VAE Encode
    (for Inpainting) crops to multiples of 32 around the centre) goes back where that crop was taken, the
    original kept around it."""
    if original.dim() != 4 or decoded.dim() != 4 or original.shape[1] != decoded.shape[1]:
        raise ValueError(f"composite: images are (batch, channels, height, width) with the same channels; got "
                         f"{list(original.shape)} and {list(decoded.shape)}")
    B = max(original.shape[0], decoded.shape[0])
    H, W = original.shape[-2:]
    device = original.device
    original, decoded = original.float().expand(B, -1, -1, -1), decoded.to(device).float().expand(B, -1, -1, -1)
    weight = mask.reshape(-1, 1, *mask.shape[-2:]).to(device).float()
    if weight.shape[-2:] != (H, W):
        weight = F.interpolate(weight, size=(H, W), mode="bilinear")
    weight = feathered(weight.clamp(0, 1), feather)
    if weight.shape[0] != B:
        weight = weight.repeat(math.ceil(B / weight.shape[0]), 1, 1, 1)[:B]
    h, w = decoded.shape[-2:]
    top, left = max(0, (H - h) // 2), max(0, (W - w) // 2)
    placed = original.clone()
    placed[..., top:top + min(h, H), left:left + min(w, W)] = decoded[..., :H, :W]
    if h < H or w < W:  # only the decoded part can change
        inside = torch.zeros_like(weight)
        inside[..., top:top + min(h, H), left:left + min(w, W)] = 1
        weight = weight * inside
    return torch.lerp(original, placed, weight)
