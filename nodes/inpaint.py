"""SanaInpaintComposite: the original pixels back outside the inpainting mask (sana_core.inpaint.composite).

The inpainting itself is core wiring around SanaSampler (or KSampler / SamplerCustomAdvanced): Load Image (a
painted mask) -> SANA VAE Encode -> Set Latent Noise Mask -> sampler -> SANA VAE Decode -> this node. A 32x
autoencoder does not reproduce the pixels it was given, so without this the whole image would change a little.
"""
import torch
from sana_core.inpaint import DEFAULT_FEATHER, composite


class SanaInpaintComposite:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The image before inpainting (what Load Image or Pad Image for "
                                              "Outpainting gave the VAE encoder)."}),
            "decoded": ("IMAGE", {"tooltip": "The decoded sampling result (padded or cropped to multiples of 32 "
                                             "by the encoder: put back in place here)."}),
            "mask": ("MASK", {"tooltip": "The inpainting mask (1 = repainted), at the original's size (other "
                                         "sizes are resized)."}),
            "feather": ("INT", {"default": DEFAULT_FEATHER, "min": 0, "max": 512, "step": 1,
                                "tooltip": "Pixels over which the repainted part fades into the original outside "
                                           "the mask; 0 = a hard edge. Beyond it the original pixels are kept "
                                           "exactly."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The original image with the repainted part (within the feathered mask) from the decoded "
                       "one.",)
    FUNCTION = "composite"
    CATEGORY = "SANA"
    DESCRIPTION = ("Puts the original pixels back outside the inpainting or outpainting mask (feathered at its "
                   "edge), since the 32x autoencoder cannot give them back exactly; the result has the "
                   "original's size.")

    def composite(self, original, decoded, mask, feather):
        for name, image in (("original", original), ("decoded", decoded)):
            if not isinstance(image, torch.Tensor) or image.dim() != 4:
                raise ValueError(f"SanaInpaintComposite: '{name}' is not a ComfyUI IMAGE [batch, height, width, "
                                 f"channels]")
        channels = min(original.shape[-1], decoded.shape[-1], 3)
        out = composite(original[..., :channels].movedim(-1, 1), decoded[..., :channels].movedim(-1, 1), mask,
                        feather)
        return (out.movedim(1, -1),)
