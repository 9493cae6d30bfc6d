"""Image sizes: SANA works on a latent 32x smaller than the image, so sizes are multiples of 32.

The aspect-ratio bins are diffusers' ASPECT_RATIO_512/1024/2048/4096_BIN tables (the sizes the
models were trained at, keyed by height / width, values (height, width)). Binning maps a wanted
aspect ratio to the nearest trained size, as diffusers' `classify_height_width_bin` does.
"""
LATENT_FACTOR = 32  # DC-AE f32: one latent pixel per 32x32 image pixels

ASPECT_RATIO_512_BIN = {
    "0.25": (256, 1024), "0.28": (256, 928), "0.32": (288, 896), "0.33": (288, 864), "0.35": (288, 832),
    "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736), "0.5": (352, 704), "0.52": (352, 672),
    "0.57": (384, 672), "0.6": (384, 640), "0.68": (416, 608), "0.72": (416, 576), "0.78": (448, 576),
    "0.82": (448, 544), "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480),
    "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448), "1.38": (576, 416), "1.46": (608, 416),
    "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352), "2.09": (736, 352), "2.4": (768, 320),
    "2.5": (800, 320), "3.0": (864, 288), "4.0": (1024, 256),
}
ASPECT_RATIO_1024_BIN = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}
ASPECT_RATIO_2048_BIN = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712),
    "0.32": (1152, 3584), "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200), "0.42": (1280, 3072),
    "0.48": (1408, 2944), "0.5": (1408, 2816), "0.52": (1408, 2688), "0.57": (1536, 2688), "0.6": (1536, 2560),
    "0.68": (1664, 2432), "0.72": (1664, 2304), "0.78": (1792, 2304), "0.82": (1792, 2176),
    "0.88": (1920, 2176), "0.94": (1920, 2048), "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920),
    "1.21": (2176, 1792), "1.29": (2304, 1792), "1.38": (2304, 1664), "1.46": (2432, 1664),
    "1.67": (2560, 1536), "1.75": (2688, 1536), "2.0": (2816, 1408), "2.09": (2944, 1408), "2.4": (3072, 1280),
    "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152), "3.11": (3584, 1152), "3.62": (3712, 1024),
    "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}
ASPECT_RATIO_4096_BIN = {
    "0.25": (2048, 8192), "0.26": (2048, 7936), "0.27": (2048, 7680), "0.28": (2048, 7424),
    "0.32": (2304, 7168), "0.33": (2304, 6912), "0.35": (2304, 6656), "0.4": (2560, 6400), "0.42": (2560, 6144),
    "0.48": (2816, 5888), "0.5": (2816, 5632), "0.52": (2816, 5376), "0.57": (3072, 5376), "0.6": (3072, 5120),
    "0.68": (3328, 4864), "0.72": (3328, 4608), "0.78": (3584, 4608), "0.82": (3584, 4352),
    "0.88": (3840, 4352), "0.94": (3840, 4096), "1.0": (4096, 4096), "1.07": (4096, 3840), "1.13": (4352, 3840),
    "1.21": (4352, 3584), "1.29": (4608, 3584), "1.38": (4608, 3328), "1.46": (4864, 3328),
    "1.67": (5120, 3072), "1.75": (5376, 3072), "2.0": (5632, 2816), "2.09": (5888, 2816), "2.4": (6144, 2560),
    "2.5": (6400, 2560), "2.89": (6656, 2304), "3.0": (6912, 2304), "3.11": (7168, 2304), "3.62": (7424, 2048),
    "3.75": (7680, 2048), "3.88": (7936, 2048), "4.0": (8192, 2048),
}

ASPECT_RATIO_BINS = {512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN,
                     2048: ASPECT_RATIO_2048_BIN, 4096: ASPECT_RATIO_4096_BIN}


class SizeError(ValueError):
    """A bad image side: `side` ("width" / "height"), `value`, `choices` (the nearest good values)."""

    def __init__(self, message: str, side: str, value, choices: str):
        super().__init__(message)
        self.side, self.value, self.choices = side, value, choices


def check_size(width: int, height: int) -> None:
    """Raise ValueError unless both sides are positive multiples of 32, naming the nearest good sizes."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise SizeError(f"{name} must be a whole number of pixels, got {value!r}", name, value, "a whole number")
        if value < LATENT_FACTOR or value % LATENT_FACTOR:
            lower = max(LATENT_FACTOR, value // LATENT_FACTOR * LATENT_FACTOR)
            upper = lower if value < LATENT_FACTOR else lower + LATENT_FACTOR
            choices = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise SizeError(f"{name} {value} is not a positive multiple of {LATENT_FACTOR} (SANA's autoencoder "
                            f"works on 32x32 pixel blocks): use {choices}, or name an aspect ratio "
                            f"(e.g. aspect_ratio='16:9') to get the nearest size the model was trained at",
                            name, value, choices)


def parse_aspect_ratio(aspect_ratio) -> float:
    """'W:H' (or 'WxH') string or (width, height) pair -> height / width."""
    if isinstance(aspect_ratio, str):
        parts = aspect_ratio.lower().replace("x", ":").split(":")
        try:
            width, height = (float(p) for p in parts)
        except ValueError:
            width = height = 0.0
            parts = []
        if len(parts) != 2:
            raise ValueError(f"aspect ratio {aspect_ratio!r} is not of the form 'W:H', e.g. '1:1', '16:9', '3:4'")
    else:
        try:
            width, height = (float(v) for v in aspect_ratio)
        except (TypeError, ValueError):
            raise ValueError(f"aspect ratio must be 'W:H' or a (width, height) pair, got {aspect_ratio!r}") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"aspect ratio sides must be positive, got {aspect_ratio!r}")
    return height / width


def binned_size(aspect_ratio, base: int = 1024) -> tuple[int, int]:
    """(width, height) of the trained size nearest to `aspect_ratio` in the `base` px bin table."""
    if base not in ASPECT_RATIO_BINS:
        raise ValueError(f"no aspect-ratio bins for {base} px; available: {', '.join(map(str, ASPECT_RATIO_BINS))}")
    ratio = parse_aspect_ratio(aspect_ratio)
    bins = ASPECT_RATIO_BINS[base]
    key = min(bins, key=lambda k: abs(float(k) - ratio))  # diffusers' classify_height_width_bin
    height, width = bins[key]
    return width, height


def bin_sizes(base: int = 1024) -> list[tuple[int, int]]:
    """All (width, height) sizes of the `base` px table, tallest first."""
    return [(w, h) for h, w in ASPECT_RATIO_BINS[base].values()]


# The aspect ratios people ask for (screens, photos, film, panoramas), widest first; each one names
# the trained size nearest to it in every bin (binned_size), so "16:9" at 1024 is 1344x768.
COMMON_RATIOS = ("4:1", "3:1", "21:9", "2:1", "16:9", "16:10", "3:2", "4:3", "5:4", "1:1",
                 "4:5", "3:4", "2:3", "10:16", "9:16", "1:2", "9:21", "1:3", "1:4")


def ratio_sizes(base: int = 1024) -> list[tuple[str, int, int]]:
    """(ratio, width, height) for each of COMMON_RATIOS: the nearest trained size of the `base` px bin."""
    return [(ratio, *binned_size(ratio, base)) for ratio in COMMON_RATIOS]
