"""DC-AE nodes: decode (untiled when it fits, tiled otherwise), tiled decode, encode.

IMAGE is ComfyUI's float [B, H, W, 3] in 0..1 on the CPU; the DC-AE works on [B, 3, H, W] in
-1..1 and on latents in the DiT's latent space (already scaled by 0.41407).
"""
import torch
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


def _decode_input(vae, samples, node):
    latent = latent_samples(samples, node)
    ae = vae.ready(vae.model.activation_bytes(*latent.shape[:1], *latent.shape[2:]))  # ComfyUI makes room
    return ae, latent.to(device=ae.device, dtype=ae.dtype)


class SanaVAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The SANA latent to decode (32 channels, DiT latent space)."}),
            "vae": ("SANA_VAE", {"tooltip": "The DC-AE from SanaVAELoader."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "SANA"
    DESCRIPTION = ("Decodes a SANA latent to an image: in one pass when it fits in free GPU memory, in tiles "
                   "otherwise (4K on a 16 GB card), decided before decoding rather than after an out-of-memory "
                   "error.")

    def decode(self, samples, vae):
        ae, latent = _decode_input(vae, samples, "SanaVAEDecode")
        with torch.inference_mode():
            pixels = host.current().runtime.decode(ae, latent, between=host.current().check_interrupted)  # Cancel between stages
        return (to_image(pixels, "SanaVAEDecode"),)


class SanaVAEDecodeTiled:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The SANA latent to decode (32 channels, DiT latent space)."}),
            "vae": ("SANA_VAE", {"tooltip": "The DC-AE from SanaVAELoader."}),
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
        latent = latent_samples(samples, "SanaVAEDecodeTiled")
        ae = vae.ready(vae.model.activation_bytes(latent.shape[0], *latent.shape[2:], tile=tile_size))
        with torch.inference_mode():
            pixels = ae.decode_tiled(latent.to(device=ae.device, dtype=ae.dtype), tile=tile_size, overlap=overlap,
                                     between=host.current().check_interrupted)  # Cancel between tiles
        return (to_image(pixels, "SanaVAEDecodeTiled"),)


class SanaVAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to encode. Its sides are cropped (centred) to multiples of "
                                            "32, at most 31 pixels each, as ComfyUI's VAE Encode does; scale it "
                                            "first for other sizes."}),
            "vae": ("SANA_VAE", {"tooltip": "The DC-AE from SanaVAELoader."}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The latent [B, 32, H/32, W/32] in the DiT's latent space (scaled by 0.41407), for "
                       "SanaSampler with denoise < 1.",)
    FUNCTION = "encode"
    CATEGORY = "SANA"
    DESCRIPTION = "Encodes an image to a SANA latent (image-to-image, inpainting-free edits)."

    def encode(self, pixels, vae):
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
            raise ValueError("SanaVAEEncode: 'pixels' is not a ComfyUI IMAGE [batch, height, width, channels]")
        _, height, width, _ = pixels.shape
        if height < LATENT_FACTOR or width < LATENT_FACTOR:
            raise ValueError(f"SanaVAEEncode: the image is {width}x{height}; SANA needs at least 32x32 pixels")
        top, left = (height % LATENT_FACTOR) // 2, (width % LATENT_FACTOR) // 2
        pixels = pixels[:, top:top + height // LATENT_FACTOR * LATENT_FACTOR,
                        left:left + width // LATENT_FACTOR * LATENT_FACTOR, :3]  # centred crop, drop alpha
        if not torch.isfinite(pixels).all():
            raise ValueError("SanaVAEEncode: the image holds NaN or infinite values")
        ae = vae.ready(vae.model.activation_bytes(pixels.shape[0], height // LATENT_FACTOR, width // LATENT_FACTOR))
        with torch.inference_mode():
            latent = ae.encode((pixels.movedim(-1, 1) * 2 - 1).to(device=ae.device, dtype=ae.dtype))
        return ({"samples": latent.float().to(host.current().intermediate_device())},)
