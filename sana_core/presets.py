"""Per-variant defaults: sampler, steps, CFG, flow shift, PAG layers; the training size; which samplers
drive which models."""
from . import resolution, samplers

SAMPLER_STEPS = {"flow_dpm_solver": 20, "flow_euler": 28, "scm": 2}  # default steps per sampler


def pairing_error(config, sampler: str, steps: int) -> str | None:
    """Why `sampler` cannot drive this model, or None when the pairing works."""
    if sampler not in samplers.SAMPLERS:
        return f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}"
    pairings = ("supported pairings: SANA / SANA 1.5 models with 'flow_dpm_solver' (20 steps) or 'flow_euler' "
                "(28 steps); Sana-Sprint models with 'scm' (1-4 steps)")
    if config.sprint and sampler != "scm" and steps > 1:
        return (f"{config.variant} is a Sana-Sprint (consistency-distilled) model: it is sampled with 'scm' in "
                f"1-4 steps, not with {sampler!r} over {steps} steps; {pairings}")
    if not config.sprint and sampler == "scm":
        return (f"the 'scm' sampler needs a Sana-Sprint model (one with a guidance embedder), and {config.variant} "
                f"is not one; {pairings}")
    return None


def defaults_for(config, width: int | None = None, height: int | None = None) -> dict:
    """Per-variant defaults: dict(steps, cfg, shift, sampler, pag_layers, pag_scale).

    Flow shift 4.0 for the 0.6B at 1024 px, 3.0 for 512 px, the 1.6B, Sana 1.5 and 2K, 6.0 for 4K
    (the official configs). PAG is off (pag_scale 0); when asked for, the official scale is 2.0 on
    layer 8 of the 1.6B family and layer 14 of the 0.6B (other depths: 2/5 of the way in)."""
    if config.sprint:
        return dict(steps=2, cfg=4.5, shift=None, sampler="scm", pag_layers=(), pag_scale=0.0)
    variant = config.variant
    if variant.endswith("4k"):
        shift = 6.0
    elif "0.6b" in variant and (width or 1024) * (height or 1024) > 724 ** 2:  # the 1024 px release
        shift = 4.0
    else:
        shift = 3.0
    pag_layer = {20: 8, 28: 14}.get(config.depth, config.depth * 2 // 5)
    return dict(steps=20, cfg=4.5, shift=shift, sampler="flow_dpm_solver", pag_layers=(pag_layer,), pag_scale=0.0)


def base_resolution(config) -> int:
    """Side in pixels of the model's training size: picks the aspect-ratio bin table and the default size."""
    if config.variant.endswith("4k"):
        return 4096
    if config.variant.endswith("2k"):
        return 2048
    if config.base_size:
        return min(resolution.ASPECT_RATIO_BINS, key=lambda b: abs(b - config.base_size * resolution.LATENT_FACTOR))
    return 1024
