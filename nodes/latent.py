"""SanaEmptyLatent: an all-zero latent of a chosen size, with the aspect-ratio bins as presets.

LATENT is ComfyUI's {"samples": (B, 32, H/32, W/32)}: raw DC-AE latents, as ComfyUI keeps every
family's; the model's latent format multiplies them by 0.41407 around sampling.
"""
from math import gcd

import torch
from sana_core.resolution import ASPECT_RATIO_BINS, LATENT_FACTOR, SizeError, bin_sizes, check_size, ratio_sizes

from . import host, messages

LATENT_CHANNELS = 32
CUSTOM = "custom"
CLASS_NAMES = {1024: "1024px", 2048: "2K", 4096: "4K", 512: "512px"}  # the bins, in menu order


def preset_label(base: int, ratio: str, width: int, height: int) -> str:
    return f"{CLASS_NAMES[base]} · {ratio} · {width}x{height}"  # the menu's filter finds "16:9", "2K", "1344"


def round1_label(base: int, width: int, height: int) -> str:
    """The preset labels of round-1 workflows and API prompts ("1024: 1344x768 (7:4)"): still accepted."""
    g = gcd(width, height)
    return f"{base}: {width}x{height} ({width // g}:{height // g})"


# "custom" first, then per resolution class (1024px, the default, first) the common aspect ratios, widest first.
PRESETS = {preset_label(base, ratio, w, h): (w, h) for base in CLASS_NAMES for ratio, w, h in ratio_sizes(base)}
PRESET_CHOICES = [CUSTOM] + list(PRESETS)
DEFAULT_PRESET = preset_label(1024, "1:1", 1024, 1024)
ROUND1_PRESETS = {round1_label(base, w, h): (w, h) for base in ASPECT_RATIO_BINS for w, h in bin_sizes(base)}
# Every size the models were trained at, for the frontend's "native size" line (js/sana.js).
TRAINED_SIZES = {str(base): bin_sizes(base) for base in ASPECT_RATIO_BINS}


class SanaEmptyLatent:
    @classmethod
    def INPUT_TYPES(cls):
        size = {"min": LATENT_FACTOR, "max": 8192, "step": LATENT_FACTOR}
        return {"required": {
            "preset": (PRESET_CHOICES, {
                "default": DEFAULT_PRESET,
                "trained_sizes": TRAINED_SIZES,
                "tooltip": "An aspect ratio at a resolution class (1024px, 2K, 4K, 512px; use your model's), as the "
                           "nearest size SANA was trained at. Type a ratio (16:9, 3:2, 9:16 ...) to filter the list. "
                           "It sets width and height (and overrides them when queued). custom: use width and height."}),
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

    @classmethod
    def VALIDATE_INPUTS(cls, preset):
        """The listed presets, and the round-1 labels older workflows and API prompts hold (taking the
        list check's place, which would answer "Value not in list")."""
        if preset == CUSTOM or preset in PRESETS or preset in ROUND1_PRESETS:
            return True
        return (f"preset {preset!r} is not one of SanaEmptyLatent's presets: pick one from the list (e.g. "
                f"{DEFAULT_PRESET!r}), or '{CUSTOM}' to use width and height")

    def generate(self, preset, width, height, batch_size):
        if preset != CUSTOM:
            valid = self.VALIDATE_INPUTS(preset)
            if valid is not True:
                raise ValueError(valid)
            width, height = PRESETS.get(preset) or ROUND1_PRESETS[preset]
        try:
            check_size(width, height)
        except SizeError as e:
            raise messages.size_error(e, "SanaEmptyLatent") from None
        samples = torch.zeros([batch_size, LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR],
                              device=host.current().intermediate_device())
        return ({"samples": samples},)
