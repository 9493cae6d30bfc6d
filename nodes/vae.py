"""DC-AE nodes: decode (untiled when it fits, tiled otherwise), tiled decode, encode; the same
functions serve ComfyUI's VAE Decode / VAE Decode (Tiled) / VAE Encode on a SANA VAE (comfy_family).

IMAGE is ComfyUI's float [B, H, W, 3] in 0..1 on the CPU; LATENT holds raw DC-AE latents (ComfyUI's
convention; the model's latent format scales them by 0.41407 around sampling). The DC-AE works on
[B, 3, H, W] in -1..1 and on scaled latents.
"""
import torch
import torch.nn.functional as F
from sana_core.autoencoder import DEFAULT_TILE
from sana_core.resolution import LATENT_FACTOR

from . import host
from .sampling import latent_samples

OVERLAP_DEFAULT = 64  # pixels of context per tile side: covers the decoder's 56 px receptive field


def to_image(pixels: torch.Tensor, node: str) -> torch.Tensor:
    """DC-AE output (B, 3, H, W) in -1..1 -> IMAGE (B, H, W, 3) in 0..1 on ComfyUI's intermediate device."""
    if not torch.isfinite(pixels).all():
        raise FloatingPointError(f"{node}: the decoded image holds NaN or infinite values (the autoencoder overflowed, "
                                 f"or the latent was already broken); no image is made from it. Run ComfyUI with "
                                 f"--fp32-vae, or check the sampler's settings")
    image = (pixels.float() / 2 + 0.5).clamp(0, 1).movedim(1, -1)
    return image.to(host.current().intermediate_device())


def decode(vae: host.ManagedModel, samples, node: str, *, tile: int = None, overlap: int = None):
    """IMAGE of a LATENT or raw latent tensor (B, 32, h, w): tiles of `tile` pixels reading `overlap`
    pixels of context when tile is given, else untiled when it fits in free memory and tiled when not."""
    latent = latent_samples(samples if isinstance(samples, dict) else {"samples": samples}, node)
    shape = (latent.shape[0], *latent.shape[2:])
    ae = vae.ready(vae.model.activation_bytes(*shape, tile=tile))  # ComfyUI makes room
    scaled = latent.to(device=ae.device, dtype=torch.float32) * ae.scaling_factor
    h = host.current()
    with torch.inference_mode():  # Cancel between stages and tiles
        pixels = h.runtime.decode(ae, scaled, between=h.check_interrupted) if tile is None else \
            ae.decode_tiled(scaled, tile=tile, overlap=overlap, between=h.check_interrupted)
    return to_image(pixels, node)


def encode(vae: host.ManagedModel, pixels, node: str, *, tile: int = None, overlap: int = None) -> torch.Tensor:
    """Raw latent (B, 32, ceil(H/32), ceil(W/32)) of an IMAGE; sides that are not multiples of 32 are
    padded (edge pixels repeated), never cropped. Tiles of `tile` pixels reading `overlap` pixels of context
    when tile is given, else untiled when it fits in free memory and tiled when not (the same latent)."""
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
        raise ValueError(f"{node}: 'pixels' is not a ComfyUI IMAGE [batch, height, width, channels]")
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{node}: the image holds NaN or infinite values")
    image = pixels[..., :3].movedim(-1, 1).float()  # (B, 3, H, W), alpha dropped
    height, width = image.shape[-2:]
    image = F.pad(image, (0, -width % LATENT_FACTOR, 0, -height % LATENT_FACTOR), mode="replicate")
    ae = vae.ready(vae.model.encode_activation_bytes(*image.shape[:1], *image.shape[2:], tile=tile))
    h = host.current()
    with torch.inference_mode():  # Cancel between tiles and stages
        image = (image * 2 - 1).to(device=ae.device, dtype=ae.dtype)
        latent = h.runtime.encode(ae, image, between=h.check_interrupted) if tile is None else \
            ae.encode_tiled(image, tile=tile, overlap=overlap, between=h.check_interrupted)
    return (latent.float() / ae.scaling_factor).to(host.current().intermediate_device())


class SanaVAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The SANA latent to decode (32 channels, raw DC-AE latent)."}),
            "vae": ("VAE", {"tooltip": "The DC-AE from SanaVAELoader."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "SANA"
    DESCRIPTION = ("Decodes a SANA latent to an image: in one pass when it fits in free GPU memory, in tiles "
                   "otherwise (4K on a 16 GB card), decided before decoding rather than after an out-of-memory "
                   "error.")

    def decode(self, samples, vae):
        return (decode(host.unwrap(vae, "autoencoder", "SanaVAEDecode"), samples, "SanaVAEDecode"),)


class SanaVAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The SANA latent to decode (32 channels, raw DC-AE latent)."}),
            "vae": ("VAE", {"tooltip": "The DC-AE from SanaVAELoader."}),
            "tile_size": ("INT", {"default": DEFAULT_TILE, "min": 64, "max": 8192, "step": LATENT_FACTOR,
                                  "tooltip": "Tile side in output pixels. Smaller tiles use less memory, larger ones "
                                             "are faster (the attention stages always see the whole image)."}),
            "overlap": ("INT", {"default": OVERLAP_DEFAULT, "min": 0, "max": 1024, "step": 8,
                                "tooltip": "Context in pixels each tile reads on every side. 56 or more (the "
                                           "decoder's receptive field) gives exactly the untiled image, no seams; "
                                           "less is a little faster and may leave faint tile borders."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "SANA"
    DESCRIPTION = ("Decodes a SANA latent in tiles: bounded memory for 4K images, and with an overlap of 56 px or "
                   "more, exactly the untiled result.")

    def decode(self, samples, vae, tile_size, overlap):
        node = "SanaVAEDecodeTiled"
        return (decode(host.unwrap(vae, "autoencoder", node), samples, node, tile=tile_size, overlap=overlap),)


class SanaVAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to encode. Sides that are not multiples of 32 are padded "
                                            "(edge pixels repeated) up to the next multiple, never cropped."}),
            "vae": ("VAE", {"tooltip": "The DC-AE from SanaVAELoader."}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The raw DC-AE latent [B, 32, H/32, W/32] (ComfyUI's convention: the model scales it "
                       "by 0.41407 when sampling), for SanaSampler or KSampler with denoise < 1.",)
    FUNCTION = "encode"
    CATEGORY = "SANA"
    DESCRIPTION = ("Encodes an image to a SANA latent (image-to-image; inpainting with Set Latent Noise Mask). Large "
                   "images are encoded in tiles when they would not fit in free memory (the same latent).")

    def encode(self, pixels, vae):
        return ({"samples": encode(host.unwrap(vae, "autoencoder", "SanaVAEEncode"), pixels, "SanaVAEEncode")},)
