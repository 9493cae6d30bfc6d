"""SanaEmptyLatent: an all-zero latent of a chosen size, with the aspect-ratio bins as presets.

LATENT is ComfyUI's {"samples": (B, 32, H/32, W/32)}: raw DC-AE latents, as ComfyUI keeps every
family's; the model's latent format multiplies them by 0.41407 around sampling.
"""
from math import gcd

import torch
from sana_core.resolution import ASPECT_RATIO_BINS, LATENT_FACTOR, check_size

from . import host

LATENT_CHANNELS = 32
CUSTOM = "custom"


def preset_label(base: int, width: int, height: int) -> str:
    g = gcd(width, height)
    return f"{base}: {width}x{height} ({width // g}:{height // g})"


# "custom" first, then every bin size (512, 1024, 2048, 4096 tables), widest first within a table.
PRESETS = {preset_label(base, w, h): (w, h)
           for base, table in ASPECT_RATIO_BINS.items() for h, w in table.values()}
PRESET_CHOICES = [CUSTOM] + list(PRESETS)


class SanaEmptyLatent:
    @classmethod
    def INPUT_TYPES(cls):
        size = {"min": LATENT_FACTOR, "max": 8192, "step": LATENT_FACTOR}
        return {"required": {
            "preset": (PRESET_CHOICES, {
                "default": CUSTOM,
                "tooltip": "An aspect-ratio size SANA was trained at, from the 512/1024/2K/4K bins; it sets "
                           "width and height (and overrides them when queued). custom: use width and height."}),
            "width": ("INT", dict(size, default=1024, tooltip="Image width in pixels, a multiple of 32.")),
            "height": ("INT", dict(size, default=1024, tooltip="Image height in pixels, a multiple of 32.")),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "How many images to make at once."}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Zeros of shape [batch, 32, height/32, width/32] (a raw DC-AE latent; the model scales it "
                       "by 0.41407 when sampling), for SanaSampler or KSampler.",)
    FUNCTION = "generate"
    CATEGORY = "SANA"
    DESCRIPTION = ("An empty SANA latent: 32 channels at 1/32 of the image size (raw DC-AE latent, ComfyUI's "
                   "convention). Pick a preset for the sizes the models were trained at.")

    def generate(self, preset, width, height, batch_size):
        if preset != CUSTOM:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}: choose one from the list, or '{CUSTOM}'")
            width, height = PRESETS[preset]
        check_size(width, height)
        samples = torch.zeros([batch_size, LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR],
                              device=host.current().intermediate_device())
        return ({"samples": samples},)
